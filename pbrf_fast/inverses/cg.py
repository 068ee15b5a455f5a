"""``cg``: conjugate gradients on every column at once, each column with its own step
sizes and relative tolerance (a converged column stops costing products). The same loop
takes a preconditioner for ``pcg`` (:mod:`.pcg`)."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..errors import IndefiniteOperatorError, InputError, NonFiniteError
from .common import SolveResult, check_columns, finish, integer_option, progress_bar, resolve_tol
from .options import InverseOptions, option


@dataclasses.dataclass
class CGOptions(InverseOptions):
    """Options of block conjugate gradients."""

    tol: float | None = option(None, "relative residual ||A x - b|| / ||b|| at which a column stops "
                                     "(None: 1e-6 in float64, 1e-4 in float32)")
    max_iter: int | None = option(None, "iterations at most (None: 10 x the number of parameters)",
                                  flags=("--max-iter", "--cg-iters"))
    x0: object = option(None, "warm start, the right-hand side's shape", cli=False)
    compute_residual: bool = option(True, "measure the true residual with one more operator product", cli=False)
    progress: bool = option(False, "show a progress bar over the iterations", cli=False)


# -------------------------------------------------------------------------- cg
def conjugate_gradient(op, B: torch.Tensor, options: CGOptions, preconditioner=None) -> SolveResult:
    """CG on every column at once, stopping each column at ``||r|| <= tol ||b||``.

    Columns are independent CG runs that share operator products: only the
    still-active columns go through the network each iteration.
    ``preconditioner``: None, or a function M(R) ~ op^{-1} R on (d, k) blocks
    (symmetric positive definite); the stopping rule stays the unpreconditioned
    residual ``||r||``.
    """
    start = time.perf_counter()
    B2 = check_columns(op, B)
    tol, max_iter, x0 = resolve_tol(options.tol, B2.dtype), options.max_iter, options.x0
    m = B2.shape[1]
    max_iter = 10 * op.dim if max_iter is None else integer_option("max_iter", max_iter, minimum=0)
    if x0 is not None:
        X = check_columns(op, x0, "warm start x0").clone()
        if X.shape != B2.shape:
            raise InputError(f"warm start x0 must have the right-hand side's shape {tuple(B.shape)}, "
                             f"got {tuple(x0.shape)}")
    else:
        X = torch.zeros_like(B2)
    R = B2 - op.matvec(X) if x0 is not None else B2.clone()
    rs = (R * R).sum(0)
    # Columns stop on the recurrence residual but are judged by the true one; below float64 the
    # two drift apart by round-off of the order of the default tolerance (float32: a column stopped
    # at 1.00e-4 measured 1.03e-4), so there the recurrence runs to half the tolerance.
    stop = tol if B2.dtype == torch.float64 else tol / 2
    target = stop * B2.norm(dim=0)
    iterations = torch.zeros(m, dtype=torch.long)
    # The active columns live in contiguous blocks (views of X, R, P while all are
    # active): each iteration is then a few fused in-place passes, and the block
    # is compacted only when some column converges, not gathered every step.
    cols = (rs.sqrt() > target).nonzero().reshape(-1)
    Xa, Ra, rsa, ta = _take(X, cols), _take(R, cols), rs[cols], target[cols]
    # rho = r^T M r (= r^T r without a preconditioner) drives the step sizes
    Za = _precondition(preconditioner, Ra, cols)
    rhoa = rsa if Za is Ra else (Ra * Za).sum(0)
    Pa = Za.clone()
    bar = progress_bar(max_iter, "pcg" if preconditioner is not None else "cg", options.progress)
    for _ in range(max_iter):
        if len(cols) == 0:
            break
        APa = op.matvec(Pa)
        curvature = (Pa * APa).sum(0)
        if not bool(torch.isfinite(curvature).all()):
            j = int(cols[(~torch.isfinite(curvature)).nonzero()[0, 0]])
            raise NonFiniteError(f"CG: the operator product went non-finite in column {j}; check the model, "
                                 "the data and the damping")
        if (curvature <= 0).any():
            j = int(cols[(curvature <= 0).nonzero()[0, 0]])
            raise IndefiniteOperatorError(
                f"CG found non-positive curvature p^T A p in column {j}: the damped operator is "
                "not positive definite; increase damping or use curvature='gnh'"
            )
        alpha = rhoa / curvature
        Xa.addcmul_(Pa, alpha)
        Ra.addcmul_(APa, alpha, value=-1.0)
        rsa = (Ra * Ra).sum(0)
        if preconditioner is None:
            rho_new, Za = rsa, Ra
        else:
            Za = _precondition(preconditioner, Ra, cols)
            rho_new = (Ra * Za).sum(0)
        Pa.mul_(rho_new / rhoa).add_(Za)
        rhoa = rho_new
        iterations[cols] += 1
        bar.update(1)
        if options.progress:  # what a user waiting on a long solve needs: how many left, how far
            worst = float((rsa.sqrt() / ta).max()) * stop
            bar.set_postfix_str(f"{len(cols)}/{m} columns running, worst residual {worst:.1e} (tol {tol:g})")
        still = rsa.sqrt() > ta
        if not bool(still.all()):  # write finished columns back, shrink the block
            done = (~still).nonzero().reshape(-1)
            X[:, cols[done]] = Xa[:, done]
            rs[cols[done]] = rsa[done]
            keep = still.nonzero().reshape(-1)
            cols, Xa, Ra, Pa, rsa, ta = cols[keep], Xa[:, keep], Ra[:, keep], Pa[:, keep], rsa[keep], ta[keep]
            rhoa = rhoa[keep]
    bar.close()
    if len(cols) and Xa is not X:  # columns still running at max_iter, in a compacted block
        X[:, cols] = Xa
        rs[cols] = rsa
    active = torch.zeros(m, dtype=torch.bool)
    active[cols] = True
    estimate = rs.sqrt() / B2.norm(dim=0).clamp_min(torch.finfo(B2.dtype).tiny)
    converged = ~active
    result = finish(op, X, B, B2, "cg", iterations, start, options.compute_residual, tol, {},
                     residual_norms=estimate, converged=converged)
    result.info["recurrence_residuals"] = estimate
    # column products of the operator: one per active column per iteration (+ the warm start's)
    result.info["operator_products"] = int(iterations.sum()) + (m if x0 is not None else 0)
    return result


def _precondition(preconditioner, R: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """M R for the active block (R itself without a preconditioner), checked: a
    preconditioner must be positive definite for CG to converge."""
    if preconditioner is None or R.shape[1] == 0:
        return R
    Z = preconditioner(R)
    rho = (R * Z).sum(0)
    bad = ~torch.isfinite(rho) | ((rho <= 0) & (R.norm(dim=0) > 0))
    if bool(bad.any()):
        j = int(cols[bad.nonzero()[0, 0]])
        what = "non-finite" if not bool(torch.isfinite(rho[bad]).all()) else "non-positive"
        raise IndefiniteOperatorError(f"PCG: the preconditioner gave {what} r^T M r in column {j}: it must be "
                                      "symmetric positive definite (increase its damping)")
    return Z



def _take(T: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` of T: T itself (a view, updated in place) when that is all of them."""
    return T if len(cols) == T.shape[1] else T[:, cols]


