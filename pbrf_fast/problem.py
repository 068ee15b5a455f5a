"""A training problem as functions of one flat parameter vector.

``Problem`` binds a model, a loss and a data set, and exposes

    J(theta) = 1/N sum_i L(f(theta, x_i), t_i) + weight_decay/2 ||theta||^2

together with outputs, per-example losses and per-example gradients, all as
pure functions of a flat ``theta`` of shape ``(d,)``. Curvature operators,
solvers and influence are written against this interface only, so they never
care how the model stores its parameters.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import autodiff
from .errors import (ExamplesInteractWarning, InputError, InputIndexError, InputTypeError,
                     NondeterministicModelError)
from .losses import Loss, get_loss

__all__ = ["Problem", "as_index"]

# Per-example gradient chunks are sized so one chunk holds at most this many
# numbers (~512 MiB in float32): large enough to keep matmuls efficient, small
# enough for 784-1024-1024-10 sized models on a 24 GiB machine.
_MAX_CHUNK_ELEMENTS = 1 << 27


def as_index(idx, n: int, device=None) -> torch.Tensor:
    """Normalise an index to a 1-D long tensor of positions in [0, n).

    Accepts None (all), an int, a slice, a sequence / array / tensor of integers
    (negative ones count from the end), or a boolean mask with one entry per
    example. Floats and masks of the wrong length are refused: silently truncating
    them would pick other examples than the caller meant.
    """
    if idx is None:
        out = torch.arange(n)
    elif isinstance(idx, slice):
        out = torch.arange(n)[idx]
    elif isinstance(idx, bool):
        raise InputTypeError(f"an index must be an integer, a sequence of integers or a boolean mask, got {idx!r}")
    elif isinstance(idx, (int, np.integer)):
        out = torch.tensor([int(idx)])
    else:
        try:
            values = torch.as_tensor(idx)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputTypeError(f"an index must be integers or a boolean mask, got {type(idx).__name__}: {exc}") from None
        if values.numel() == 0:
            out = torch.empty(0, dtype=torch.long)
        elif values.dtype == torch.bool:
            if values.dim() != 1 or len(values) != n:
                raise InputIndexError(f"a boolean mask must have one entry per example ({n}), got shape "
                                 f"{tuple(values.shape)}")
            out = values.nonzero().reshape(-1)
        elif values.is_floating_point() or values.is_complex():
            raise InputTypeError(f"indices must be integers, got {values.dtype} values (e.g. {values.reshape(-1)[0].item()})")
        else:
            out = values.reshape(-1).long()
    if out.numel() and (out.min() < -n or out.max() >= n):
        raise InputIndexError(f"index out of range for {n} training examples (got {int(out.min())}..{int(out.max())})")
    out = torch.where(out < 0, out + n, out)
    return out.to(device) if device is not None else out


def _tensors(value) -> list:
    """Every tensor in a module's inputs or outputs (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to what batching changes in floating point (GEMM blocking), far below what
    dropout or batch statistics change."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tol = 1e-4 if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    return bool((a - b).abs().max() <= tol * (1 + a.abs().max())) if a.numel() else True


def _traced_forward(problem, x):
    """(outputs, [(module name, type, inputs, outputs)] in call order) of one forward pass."""
    calls, handles = [], []
    for name, module in problem.model.named_modules():
        def hook(module, inputs, output, name=name):
            calls.append((name or "<model>", type(module).__name__, _tensors(inputs), _tensors(output)))
        handles.append(module.register_forward_hook(hook))
    try:
        return problem.forward(problem.theta, x), calls
    finally:
        for handle in handles:
            handle.remove()


def _first_divergence(calls_a, calls_b, rows) -> str:
    """' in module NAME (TYPE)': the first module called with the same inputs (``rows`` of run
    a's tensors against run b's) whose outputs differ; '' if none is found."""
    for (name, kind, in_a, out_a), (_, _, in_b, out_b) in zip(calls_a, calls_b):
        same_in = len(in_a) == len(in_b) and all(_close(rows(a), b) for a, b in zip(in_a, in_b)
                                                 if a.dim() and b.dim())
        same_out = len(out_a) == len(out_b) and all(_close(rows(a), b) for a, b in zip(out_a, out_b)
                                                    if a.dim() and b.dim())
        if same_in and not same_out:
            return f" first in module {name!r} ({kind}), whose outputs differ for the same inputs"
    return ""


def _first_non_finite(v: torch.Tensor) -> str:
    """Where the first NaN / Inf row of ``v`` is, for an error message."""
    bad = ~torch.isfinite(v.reshape(len(v), -1)).all(1)
    return f" (row {int(bad.nonzero()[0])} of shape {tuple(v.shape)})" if bool(bad.any()) else ""


class Problem:
    """Model + loss + training data, as functions of a flat parameter vector.

    Parameters
    ----------
    model:
        An ``nn.Module`` mapping a batch of inputs to outputs ``(b, C)`` (or
        ``(b,)`` for one output). It is evaluated in eval mode: the curvature
        of a network whose batch-norm statistics move with the batch is not a
        fixed linear operator.
    loss:
        A :class:`~pbrf_fast.losses.Loss` or its name.
    inputs, targets:
        Training data with the example index first.
    weight_decay:
        L2 strength folded into J (its Hessian is ``weight_decay * I``).
    batch_size:
        Examples per chunk when an operation runs over the whole set.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss | str,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weight_decay: float = 0.0,
        batch_size: int = 512,
    ):
        self.model = model.eval()
        self.loss = get_loss(loss)
        self.weight_decay = float(weight_decay)
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise InputError(f"weight_decay must be finite and >= 0, got {weight_decay}")
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)

        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise InputError("model has no trainable parameters")
        self.param_names = [k for k, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.param_sizes = [p.numel() for _, p in named]
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise InputError(f"all parameters must share one dtype and device; got {dtypes}, {devices}")
        self.dtype = dtypes.pop()
        self.device = devices.pop()
        if self.device.type == "meta":
            raise InputError("model parameters are on the meta device (shapes without values); "
                             "materialise and load them first (model.to_empty(device=...), load_state_dict)")
        if not self.dtype.is_floating_point:
            raise InputError(f"model parameters must be floating point, got {self.dtype}")
        self.buffers = {k: b for k, b in model.named_buffers()}
        self._theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        if not torch.isfinite(self._theta).all():
            raise InputError("model parameters contain NaN or Inf")
        self.version = 0  # bumped when theta changes, so cached curvature is dropped

        self.inputs = self._check_inputs(inputs, "inputs")
        # the probes consume no randomness of the caller's (a random model draws in them)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.num_outputs = self._probe_outputs()
            self._check_deterministic()
        self.targets = self._check_targets(targets, len(self.inputs))

    def _probe_outputs(self) -> int:
        """Run the model on one example: it must give (1, ..., C) outputs, and any failure
        is reported as a problem with ``inputs`` rather than a raw error from inside torch."""
        first = self.inputs[:1]
        try:
            with torch.no_grad():
                out = self.forward(self._theta, first)
        except Exception as exc:  # the model's own error, whatever it is
            if self._runs_on_two():
                raise NondeterministicModelError(
                    f"the model runs on a batch of two examples but not on one ({type(exc).__name__}: {exc}): "
                    "the examples of a batch interact (batch norm by batch statistics?). Influence needs each "
                    "example's outputs to depend on it alone: call model.eval(), and in forward pass "
                    "training=self.training to F.batch_norm") from exc
            raise InputError(f"the model cannot run on inputs of per-example shape {tuple(first.shape[1:])} "
                             f"and dtype {first.dtype}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"the model maps a batch of one input (shape {tuple(first.shape)}) to outputs of "
                             f"shape {shape}; expected (1, C): inputs need a leading example dimension "
                             "(e.g. x.reshape(-1, 1) for one feature per example)")
        return out.shape[-1]

    def _runs_on_two(self) -> bool:
        if len(self.inputs) < 2:
            return False
        saved = {k: b.clone() for k, b in self.buffers.items()}
        try:
            with torch.no_grad():
                self.forward(self._theta, self.inputs[:2])
            return True
        except Exception:  # fails on two as well: the inputs are wrong, not the batch
            return False
        finally:
            with torch.no_grad():
                for k, b in self.buffers.items():
                    b.copy_(saved[k])

    def _check_deterministic(self) -> None:
        """Influence differentiates f(theta, x_i), one fixed function of each example: refuse,
        naming the module, a forward pass that is random (dropout active in ``forward``:
        ``F.dropout`` defaults to ``training=True``) or couples the examples of a batch (batch
        norm by batch statistics), before a vmap error deep in a product says neither. Two
        examples are run twice together and once each; buffers and the RNG are restored."""
        x = self.inputs[:2]
        saved = {k: b.clone() for k, b in self.buffers.items()}
        try:
            with torch.no_grad():
                first, second = _traced_forward(self, x), _traced_forward(self, x)
                singles = [_traced_forward(self, x[i:i + 1]) for i in range(len(x))] if len(x) > 1 else []
        finally:
            with torch.no_grad():
                for k, b in self.buffers.items():
                    b.copy_(saved[k])
        if not _close(first[0], second[0]):
            where = _first_divergence(first[1], second[1], lambda a: a)
            raise NondeterministicModelError(
                f"the model is random: two forward passes on the same inputs differ{where}. Influence needs "
                "a deterministic function of each example: call model.eval(), and in forward pass "
                "training=self.training to F.dropout (it defaults to training=True)")
        for i, single in enumerate(singles):
            if not _close(first[0][i:i + 1], single[0]):
                where = _first_divergence(first[1], single[1], lambda a: a[i:i + 1])
                # a warning, not an error: the batch objective's curvature is still one operator
                warnings.warn(
                    f"the examples of a batch interact in the forward pass: example {i}'s outputs differ alone "
                    f"and in a batch{where}. Influence needs each example's outputs to depend on it alone: "
                    "call model.eval() (batch norm then uses its running statistics), and in forward pass "
                    "training=self.training to F.batch_norm / F.instance_norm", ExamplesInteractWarning,
                    stacklevel=4)
                return

    # ----------------------------------------------------------------- set-up
    @classmethod
    def from_dataset(cls, model, loss, dataset, **kwargs) -> "Problem":
        """Build from a map-style ``Dataset`` of ``(input, target)`` pairs."""
        items = [dataset[i] for i in range(len(dataset))]
        if not items:
            raise InputError("dataset is empty")
        inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
        targets = torch.stack([torch.as_tensor(t) for _, t in items])
        return cls(model, loss, inputs, targets, **kwargs)

    def _check_inputs(self, x: torch.Tensor, what: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() < 1 or len(x) == 0:
            raise InputError(f"{what} must have a leading example dimension and at least one example")
        if torch.is_floating_point(x):
            x = x.to(device=self.device, dtype=self.dtype)
            if not torch.isfinite(x).all():
                raise InputError(f"{what} contain NaN or Inf{_first_non_finite(x)}")
        else:
            x = x.to(self.device)
        return x

    def _check_targets(self, t: torch.Tensor, n: int, what: str = "targets") -> torch.Tensor:
        t = torch.as_tensor(t).to(self.device)
        if len(t) != n:
            raise InputError(f"{what} have {len(t)} rows but inputs have {n}")
        if torch.is_floating_point(t):
            t = t.to(self.dtype)
            if not torch.isfinite(t).all():
                raise InputError(f"{what} contain NaN or Inf{_first_non_finite(t)}")
        return self.loss.prepare_targets(t, self.num_outputs)

    def check_data(self, inputs, targets, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Validate held-out data (e.g. test points; ``split`` names them in errors) against the
        training layout."""
        x = self._check_inputs(inputs, f"{split} inputs")
        if x.shape[1:] != self.inputs.shape[1:]:
            raise InputError(
                f"{split} inputs have per-example shape {tuple(x.shape[1:])} (shape {tuple(x.shape)}), "
                f"training inputs {tuple(self.inputs.shape[1:])}"
            )
        return x, self._check_targets(targets, len(x), f"{split} targets")

    # ------------------------------------------------------------- parameters
    @property
    def n(self) -> int:
        return len(self.inputs)

    @property
    def dim(self) -> int:
        return self._theta.numel()

    @property
    def param_ranges(self) -> dict[str, tuple[int, int]]:
        """Each trainable parameter's slice ``(lo, hi)`` of the flat theta, by name."""
        ranges, start = {}, 0
        for name, size in zip(self.param_names, self.param_sizes):
            ranges[name] = (start, start + size)
            start += size
        return ranges

    @property
    def theta(self) -> torch.Tensor:
        """The current flat parameters (a copy is not made: do not modify in place)."""
        return self._theta

    def set_theta(self, theta: torch.Tensor) -> None:
        """Replace the parameters (also written back into the model)."""
        theta = self._check_theta(theta).detach().clone()
        self._theta = theta
        self.version += 1
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, value in self.unflatten(theta).items():
                params[name].copy_(value)

    def _check_theta(self, theta: torch.Tensor) -> torch.Tensor:
        if theta.shape != (self.dim,):
            raise InputError(f"theta must have shape ({self.dim},), got {tuple(theta.shape)}")
        if theta.dtype != self.dtype or theta.device != self.device:
            raise InputError(
                f"theta must be {self.dtype} on {self.device}, got {theta.dtype} on {theta.device}"
            )
        return theta

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector (or of its last dim) shaped like the parameters."""
        chunks = torch.split(theta, self.param_sizes, dim=-1)
        lead = theta.shape[:-1]
        return {
            name: c.reshape(*lead, *shape)
            for name, c, shape in zip(self.param_names, chunks, self.param_shapes)
        }

    def flatten(self, tensors: Sequence[torch.Tensor] | dict) -> torch.Tensor:
        if isinstance(tensors, dict):
            tensors = [tensors[k] for k in self.param_names]
        return torch.cat([t.reshape(-1) for t in tensors])

    # -------------------------------------------------------------- functions
    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Network outputs f(theta, x), always shaped (b, C)."""
        out = torch.func.functional_call(self.model, (self.unflatten(theta), self.buffers), (x,))
        return out.reshape(out.shape[0], -1)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index(idx, self.n, self.device)
        return self.inputs[idx], self.targets[idx]

    def batches(self, idx=None, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """Index chunks covering ``idx`` (default: every training example)."""
        idx = as_index(idx, self.n)
        step = batch_size or self.batch_size
        for start in range(0, len(idx), step):
            yield idx[start : start + step]

    def outputs(self, theta=None, idx=None) -> torch.Tensor:
        theta = self._theta if theta is None else theta
        with torch.no_grad():
            return torch.cat([self.forward(theta, self.batch(b)[0]) for b in self.batches(idx)])

    def example_losses(self, theta, x, t) -> torch.Tensor:
        """Per-example losses of a batch, differentiable in theta."""
        return self.loss.value(self.forward(theta, x), t)

    def losses(self, theta=None, idx=None) -> torch.Tensor:
        theta = self._theta if theta is None else theta
        with torch.no_grad():
            return torch.cat([self.example_losses(theta, *self.batch(b)) for b in self.batches(idx)])

    def objective(self, theta=None) -> torch.Tensor:
        """J(theta): mean training loss plus weight_decay/2 ||theta||^2."""
        theta = self._theta if theta is None else theta
        return self.losses(theta).mean() + 0.5 * self.weight_decay * theta.pow(2).sum()

    def gradient(self, theta=None) -> torch.Tensor:
        """dJ/dtheta over the whole training set (chunked)."""
        theta = self._theta if theta is None else theta
        total = torch.zeros_like(theta)
        for b in self.batches():
            x, t = self.batch(b)
            total += torch.func.grad(lambda th: self.example_losses(th, x, t).sum())(theta)
        return total / self.n + self.weight_decay * theta

    def per_example_gradients(self, x, t, theta=None) -> torch.Tensor:
        """Rows dL(f(theta, x_i), t_i)/dtheta for a batch, shape (b, d).

        No weight decay: it belongs to J, not to any one example's loss.
        """
        theta = self._theta if theta is None else theta

        def one(th, x_row, t_row):
            return self.example_losses(th, x_row.unsqueeze(0), t_row.unsqueeze(0)).sum()

        # vmap over examples where torch.func runs the model; a batched backward pass where it
        # does not (GRU / LSTM, custom Functions): the same rows, the examples being independent
        return autodiff.per_example_gradients(one, lambda th: self.example_losses(th, x, t), theta, x, t)

    def gradient_chunk_size(self, requested: int | None = None) -> int:
        """Rows per per-example-gradient chunk that fit the memory cap."""
        cap = max(1, _MAX_CHUNK_ELEMENTS // max(self.dim, 1))
        return max(1, min(requested or self.batch_size, cap))

    def training_gradients(self, idx=None, chunk_size: int | None = None):
        """Yield ``(index_chunk, gradients (k, d))`` over training examples."""
        for b in self.batches(idx, self.gradient_chunk_size(chunk_size)):
            yield b, self.per_example_gradients(*self.batch(b))

    def __repr__(self) -> str:
        return (
            f"Problem(n={self.n}, d={self.dim}, outputs={self.num_outputs}, loss={self.loss.name}, "
            f"weight_decay={self.weight_decay}, dtype={self.dtype}, device={self.device})"
        )
