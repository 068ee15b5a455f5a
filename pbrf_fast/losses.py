"""Loss specifications in output space.

Every quantity the influence engine needs from a loss is a function of the
network outputs ``y`` (shape ``(b, C)``) and targets ``t`` only:

* ``value(y, t)``    per-example loss, shape ``(b,)``
* ``grad(y, t)``     dL/dy, shape ``(b, C)``
* ``hvp(y, t, u)``   output Hessian times ``u`` where ``u`` is ``(..., b, C)``
                     (extra leading dims are independent vectors)
* ``bregman(y, y_ref, t)``  Bregman divergence of L between two outputs
                     (Eq. 9 of the paper), shape ``(b,)``

Keeping them in output space is what makes the Gauss-Newton product cheap
(jvp -> output Hessian -> vjp) and lets compiled kernels replace ``hvp`` and
``bregman`` without touching the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError, NonConvexLossError

__all__ = [
    "Loss",
    "MSELoss",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "AutogradLoss",
    "SequenceCrossEntropyLoss",
    "get_loss",
]


class Loss:
    """Base class: a per-example loss of network outputs.

    Subclasses set ``name`` and ``convex_in_outputs``. ``kernel_kind`` names the
    compiled output-Hessian / Bregman kernels that implement this loss (None:
    autograd fallback).
    """

    name: str = "loss"
    convex_in_outputs: bool = True
    kernel_kind: str | None = None

    def prepare_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """Bring targets to the layout the other methods expect (validated)."""
        return targets

    def value(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hvp(self, y: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bregman(self, y: torch.Tensor, y_ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L(y) - L(y_ref) - dL/dy(y_ref)^T (y - y_ref), per example."""
        diff = (y - y_ref).reshape(y.shape[0], -1)
        linear = (self.grad(y_ref, t).reshape(y.shape[0], -1) * diff).sum(-1)
        return self.value(y, t) - self.value(y_ref, t) - linear

    def require_convex(self, purpose: str = "the Gauss-Newton Hessian") -> None:
        if not self.convex_in_outputs:
            raise NonConvexLossError(
                f"loss {self.name!r} is not convex in the network outputs, so {purpose} "
                "is not positive semi-definite; use curvature='hessian' with enough damping, "
                "or a convex loss (mse, cross_entropy, bce)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _output_hessian_product(kind: str, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # Imported lazily: the kernels package pulls in the compiled backends.
    from .kernels import output_hessian_product

    return output_hessian_product(kind, y, u)


def _as_float_targets(targets: torch.Tensor, num_outputs: int, name: str) -> torch.Tensor:
    if not torch.is_floating_point(targets):
        targets = targets.to(torch.get_default_dtype())
    if targets.dim() == 1 and num_outputs == 1:
        targets = targets.unsqueeze(-1)
    if targets.dim() != 2 or targets.shape[-1] != num_outputs:
        raise InputError(
            f"{name} targets must have shape (n, {num_outputs}) to match the model outputs "
            f"(or (n,) for one output); got {tuple(targets.shape)}"
        )
    return targets


class MSELoss(Loss):
    """Half squared error, summed over outputs: L = 1/2 ||y - t||^2.

    The 1/2 makes the output Hessian the identity (DESIGN.md).
    """

    name = "mse"
    kernel_kind = "mse"

    def prepare_targets(self, targets, num_outputs):
        return _as_float_targets(targets, num_outputs, "mse")

    def value(self, y, t):
        return 0.5 * (y - t.to(y.dtype)).pow(2).sum(-1)

    def grad(self, y, t):
        return y - t.to(y.dtype)

    def hvp(self, y, t, u):
        return u.clone()

    def bregman(self, y, y_ref, t):
        return 0.5 * (y - y_ref).pow(2).sum(-1)


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy on logits, with integer class or soft targets.

    Output Hessian diag(p) - p p^T, applied without forming it.
    """

    name = "cross_entropy"
    kernel_kind = "cross_entropy"

    def prepare_targets(self, targets, num_outputs):
        if torch.is_floating_point(targets):
            if targets.dim() == 1:  # float class labels, the usual slip: say what is expected
                raise InputError("cross_entropy: integer class labels expected (n,), got float targets; convert "
                                 f"them with .long(), or give soft targets of shape (n, {num_outputs})")
            if targets.dim() != 2 or targets.shape[-1] != num_outputs:
                raise InputError(
                    f"cross_entropy soft targets must have shape (n, {num_outputs}); "
                    f"got {tuple(targets.shape)}"
                )
            # a distribution per row: the value and gradient assume sum_c t_c = 1
            if targets.numel():
                if not bool(torch.isfinite(targets).all()) or float(targets.min()) < 0:
                    raise InputError("cross_entropy soft targets must be finite and >= 0 (a distribution per row)")
                rows = targets.sum(-1)
                tol = 1e-6 if targets.dtype == torch.float64 else 1e-4
                worst = float((rows - 1).abs().max())
                if worst > tol:
                    raise InputError(f"cross_entropy soft target rows must sum to 1; a row sums to "
                                     f"{float(rows[(rows - 1).abs().argmax()]):.6g}")
            return targets
        if targets.dim() != 1:
            raise InputError(
                f"cross_entropy class targets must have shape (n,); got {tuple(targets.shape)}"
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_outputs):
            raise InputError(
                f"cross_entropy class targets must lie in [0, {num_outputs}); "
                f"got range [{int(targets.min())}, {int(targets.max())}]"
            )
        return targets.long()

    def _soft(self, y, t):
        if torch.is_floating_point(t):
            return t.to(y.dtype)
        # scatter rather than one_hot: one_hot checks the class range, which
        # torch.func.vmap cannot trace.
        return torch.zeros_like(y).scatter(-1, t.unsqueeze(-1), 1.0)

    def value(self, y, t):
        if torch.is_floating_point(t):
            return torch.logsumexp(y, -1) - (t.to(y.dtype) * y).sum(-1)
        return torch.logsumexp(y, -1) - y.gather(-1, t.unsqueeze(-1)).squeeze(-1)

    def grad(self, y, t):
        return torch.softmax(y, -1) - self._soft(y, t)

    def hvp(self, y, t, u):
        return _output_hessian_product(self.kernel_kind, y, u)

    def bregman(self, y, y_ref, t):
        # Targets cancel: the loss is log-sum-exp minus a term linear in y.
        p_ref = torch.softmax(y_ref, -1)
        return torch.logsumexp(y, -1) - torch.logsumexp(y_ref, -1) - (p_ref * (y - y_ref)).sum(-1)


class BCEWithLogitsLoss(Loss):
    """Sigmoid binary cross-entropy on logits, summed over outputs.

    Output Hessian diag(p (1 - p)).
    """

    name = "bce"
    kernel_kind = "bce"

    def prepare_targets(self, targets, num_outputs):
        targets = _as_float_targets(targets, num_outputs, "bce")
        if targets.numel() and (targets.min() < 0 or targets.max() > 1):
            raise InputError("bce targets must lie in [0, 1]")
        return targets

    def value(self, y, t):
        return (F.softplus(y) - t.to(y.dtype) * y).sum(-1)

    def grad(self, y, t):
        return torch.sigmoid(y) - t.to(y.dtype)

    def hvp(self, y, t, u):
        return _output_hessian_product(self.kernel_kind, y, u)

    def bregman(self, y, y_ref, t):
        p_ref = torch.sigmoid(y_ref)
        return (F.softplus(y) - F.softplus(y_ref) - p_ref * (y - y_ref)).sum(-1)


class SequenceCrossEntropyLoss(Loss):
    """Token-level cross-entropy of a sequence model, one value per sequence.

    Outputs arrive flattened as (b, T * vocab); targets are token ids (b, T), where
    ``ignore_index`` (default -100, the Hugging Face convention: padding, the prompt, the last
    position of a shifted sequence) marks positions that are not scored. ``reduction``: ``"mean"``
    over each sequence's scored tokens (a sequence without any scores 0) or their ``"sum"``.
    ``vocab``: the vocabulary size, or None to read it from the outputs (T * vocab of them).
    With weights w_t (1 / scored tokens for the mean, 1 for the sum; 0 where ignored) the loss is
    sum_t w_t CE(y_t, t_t) and its output Hessian block diagonal, w_t (diag(p_t) - p_t p_t^T).
    """

    name = "sequence_cross_entropy"
    kernel_kind = None
    REDUCTIONS = ("mean", "sum")

    def __init__(self, vocab: int | None = None, reduction: str = "mean", ignore_index: int = -100):
        if reduction not in self.REDUCTIONS:
            raise InputError(f"reduction must be one of {self.REDUCTIONS}, got {reduction!r}")
        self.vocab = None if vocab is None else int(vocab)
        self.reduction, self.ignore_index = reduction, int(ignore_index)
        self.token = CrossEntropyLoss()

    def prepare_targets(self, targets, num_outputs):
        length = targets.shape[1] if targets.dim() == 2 else 0
        vocab = self.vocab or (num_outputs // length if length else 0)
        if torch.is_floating_point(targets) or targets.dim() != 2 or length * vocab != num_outputs:
            raise InputError(f"sequence_cross_entropy targets must be token ids of shape (n, T) with "
                             f"T * vocab = {num_outputs} outputs; got {tuple(targets.shape)}")
        scored = targets[targets != self.ignore_index]
        if scored.numel() and (scored.min() < 0 or scored.max() >= vocab):
            raise InputError(f"token ids must lie in [0, {vocab}) or be ignore_index={self.ignore_index}")
        return targets.long()

    def _tokens(self, y, t):
        return y.reshape(y.shape[0], t.shape[1], -1)

    def _weights(self, t, dtype):
        """(b, T): each position's weight in its sequence's loss (0 where ignored)."""
        scored = (t != self.ignore_index).to(dtype)
        if self.reduction == "sum":
            return scored
        return scored / scored.sum(-1, keepdim=True).clamp_min(1)

    def _ids(self, t):
        return t.clamp_min(0) if self.ignore_index < 0 else torch.where(t == self.ignore_index, 0, t)

    def value(self, y, t):
        yt = self._tokens(y, t)
        per_token = torch.logsumexp(yt, -1) - yt.gather(-1, self._ids(t).unsqueeze(-1)).squeeze(-1)
        return (per_token * self._weights(t, y.dtype)).sum(-1)

    def grad(self, y, t):
        yt = self._tokens(y, t)
        onehot = torch.zeros_like(yt).scatter(-1, self._ids(t).unsqueeze(-1), 1.0)
        return ((torch.softmax(yt, -1) - onehot) * self._weights(t, y.dtype).unsqueeze(-1)).reshape(y.shape)

    def hvp(self, y, t, u):
        b, length = y.shape[0], t.shape[1]
        tokens = y.reshape(b * length, -1)
        u_tokens = u.reshape(*u.shape[:-2], b * length, tokens.shape[1])
        product = _output_hessian_product("cross_entropy", tokens, u_tokens)
        return (product * self._weights(t, y.dtype).reshape(b * length, 1)).reshape(u.shape)

    def bregman(self, y, y_ref, t):
        yt, rt = self._tokens(y, t), self._tokens(y_ref, t)
        p_ref = torch.softmax(rt, -1)
        per_token = torch.logsumexp(yt, -1) - torch.logsumexp(rt, -1) - (p_ref * (yt - rt)).sum(-1)
        return (per_token * self._weights(t, y.dtype)).sum(-1)

    def __repr__(self) -> str:
        return (f"SequenceCrossEntropyLoss(vocab={self.vocab}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index})")


class AutogradLoss(Loss):
    """Any per-example loss ``fn(y, t) -> (b,)``; derivatives by torch.func.

    ``convex_in_outputs`` is the caller's promise: the Gauss-Newton operator
    refuses a loss that says it is not convex.
    """

    kernel_kind = None

    def __init__(self, fn, *, name: str = "custom", convex_in_outputs: bool = True):
        self.fn = fn
        self.name = name
        self.convex_in_outputs = convex_in_outputs

    def _single(self, y_row, t_row):
        return self.fn(y_row.unsqueeze(0), t_row.unsqueeze(0)).reshape(())

    def value(self, y, t):
        return self.fn(y, t).reshape(y.shape[0])

    def grad(self, y, t):
        return torch.func.vmap(torch.func.grad(self._single))(y, t)

    def hvp(self, y, t, u):
        lead = u.shape[:-2]
        flat = u.reshape(-1, *y.shape)

        def one_vector(v):
            def row(y_row, t_row, v_row):
                g = torch.func.grad(self._single)
                return torch.func.jvp(lambda yy: g(yy, t_row), (y_row,), (v_row,))[1]

            return torch.func.vmap(row)(y, t, v)

        return torch.stack([one_vector(v) for v in flat]).reshape(*lead, *y.shape)

    def __repr__(self) -> str:
        return f"AutogradLoss(name={self.name!r}, convex_in_outputs={self.convex_in_outputs})"


_LOSSES = {
    "mse": MSELoss,
    "cross_entropy": CrossEntropyLoss,
    "ce": CrossEntropyLoss,
    "bce": BCEWithLogitsLoss,
    "bce_with_logits": BCEWithLogitsLoss,
    "sequence_cross_entropy": SequenceCrossEntropyLoss,   # token-level, vocabulary read from the outputs
    "token_cross_entropy": SequenceCrossEntropyLoss,
}


def get_loss(name: str | Loss) -> Loss:
    """A loss by name (``mse``, ``cross_entropy``/``ce``, ``bce``, ``token_cross_entropy``); a Loss
    passes through."""
    if isinstance(name, Loss):
        return name
    key = str(name).lower()
    if key not in _LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of {sorted(_LOSSES)}")
    return _LOSSES[key]()
