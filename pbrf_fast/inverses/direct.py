"""``direct``: the dense solve through the cached float64 eigendecomposition of the
operator's data term; every right-hand side and every damping reuses it."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..errors import IndefiniteOperatorError, InputError
from .common import SolveResult, check_columns, check_memory, finish, resolve_tol
from .options import InverseOptions, option

# Above this many parameters a dense d x d factorisation stops being cheap.
DIRECT_MAX_DIM = 6000


@dataclasses.dataclass
class DirectOptions(InverseOptions):
    """Options of the ``direct`` solve."""

    tol: float | None = option(None, "relative residual ||A x - b|| / ||b|| a column must meet to count as "
                                     "converged (None: 1e-6 in float64, 1e-4 in float32)")
    compute_residual: bool = option(True, "measure the true residual with one more operator product", cli=False)


# ---------------------------------------------------------------------- direct
def direct(op, B: torch.Tensor, options: DirectOptions) -> SolveResult:
    """Dense solve through the cached float64 eigendecomposition of the data term."""
    start = time.perf_counter()
    B2 = check_columns(op, B)
    tol = resolve_tol(options.tol, B2.dtype)
    if op.dim > 4 * DIRECT_MAX_DIM:
        raise InputError(f"direct solver needs a dense {op.dim}x{op.dim} matrix; use method='cg' or 'lissa'")
    if "eigh" not in op._cache:  # a cached factorisation needs no new memory
        check_memory("direct", 3 * 8 * op.dim ** 2, f"d = {op.dim} parameters' dense float64 matrices", op.device)
    evals, evecs = op.eigh_data()
    shifted = evals + op.shift
    smallest = float(shifted.min())
    if smallest <= 0:
        raise IndefiniteOperatorError(
            f"damped operator is singular or indefinite (smallest eigenvalue {smallest:.3g}); "
            "increase damping, or use curvature='gnh'"
        )
    coeff = evecs.T @ B2.to(evecs.dtype)
    X2 = (evecs @ (coeff / shifted.unsqueeze(1))).to(B2.dtype)
    info = {"smallest_eigenvalue": smallest, "largest_eigenvalue": float(shifted.max())}
    return finish(op, X2, B, B2, "direct", 0, start, options.compute_residual, tol, info)


