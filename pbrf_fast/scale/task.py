"""Batches that are not (input, target) pairs: dicts (as Hugging Face tokenisers and datasets
give them: ``input_ids``, ``attention_mask``, ``labels``) and tuples of any length.

The library's curvature, solvers and scores work on one input tensor and one target tensor per
example (:class:`pbrf_fast.Problem`). A :class:`BatchTask` says how a collated batch maps to
them, in the spirit of kronfluence's ``Task``:

- which fields the model takes (``inputs``; default: every field but the targets) and how to run
  it on them (:meth:`BatchTask.run_model`; default ``model(**fields)`` for a dict, ``model(*fields)``
  for a tuple, the ``logits`` of an output object that has them);
- which field holds the training targets (``targets``; default ``"labels"`` / the last item),
  with positions where ``attention_mask`` is 0 set to ``ignore_index`` (padding is not scored) and,
  for a causal language model whose labels are its inputs, ``shift_labels`` (position t predicts
  token t + 1);
- the training loss is the ScoreTask's ``loss``: for tokens ``"token_cross_entropy"``
  (:class:`pbrf_fast.losses.SequenceCrossEntropyLoss`: mean or sum over the scored tokens, one
  value per sequence), which is also the per-sequence measurement ``"loss"``.

The input fields travel packed into one tensor per example (:class:`TaskModel` unpacks them
before calling the model), so every part of the library sees the plain layout.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..errors import InputError

__all__ = ["BatchTask", "TaskModel", "batch_task_for"]


@dataclasses.dataclass
class BatchTask:
    """How to read one collated batch (a dict or a tuple of tensors); see the module docstring.

    ``run``: an optional ``f(model, fields) -> outputs`` replacing :meth:`run_model`.
    ``max_length``: right-pad every sequence field (integer, last dimension) to this many
    positions -- inputs with 0 (so the attention mask hides them), token targets with
    ``ignore_index`` (not scored) -- for data collated with padding to each batch's longest
    sequence; the library needs one per-example shape. Harmless for a model that honours its
    attention mask (and a causal one: right padding never precedes a real token).
    """

    inputs: tuple | None = None
    targets: str | int | None = None
    attention_mask: str | int | None = "attention_mask"
    shift_labels: bool = False
    ignore_index: int = -100
    run: Callable | None = None
    max_length: int | None = None

    def __post_init__(self):
        self._layout = None  # (kind, names, per-example shapes, dtypes), learnt from the first batch

    # ------------------------------------------------------------------ fields
    def _keys(self, batch):
        if isinstance(batch, dict):
            target = "labels" if self.targets is None else self.targets
            if target not in batch:
                raise InputError(f"a batch is a dict with keys {sorted(batch)}: no targets field {target!r} "
                                 "(BatchTask(targets=...) names it)")
            names = tuple(k for k in batch if k != target) if self.inputs is None else tuple(self.inputs)
            return "dict", names, target
        if isinstance(batch, (tuple, list)):
            count = len(batch)
            target = count - 1 if self.targets is None else int(self.targets) % count
            names = tuple(i for i in range(count) if i != target) if self.inputs is None else tuple(self.inputs)
            return "tuple", names, target
        raise InputError(f"a batch must be a dict or a tuple of tensors, got {type(batch).__name__}")

    def split(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs packed (b, ...), targets (b, ...)) of one collated batch."""
        kind, names, target = self._keys(batch)
        missing = [n for n in names if (n not in batch if kind == "dict" else not 0 <= n < len(batch))]
        if missing:
            raise InputError(f"a batch lacks the input fields {missing}")
        fields = [self._padded(torch.as_tensor(batch[n]), 0) for n in names]
        if any(f.dim() == 0 for f in fields) or len({len(f) for f in fields}) != 1:
            raise InputError(f"the input fields {list(names)} must all have the example dimension first "
                             f"(shapes {[tuple(f.shape) for f in fields]})")
        layout = (kind, names, tuple(f.shape[1:] for f in fields), tuple(f.dtype for f in fields))
        if self._layout is None:
            self._layout = layout
        elif layout[:2] != self._layout[:2] or layout[2] != self._layout[2]:
            raise InputError(f"batches differ in their fields or per-example shapes ({layout[1:3]} against "
                             f"{self._layout[1:3]}): pad every example to one length (BatchTask(max_length=...) "
                             "right-pads sequences)")
        return self._pack(fields), self._targets(batch, kind)

    def _targets(self, batch, kind) -> torch.Tensor:
        _, _, target = self._keys(batch)
        t = torch.as_tensor(batch[target])
        if t.dim() < 2 or t.is_floating_point():  # class labels, regression targets: as they are
            return t
        t = self._padded(t.long(), self.ignore_index).clone()
        mask = self._mask(batch, kind)
        if mask is not None:
            if mask.shape != t.shape:
                raise InputError(f"attention mask of shape {tuple(mask.shape)} does not match the token targets "
                                 f"{tuple(t.shape)}")
            t[mask == 0] = self.ignore_index
        if self.shift_labels:  # position t predicts token t + 1; the last predicts nothing
            t = torch.cat([t[:, 1:], t.new_full((len(t), 1), self.ignore_index)], 1)
        return t

    def _mask(self, batch, kind):
        key = self.attention_mask
        if key is None:
            return None
        if kind == "dict":
            found = key in batch
        else:
            found = isinstance(key, int) and -len(batch) <= key < len(batch)
        return self._padded(torch.as_tensor(batch[key]), 0) if found else None

    def _padded(self, field: torch.Tensor, value: int) -> torch.Tensor:
        """An integer sequence field (b, ..., T) right-padded to ``max_length`` with ``value``."""
        if self.max_length is None or field.dim() < 2 or field.is_floating_point():
            return field
        extra = self.max_length - field.shape[-1]
        if extra < 0:
            raise InputError(f"a batch has sequences of {field.shape[-1]} positions, more than "
                             f"max_length={self.max_length}")
        return torch.nn.functional.pad(field, (0, extra), value=value) if extra else field

    # ----------------------------------------------------------------- packing
    @staticmethod
    def _pack(fields) -> torch.Tensor:
        """One (b, total) tensor of the fields flattened per example: integers stay exact as
        int64; any floating field makes it float64 (the Problem casts it to the model's dtype)."""
        flat = [f.reshape(len(f), -1) for f in fields]
        dtype = torch.int64 if all(not f.is_floating_point() for f in flat) else torch.float64
        return torch.cat([f.to(dtype) for f in flat], 1)

    def unpack(self, packed: torch.Tensor):
        """The fields of a packed batch, shaped and typed as the data gave them (a dict or a tuple)."""
        if self._layout is None:
            raise InputError("BatchTask.unpack before any batch was split: the field layout is unknown")
        kind, names, shapes, dtypes = self._layout
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        parts = packed.split(sizes, 1)
        fields = [p.reshape(len(packed), *s).to(packed.dtype if d.is_floating_point else d)
                  for p, s, d in zip(parts, shapes, dtypes)]
        return dict(zip(names, fields)) if kind == "dict" else tuple(fields)

    # ------------------------------------------------------------------- model
    def run_model(self, model: nn.Module, fields):
        """The model's outputs on the fields: ``run(model, fields)`` if given, else ``model(**fields)``
        (dict) or ``model(*fields)`` (tuple); an output object's ``logits``, a tuple's first item."""
        if self.run is not None:
            out = self.run(model, fields)
        else:
            out = model(**fields) if isinstance(fields, dict) else model(*fields)
        if hasattr(out, "logits"):
            out = out.logits
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


class TaskModel(nn.Module):
    """The user's model behind a :class:`BatchTask`: takes the packed inputs, returns the model's
    outputs. Its parameters are the user's model's (``model.`` prefixed), shared, not copied."""

    def __init__(self, model: nn.Module, task: BatchTask):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, packed):
        return self.task.run_model(self.model, self.task.unpack(packed))


def batch_task_for(sample) -> BatchTask | None:
    """The default BatchTask for data whose items look like ``sample`` (None: (input, target) pairs)."""
    if isinstance(sample, dict) or (isinstance(sample, (tuple, list)) and len(sample) != 2):
        return BatchTask()
    return None

