"""What every inverse shares: the :class:`SolveResult` it returns, the checks of its
right-hand side and options, and the true-residual finish that gives ``converged`` one
meaning for every method."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..errors import InputError, InputTypeError, NonFiniteError

__all__ = ["SolveResult", "check_columns", "positive_number", "integer_option", "relative_residuals", "finish",
           "progress_bar"]


@dataclasses.dataclass
class SolveResult:
    """A solution block and how it was obtained.

    ``solution`` has the shape of the right-hand side. ``residual_norms`` are
    relative, ``||A x - b|| / ||b||`` per column, measured with the full
    operator when ``compute_residual`` was on (else the solver's own estimate,
    or None).
    """

    solution: torch.Tensor
    method: str
    iterations: torch.Tensor | int
    residual_norms: torch.Tensor | None
    converged: torch.Tensor | None
    time: float
    info: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        res = None if self.residual_norms is None else float(self.residual_norms.max())
        conv = None if self.converged is None else f"{int(self.converged.sum())}/{self.converged.numel()}"
        return (f"SolveResult(method={self.method!r}, shape={tuple(self.solution.shape)}, "
                f"max_rel_residual={res}, converged={conv}, time={self.time:.3g}s)")


def check_columns(op: CurvatureOperator, B: torch.Tensor, name: str = "right-hand side B") -> torch.Tensor:
    """``B`` as a finite (d, m) block; a named error for anything else."""
    try:
        B2 = op.check_vectors(B)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    if not torch.isfinite(B2).all():
        bad = (~torch.isfinite(B2)).any(0).nonzero().reshape(-1).tolist()
        raise NonFiniteError(f"{name} has NaN/Inf in columns {bad[:10]}")
    return B2


def positive_number(name: str, value) -> float:
    """A float option that must be finite and > 0 (a tolerance, a scale)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputTypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{name} must be finite and > 0, got {value!r}")
    return number


def integer_option(name: str, value, minimum: int = 1) -> int:
    """An integer option that must be >= minimum (a depth, a batch size)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def relative_residuals(op, X2, B2) -> torch.Tensor:
    r = (op.matvec(X2) - B2).norm(dim=0)
    b = B2.norm(dim=0)
    return torch.where(b > 0, r / b.clamp_min(torch.finfo(b.dtype).tiny), r)


def finish(op, X2, B, B2, method, iterations, start, compute_residual, tol, info,
            residual_norms=None, converged=None):
    if not torch.isfinite(X2).all():
        bad = (~torch.isfinite(X2)).any(0).nonzero().reshape(-1).tolist()
        raise NonFiniteError(f"{method}: the solution has NaN/Inf in columns {bad[:10]} (the operator "
                             "produced non-finite values; check the model, the data and the damping)")
    if compute_residual:
        # converged always means the true residual met tol (the solver's own estimate,
        # e.g. CG's recurrence, can drift from it): one meaning for every method.
        residual_norms = relative_residuals(op, X2, B2)
        if converged is not None:
            info["solver_converged"] = converged
        converged = residual_norms <= tol
    return SolveResult(X2.reshape(B.shape), method, iterations, residual_norms, converged,
                       time.perf_counter() - start, info)



def progress_bar(total, desc, enabled):
    if not enabled:
        class _Silent:
            def update(self, k):
                pass

            def close(self):
                pass

        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)

