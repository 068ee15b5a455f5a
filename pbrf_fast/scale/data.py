"""Training and test data for the scale pipeline, whatever form the user has it in.

:class:`DataSource` wraps in-memory tensors ``(inputs, targets)``, any map-style
``torch.utils.data.Dataset`` of ``(input, target)`` pairs, or a ``DataLoader`` over
one (its dataset, collate function and batch size are used; its order is not: the
pipeline needs fixed example positions to shard and to resume). Examples are read
in batches of consecutive positions, so nothing needs the whole training set in
memory at once; only the curvature sample and the test points are gathered.
"""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data import default_collate

from ..errors import InputError

__all__ = ["DataSource", "as_data_source", "tensor_digest"]


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


class DataSource:
    """Positions 0..n-1 of a data set, read as ``(inputs, targets)`` batches.

    ``batch_task``: how a collated batch that is not a pair maps to them (None: found from the
    first item, :func:`~pbrf_fast.scale.task.batch_task_for`). ``length``: an iterable data set's
    number of examples, if known (else counted once)."""

    def __init__(self, data, name: str = "data", batch_task=None, length: int | None = None):
        self.name = name
        self._tensors = None
        self._dataset = None
        self._iterable = None
        self._collate = _default_collate
        self.default_batch_size = None
        self.batch_task = batch_task
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, torch.Tensor) for v in data):
            x, t = data
            if len(x) != len(t):
                raise InputError(f"{name}: inputs have {len(x)} rows but targets have {len(t)}")
            self._tensors = (x, t)
        elif isinstance(data, DataLoader):
            self._set_dataset(data.dataset, length)
            self._collate = data.collate_fn or _default_collate
            self.default_batch_size = data.batch_size
        elif isinstance(data, IterableDataset):
            self._set_dataset(data, length)
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self._dataset = data
        else:
            raise InputError(f"{name}: expected (inputs, targets) tensors, a map-style Dataset of "
                             f"(input, target) pairs, dicts or tuples, an IterableDataset or a DataLoader over one; "
                             f"got {type(data).__name__}")
        if len(self) == 0:
            raise InputError(f"{name}: no examples")
        if self._tensors is None:
            from .task import batch_task_for

            first = self._items([0])[0]
            if self.batch_task is None:
                self.batch_task = batch_task_for(first)
            if self.batch_task is not None and self._collate is _default_collate:
                self._collate = default_collate  # dicts and tuples of any length
            if self.batch_task is not None:  # a field it names and the data lacks fails here, not mid-run
                self._pair(self._collate([first]))

    def _set_dataset(self, dataset, length):
        if isinstance(dataset, IterableDataset):
            self._iterable = dataset
            try:
                self._length = len(dataset) if length is None else int(length)
            except TypeError:  # no __len__: counted by one pass over the stream
                self._length = sum(1 for _ in dataset)
        else:
            self._dataset = dataset

    def __len__(self) -> int:
        if self._tensors is not None:
            return len(self._tensors[0])
        return self._length if self._iterable is not None else len(self._dataset)

    @property
    def in_memory(self) -> bool:
        return self._tensors is not None

    def _items(self, positions) -> list:
        """The raw items at ``positions`` (in that order): indexed, or picked from one pass of a stream."""
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

    def fingerprint(self, probe: int = 64) -> str:
        """A digest that changes when the data does: every byte for tensors, the size and
        the first and last ``probe`` examples for a Dataset (reading all of a large one
        just to guard a results folder would cost a full pass)."""
        n = len(self)
        if self._tensors is not None:
            return tensor_digest(self._tensors)
        head = list(range(min(n, probe)))
        tail = list(range(max(len(head), n - probe), n))
        return tensor_digest(self.take(head + tail), str(n).encode())


def as_data_source(data, name: str, batch_task=None) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, name, batch_task)
