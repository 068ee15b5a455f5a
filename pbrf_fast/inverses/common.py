"""What every inverse shares: the :class:`SolveResult` it returns, the checks of its
right-hand side and options, and the true-residual finish that gives ``converged`` one
meaning for every method."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..errors import InputError, InputTypeError, NonFiniteError

__all__ = ["SolveResult", "default_tol", "resolve_tol", "check_columns", "positive_number", "integer_option", "relative_residuals", "finish",
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

    @classmethod
    def combine(cls, results: list["SolveResult"]) -> "SolveResult":
        """One result for a call that solved its columns in several blocks (self-influence by
        chunks): per-column iterations, residuals and flags in column order, the total time;
        the solutions are not kept (the caller consumed each block)."""
        if len(results) == 1:
            return results[0]

        def joined(name):
            parts = [getattr(r, name) for r in results]
            if any(p is None for p in parts):
                return None
            return torch.cat([torch.as_tensor(p).reshape(-1).expand(_columns_of(r)) for p, r in zip(parts, results)])

        return cls(torch.empty(0), results[0].method, joined("iterations"), joined("residual_norms"),
                   joined("converged"), sum(r.time for r in results),
                   {"blocks": len(results), "columns": sum(_columns_of(r) for r in results)})

    def __repr__(self) -> str:
        res = None if self.residual_norms is None else float(self.residual_norms.max())
        conv = None if self.converged is None else f"{int(self.converged.sum())}/{self.converged.numel()}"
        return (f"SolveResult(method={self.method!r}, shape={tuple(self.solution.shape)}, "
                f"max_rel_residual={res}, converged={conv}, time={self.time:.3g}s)")


def _columns_of(result: SolveResult) -> int:
    for value in (result.residual_norms, result.converged, result.iterations):
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            return value.numel()
    shape = result.solution.shape
    return shape[1] if len(shape) == 2 else 1


def default_tol(dtype: torch.dtype) -> float:
    """The relative residual a solve can promise in ``dtype``: 1e-6 in float64; 1e-4 below,
    where float32 round-off in the operator products alone leaves residuals near 1e-6-1e-5 on
    ordinary networks, so a tighter default could never report convergence."""
    return 1e-6 if dtype == torch.float64 else 1e-4


def resolve_tol(tol, dtype: torch.dtype) -> float:
    """A tolerance option: the dtype's :func:`default_tol` for None, else finite and > 0."""
    return default_tol(dtype) if tol is None else positive_number("tol", tol)


def check_memory(method: str, needed_bytes: int, what: str, device) -> None:
    """Refuse, by name and size, a dense solve whose matrices cannot fit the memory free now
    (an explicit method; ``auto`` sizes its choice): not an allocator error asking for terabytes."""
    from .output_space import _free_bytes

    free = _free_bytes(torch.device(device))
    if free is not None and needed_bytes > free:
        raise InputError(f"solver {method!r}: {what} need {needed_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
                         "are free; use solver='pcg' (or 'auto', which sizes its choice)")


def check_columns(op, B: torch.Tensor, name: str = "right-hand side B") -> torch.Tensor:
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
    info["tol"] = tol  # the tolerance the flags were judged by (a dtype's default resolved)
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

            def set_postfix_str(self, text):
                pass

            def close(self):
                pass

        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)

