"""Training and test data for the scale pipeline, whatever form the user has it in.

:class:`DataSource` wraps in-memory tensors ``(inputs, targets)``, any map-style
``torch.utils.data.Dataset`` of ``(input, target)`` pairs, or a ``DataLoader`` over
one (its dataset, collate function and batch size are used). A DataLoader is read
through its sampler: ``SequentialSampler`` and ``RandomSampler`` over every example
(``shuffle=True``) select the whole data set, ``SubsetRandomSampler(indices)`` selects
exactly those examples (sorted by dataset index; scores, curvature and 1/N cover only
them), and every other sampler or batch sampler is refused by name: its order is not
used either way, since the pipeline needs fixed example positions to shard and to
resume. Examples are read in batches of consecutive positions, so nothing needs the
whole training set in memory at once; only the curvature sample and the test points
are gathered.

Items that are not pairs -- dicts (``input_ids``, ``attention_mask``, ``labels``), tuples of
another length -- are collated by torch's ``default_collate`` and read through a
:class:`~pbrf_fast.scale.task.BatchTask`. An ``IterableDataset`` (or a DataLoader over one) is
streamed, its positions the order it yields its items in (the row fingerprints catch a stream
that changes between a run and its resume): its length is ``len()`` where it has one, else the
one given, else counted by one pass; reading positions makes one pass over the stream.

:func:`row_digests` and :class:`RowFingerprints` guard a results folder against data
that changed between a run and its resume: every example read is hashed on the way
(no pass of its own) and compared with the digest stored when it was first read.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, default_collate)

from ..errors import DataChangedError, InputError
from ..problem import Problem
from .task import TaskModel, batch_task_for

__all__ = ["DataSource", "RowFingerprints", "as_data_source", "problem_from_data", "row_digests", "tensor_digest"]


def tensor_digest(tensors, extra: bytes = b"") -> str:
    """A short digest of the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(extra)
    return h.hexdigest()[:16]


def _default_collate(items):
    xs, ts = zip(*items)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(t) for t in ts])


def _selected_indices(loader: DataLoader, name: str) -> torch.Tensor | None:
    """The dataset indices a DataLoader's sampler selects, sorted; None for all of them.

    Only samplers whose selection is a fixed set are honoured: a sampler that draws with
    replacement or a different subset each epoch (or a user's own class, which may do
    either) has no one set of examples to score, so it is refused by name."""
    sampler = loader.sampler
    if loader.batch_sampler is not None:
        if type(loader.batch_sampler) is not BatchSampler:
            raise InputError(f"{name}: the DataLoader's batch_sampler {type(loader.batch_sampler).__name__} is not "
                             "supported (the examples it selects are not a fixed set); pass a DataLoader with a "
                             "SubsetRandomSampler(indices), or a torch.utils.data.Subset of the data set")
        sampler = loader.batch_sampler.sampler
    n = len(loader.dataset)
    if type(sampler) is SequentialSampler:
        return None
    if type(sampler) is RandomSampler:
        if not sampler.replacement and sampler.num_samples == n:
            return None  # shuffle=True: every example once; the order is not used
        raise InputError(f"{name}: the DataLoader's RandomSampler draws {sampler.num_samples} of {n} examples"
                         f"{' with replacement' if sampler.replacement else ''}, a different set each epoch; "
                         "score a fixed subset with SubsetRandomSampler(indices) or a torch.utils.data.Subset")
    if type(sampler) is SubsetRandomSampler:
        try:
            indices = torch.as_tensor(list(sampler.indices), dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{name}: SubsetRandomSampler indices must be integers ({exc})") from exc
        if len(indices) == 0:
            raise InputError(f"{name}: the DataLoader's SubsetRandomSampler selects no examples")
        if int(indices.min()) < 0 or int(indices.max()) >= n:
            raise InputError(f"{name}: SubsetRandomSampler indices must lie in [0, {n}); got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        indices = indices.sort().values
        if len(indices.unique_consecutive()) != len(indices):
            raise InputError(f"{name}: SubsetRandomSampler indices repeat an example; each must appear once")
        return indices
    why = ("the pipeline shards the data across ranks itself; pass the DataLoader without it"
           if type(sampler).__name__ == "DistributedSampler" else
           "only SequentialSampler, RandomSampler over every example (shuffle=True) and "
           "SubsetRandomSampler(indices) select a fixed set of examples to score")
    raise InputError(f"{name}: the DataLoader's sampler {type(sampler).__name__} is not supported: {why}; "
                     "a subset can be given as SubsetRandomSampler(indices) or a torch.utils.data.Subset")


class DataSource:
    """Positions 0..n-1 of a data set, read as ``(inputs, targets)`` batches.

    ``indices``: the dataset index of each position when a DataLoader's sampler selects
    a subset (sorted), else None (position = dataset index). ``batch_task``: how a collated
    batch that is not a pair maps to them (None: found from the first item,
    :func:`~pbrf_fast.scale.task.batch_task_for`). ``length``: an iterable data set's number of
    examples, if known (else counted once)."""

    def __init__(self, data, name: str = "data", batch_task=None, length: int | None = None):
        self.name = name
        self._tensors = None
        self._dataset = None
        self._iterable = None
        self._collate = _default_collate
        self.default_batch_size = None
        self.indices = None
        self.batch_task = batch_task
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, torch.Tensor) for v in data):
            x, t = data
            if len(x) != len(t):
                raise InputError(f"{name}: inputs have {len(x)} rows but targets have {len(t)}")
            self._tensors = (x, t)
        elif isinstance(data, DataLoader):
            self._collate = data.collate_fn or _default_collate
            self.default_batch_size = data.batch_size
            if isinstance(data.dataset, IterableDataset):  # streamed; a sampler means nothing to it
                self._set_stream(data.dataset, length)
            else:
                self._dataset = data.dataset
                self.indices = _selected_indices(data, name)
        elif isinstance(data, IterableDataset):
            self._set_stream(data, length)
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self._dataset = data
        else:
            raise InputError(f"{name}: expected (inputs, targets) tensors, a map-style Dataset of "
                             f"(input, target) pairs, dicts or tuples, an IterableDataset or a DataLoader over one; "
                             f"got {type(data).__name__}")
        if len(self) == 0:
            raise InputError(f"{name}: no examples")
        if self._tensors is None:
            first = self._items([0])[0]
            if self.batch_task is None:
                self.batch_task = batch_task_for(first)
            if self.batch_task is not None and self._collate is _default_collate:
                self._collate = default_collate  # dicts and tuples of any length
            if self.batch_task is not None:  # a field it names and the data lacks fails here, not mid-run
                self._pair(self._collate([first]))

    def _set_stream(self, dataset, length):
        self._iterable = dataset
        try:
            self._length = len(dataset) if length is None else int(length)
        except TypeError:  # no __len__: counted by one pass over the stream
            self._length = sum(1 for _ in dataset)

    def __len__(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        if self._tensors is not None:
            return len(self._tensors[0])
        return self._length if self._iterable is not None else len(self._dataset)

    @property
    def in_memory(self) -> bool:
        return self._tensors is not None

    def dataset_index(self, positions) -> np.ndarray:
        """The dataset index of each position (what results name a row by)."""
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self.indices is None else self.indices.numpy()[positions]

    def _items(self, positions) -> list:
        """The raw items at dataset indices ``positions`` (in that order): indexed, or picked
        from one pass of a stream."""
        if self._iterable is None:
            return [self._dataset[int(i)] for i in positions]
        wanted = {int(i) for i in positions}
        last, found = max(wanted), {}
        for i, item in enumerate(self._iterable):
            if i in wanted:
                found[i] = item
            if i >= last:
                break
        missing = sorted(wanted - set(found))
        if missing:
            raise InputError(f"{self.name}: the stream ended before positions {missing[:5]} (its length was given "
                             f"or counted as {len(self)})")
        return [found[int(i)] for i in positions]

    def _pair(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_task is not None:
            return self.batch_task.split(batch)
        x, t = batch
        return torch.as_tensor(x), torch.as_tensor(t)

    def take(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``positions`` (a sequence or tensor of ints), gathered."""
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if self._tensors is not None:
            x, t = self._tensors
            return x[positions.to(x.device)], t[positions.to(t.device)]
        if len(positions) == 0:
            raise InputError(f"{self.name}: no positions to read")
        if self.indices is not None:
            positions = self.indices[positions]
        return self._pair(self._collate(self._items(positions.tolist())))

    def range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples start .. stop - 1."""
        if self._tensors is not None:
            x, t = self._tensors
            return x[start:stop], t[start:stop]
        return self.take(range(start, stop))

    def batches(self, start: int, stop: int, batch_size: int):
        """Yield ``(first position, inputs, targets)`` over start .. stop - 1 (a stream: one pass)."""
        if self._iterable is not None:
            yield from self._stream_batches(start, stop, batch_size)
            return
        for b0 in range(start, stop, batch_size):
            b1 = min(stop, b0 + batch_size)
            yield (b0, *self.range(b0, b1))

    def _stream_batches(self, start, stop, batch_size):
        items, b0 = [], start
        for i, item in enumerate(self._iterable):
            if i < start:
                continue
            if i >= stop:
                break
            items.append(item)
            if len(items) == batch_size:
                yield (b0, *self._pair(self._collate(items)))
                items, b0 = [], i + 1
        if items:
            yield (b0, *self._pair(self._collate(items)))

    @property
    def split(self) -> str:
        """How errors name this data: "training" or "test"."""
        return "training" if self.name == "train" else self.name

    def describe(self) -> str:
        """The user's own shapes (tensors) or size and class (a Dataset), for error messages."""
        if self._tensors is not None:
            x, t = self._tensors
            return f"inputs of shape {tuple(x.shape)}, targets {tuple(t.shape)}"
        return f"{len(self)} examples of a {type(self._dataset or self._iterable).__name__}"

    def check_finite(self, positions, x: torch.Tensor, t: torch.Tensor) -> None:
        """Refuse NaN / Inf in the examples at ``positions``, naming the split and the first such example."""
        for what, v in (("inputs", x), ("targets", t)):
            if torch.is_floating_point(v) and v.numel():
                bad = ~torch.isfinite(v.reshape(len(v), -1)).all(1)
                if bool(bad.any()):
                    row = int(np.asarray(positions).reshape(-1)[int(bad.nonzero()[0])])
                    raise InputError(f"{self.split} {what} contain NaN or Inf: example {row} (dataset index "
                                     f"{int(self.dataset_index([row])[0])})")

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The in-memory ``(inputs, targets)``, or None for a Dataset."""
        return self._tensors

    def fingerprint(self) -> str:
        """What a results folder records about the data without reading it: the number of
        examples, which ones a sampler selects, and the first example's shapes and dtypes.
        Every example's bytes are guarded by :class:`RowFingerprints` as they are read."""
        x, t = self.range(0, 1)
        layout = str((len(self), tuple(x.shape[1:]), str(x.dtype), tuple(t.shape[1:]), str(t.dtype))).encode()
        return tensor_digest([] if self.indices is None else [self.indices], layout)


def as_data_source(data, name: str, batch_task=None) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, name, batch_task)


def problem_from_data(model, loss, data, batch_task=None, **problem_options):
    """(Problem, the data's reader) for ``Influence`` on data of any batch structure: tensors,
    a Dataset of pairs, dicts or tuples, an IterableDataset, a DataLoader (all of it gathered: for
    a whole training set use the scale pipeline). Test points are read the same way:
    ``DataSource(test_data, "test", problem.batch_task).range(0, m)``, or
    ``problem.batch_task.split(collated_batch)``."""
    source = DataSource(data, "data", batch_task)
    x, t = source.range(0, len(source))
    network = model if source.batch_task is None else TaskModel(model, source.batch_task)
    problem = Problem(network, loss, x, t, **problem_options)
    problem.batch_task = source.batch_task
    return problem, source


_DIGEST_SET = np.uint64(1 << 63)  # every stored digest has its top bit set: 0 marks "not read yet"


def row_digests(x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    """One 64-bit digest per example of the bytes, shape and dtype of its input and target
    (blake2b; uint64 with the top bit set)."""
    parts = []
    for v in (x, t):
        v = v.detach().cpu().contiguous()
        parts.append(v.reshape(len(v), -1).view(torch.uint8).numpy() if v.numel() else np.zeros((len(v), 0), np.uint8))
    rows = np.ascontiguousarray(np.concatenate(parts, axis=1))
    start = hashlib.blake2b(digest_size=8)
    start.update(str((tuple(x.shape[1:]), str(x.dtype), tuple(t.shape[1:]), str(t.dtype))).encode())
    out = np.empty(len(rows), dtype=np.uint64)
    for i in range(len(rows)):
        h = start.copy()
        h.update(rows[i])
        out[i] = int.from_bytes(h.digest(), "little")
    return out | _DIGEST_SET


class RowFingerprints:
    """The digest of every example of one split as first read, kept in a results folder
    (``memmap``: uint64 per position, 0 until read). :meth:`check` compares the examples
    just read with what is stored and stores the new ones, so a resume meets any changed
    example on its way through the data instead of in a pass of its own."""

    def __init__(self, memmap: np.memmap, source: DataSource, folder: Path):
        self.memmap, self.source, self.folder = memmap, source, Path(folder)

    def _compare(self, positions, x, t):
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        digests = row_digests(x, t)
        stored = np.asarray(self.memmap[positions])
        known = stored != 0
        return positions, digests, known, known & (stored != digests)

    def matches(self, positions, x: torch.Tensor, t: torch.Tensor) -> bool:
        """Whether the examples at ``positions`` are the stored ones (stores nothing)."""
        return not self._compare(positions, x, t)[3].any()

    def check(self, positions, x: torch.Tensor, t: torch.Tensor) -> None:
        """Refuse an example that differs from its stored digest; store the digests of new ones."""
        positions, digests, known, changed = self._compare(positions, x, t)
        if changed.any():
            first = int(positions[changed][0])
            raise DataChangedError(
                f"{self.source.split} example {first} (dataset index {int(self.source.dataset_index([first])[0])}) is not "
                f"the one the results in {self.folder} were computed from ({int(changed.sum())} of the "
                f"{len(positions)} examples just read changed; a Dataset with random transforms changes at "
                "every read: score without augmentation); restore the data, or start fresh with another --out or "
                "--overwrite (ScorePipeline(..., overwrite=True))")
        if not known.all():
            self.memmap[positions[~known]] = digests[~known]

    def flush(self) -> None:
        self.memmap.flush()
