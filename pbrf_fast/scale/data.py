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
from torch.utils.data import DataLoader, Dataset

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
    """Positions 0..n-1 of a data set, read as ``(inputs, targets)`` batches."""

    def __init__(self, data, name: str = "data"):
        self.name = name
        self._tensors = None
        self._dataset = None
        self._collate = _default_collate
        self.default_batch_size = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, torch.Tensor) for v in data):
            x, t = data
            if len(x) != len(t):
                raise InputError(f"{name}: inputs have {len(x)} rows but targets have {len(t)}")
            self._tensors = (x, t)
        elif isinstance(data, DataLoader):
            self._dataset = data.dataset
            self._collate = data.collate_fn or _default_collate
            self.default_batch_size = data.batch_size
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self._dataset = data
        else:
            raise InputError(f"{name}: expected (inputs, targets) tensors, a map-style Dataset of "
                             f"(input, target) pairs or a DataLoader over one; got {type(data).__name__}")
        if len(self) == 0:
            raise InputError(f"{name}: no examples")

    def __len__(self) -> int:
        return len(self._tensors[0]) if self._tensors is not None else len(self._dataset)

    @property
    def in_memory(self) -> bool:
        return self._tensors is not None

    def take(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``positions`` (a sequence or tensor of ints), gathered."""
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if self._tensors is not None:
            x, t = self._tensors
            return x[positions.to(x.device)], t[positions.to(t.device)]
        if len(positions) == 0:
            raise InputError(f"{self.name}: no positions to read")
        x, t = self._collate([self._dataset[int(i)] for i in positions])
        return torch.as_tensor(x), torch.as_tensor(t)

    def range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples start .. stop - 1."""
        if self._tensors is not None:
            x, t = self._tensors
            return x[start:stop], t[start:stop]
        return self.take(range(start, stop))

    def batches(self, start: int, stop: int, batch_size: int):
        """Yield ``(first position, inputs, targets)`` over start .. stop - 1."""
        for b0 in range(start, stop, batch_size):
            b1 = min(stop, b0 + batch_size)
            yield (b0, *self.range(b0, b1))

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


def as_data_source(data, name: str) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, name)
