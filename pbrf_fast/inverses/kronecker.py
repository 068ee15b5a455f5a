"""``kronecker``: a K-FAC / EK-FAC operator's own exact inverse, two small matrix
products per layer in its eigenbasis (the curvature supplies ``inverse_matvec``)."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..errors import InputError
from .common import SolveResult, check_columns, finish, resolve_tol
from .options import InverseOptions, option


@dataclasses.dataclass
class KroneckerOptions(InverseOptions):
    """Options of the Kronecker inverse."""

    tol: float | None = option(None, "relative residual a column must meet to count as converged (with "
                                     "compute_residual; None: 1e-6 in float64, 1e-4 in float32)", cli=False)
    compute_residual: bool = option(False, "measure the residual against the Kronecker operator itself", cli=False)


def kronecker_inverse(op, B: torch.Tensor, options: KroneckerOptions) -> SolveResult:
    """The exact inverse of a K-FAC / EK-FAC operator applied to B."""
    if not callable(getattr(op, "inverse_matvec", None)):
        raise InputError("solver 'kronecker' needs a K-FAC / EK-FAC operator (curvature='kfac' or 'ekfac')")
    start = time.perf_counter()
    B2 = check_columns(op, B)
    tol = resolve_tol(options.tol, B2.dtype)
    X2 = op.inverse_matvec(B2)
    info = {"factor_seconds": dict(op.factors.seconds), "coverage": op.coverage,
            "pseudo_gradients": op.factors.pseudo_gradients}
    return finish(op, X2, B, B2, op.kind, 0, start, options.compute_residual, tol, info)
