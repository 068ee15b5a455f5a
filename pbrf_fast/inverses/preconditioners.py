"""Preconditioners for PCG that see across layers: a randomized Nystrom approximation
of the curvature, alone or deflating the top of the spectrum before EK-FAC.

Why. EK-FAC / K-FAC are block diagonal over layers; on a ReLU network the damped GNH's
worst directions span layers (rescaling symmetries), so a per-layer inverse can make
CG slower (bench/RESULTS.md, issue 17). The top of the GNH spectrum is what makes
plain CG slow, and r block products of the exact operator find it.

The sketch. With ``Omega`` (d x r) orthonormal random columns and ``Y = C Omega`` (C the
operator's data term, one block product of r columns), the Nystrom approximation is
``C_hat = Y (Omega^T Y)^+ Y^T = U diag(lam) U^T`` (rank r, PSD, ``C_hat <= C``). It is
formed stably by shifting ``Y`` by a tiny ``nu Omega`` before the Cholesky factorisation
and removing ``nu`` from the eigenvalues afterwards. ``power_iterations`` q replace
Omega by an orthonormal basis of ``C^q Omega`` first (q r more products, a sharper
top eigenspace).

The inverses (mu = weight decay + damping of the operator being solved, taken from it at
every use, so damping copies of one operator share one sketch):

* ``"nystrom"``: ``P^{-1} = U diag((lam_r + mu) / (lam + mu)) U^T + (I - U U^T)``: the
  top r directions are mapped to the level of the r-th, the rest left alone, so the
  preconditioned operator's condition number is about ``(lam_{r+1} + mu) / mu``.
* ``"nystrom+ekfac"``: ``P^{-1} = U diag(1 / (lam + mu)) U^T + (I - U U^T) M^{-1} (I - U U^T)``
  with M the EK-FAC operator of the same problem, damping and weight decay: the top
  eigenspace inverted by the sketch, the complement by EK-FAC. Symmetric positive
  definite whenever M is.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from ..errors import InputError, InputTypeError
from ..curvatures.kronecker import KroneckerCurvature

__all__ = ["NystromSketch", "nystrom_sketch", "NystromPreconditioner", "DeflatedKroneckerPreconditioner",
           "NYSTROM_KINDS", "make_nystrom", "kronecker_preconditioner"]

NYSTROM_KINDS = ("nystrom", "nystrom+ekfac", "nystrom+kfac")
# Sketch columns when no rank is given: at most DEFAULT_RANK, and for few right-hand sides
# SKETCH_PER_COLUMN per column, at least MIN_DEFAULT_RANK. The sketch costs r column products
# once and each PCG iteration costs m: with 10 test points on a 12k-parameter CNN at damping
# auto, r = 25 / 50 / 100 took 27 / 33 / 47 s for 6 / 5 / 4 iterations (bench/RESULTS.md).
DEFAULT_RANK = 100
MIN_DEFAULT_RANK = 16
SKETCH_PER_COLUMN = 2


def default_rank(op, columns: int) -> int:
    """The Nystrom rank when none is given, for a first solve of ``columns`` right-hand sides;
    fixed on ``op`` by that first solve, so later solves (other chunks) reuse its sketch."""
    return op._cached(("nystrom_default_rank",),
                      lambda: min(DEFAULT_RANK, op.dim, max(MIN_DEFAULT_RANK, SKETCH_PER_COLUMN * int(columns))))
# Columns per block product while sketching: bounds the product's transient memory.
SKETCH_BLOCK = 256


@dataclasses.dataclass
class NystromSketch:
    """``C ~ U diag(eigenvalues) U^T``: U (d, r) orthonormal, eigenvalues (r,) descending, >= 0."""

    U: torch.Tensor
    eigenvalues: torch.Tensor
    products: int        # column products of the operator spent on the sketch
    seconds: float


def _check_rank(rank, dim: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InputTypeError(f"rank must be an integer, got {rank!r}")
    if not 1 <= rank <= dim:
        raise InputError(f"rank must be between 1 and the operator's dimension {dim}, got {rank}")
    return rank


def _blockwise(apply, V: torch.Tensor) -> torch.Tensor:
    return torch.cat([apply(V[:, j:j + SKETCH_BLOCK]) for j in range(0, V.shape[1], SKETCH_BLOCK)], 1)


def nystrom_sketch(op, rank: int, *, seed: int = 0, power_iterations: int = 0) -> NystromSketch:
    """The rank-``rank`` randomized Nystrom approximation of ``op``'s data term C (without
    weight decay or damping: those are the shift mu the preconditioners add)."""
    rank = _check_rank(rank, op.dim)
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 0:
        raise InputError(f"power_iterations must be an integer >= 0, got {power_iterations!r}")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(int(seed))
    omega = _cholesky_orthonormal(torch.randn(op.dim, rank, generator=generator, dtype=torch.float64))
    omega = omega.to(op.device, op.dtype)
    apply = lambda V: op.data_matvec(V)  # noqa: E731
    with torch.no_grad():
        for _ in range(power_iterations):  # subspace iteration: omega <- orth(C omega)
            omega = torch.linalg.qr(_blockwise(apply, omega).double()).Q.to(op.dtype)
        Y = _blockwise(apply, omega).double()
        omega = omega.double()
        L, nu = _shifted_cholesky(omega, Y, op.dtype)
        Y += nu * omega
        B = torch.linalg.solve_triangular(L, Y.T, upper=False).T   # Y L^{-T}: C_hat + nu I = B B^T
        del Y
        # B B^T's eigenpairs from the small r x r Gram matrix B^T B = V S^2 V^T: U = B V S^{-1}.
        # GEMMs only (a Householder QR of the d x r block took 6.4 s of 7 at d = 50,890, r = 500);
        # S^2 >= nu > 0 keeps the division safe in float64.
        s2, V = torch.linalg.eigh(B.T @ B)
        s2, V = s2.flip(0).clamp_min(nu), V.flip(1)
        U = (B @ (V / s2.sqrt())).to(op.dtype)
    eigenvalues = (s2 - nu).clamp_min(0).to(op.dtype)
    return NystromSketch(U, eigenvalues, rank * (power_iterations + 1), time.perf_counter() - start)


def _cholesky_orthonormal(M: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of a well-conditioned tall block (a Gaussian one: condition
    ~ (1 + sqrt(r/d)) / (1 - sqrt(r/d))) by Cholesky QR: two GEMMs instead of Householder."""
    L = torch.linalg.cholesky(M.T @ M)
    return torch.linalg.solve_triangular(L, M.T, upper=False).T


def _shifted_cholesky(omega: torch.Tensor, Y: torch.Tensor, dtype) -> tuple[torch.Tensor, float]:
    """The Cholesky factor of ``omega^T (Y + nu omega)`` and nu: a shift at the rounding level
    of the products, grown tenfold while rounding (float32 products of a deep net are not
    exactly symmetric) still leaves the small core matrix indefinite."""
    # (a floor for a zero sketch, e.g. a saturated network: C_hat = 0 is then the right answer)
    nu = torch.finfo(dtype).eps * omega.shape[0] ** 0.5 * max(float(Y.norm()), torch.finfo(dtype).tiny)
    core = omega.T @ Y
    core = 0.5 * (core + core.T)
    eye = torch.eye(core.shape[0], dtype=core.dtype, device=core.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(core + nu * eye)
        if int(info) == 0:
            return L, nu
        nu *= 10.0
    raise InputError("Nystrom sketch: the operator's products are not positive semi-definite (the core matrix "
                     f"stays indefinite at shift {nu:.3g}); the preconditioner needs the GNH, not the Hessian")


def _shift(op) -> float:
    mu = float(op.shift)
    if mu <= 0:
        raise InputError("a Nystrom preconditioner needs damping or weight decay > 0 (mu = weight decay + damping "
                         f"is its floor), got {mu}")
    return mu


class NystromPreconditioner:
    """``P^{-1} = U diag((lam_r + mu) / (lam + mu)) U^T + (I - U U^T)`` (module docstring)."""

    def __init__(self, op, sketch: NystromSketch, products: int = 0):
        self.sketch, self.mu, self.products = sketch, _shift(op), products

    def inverse_matvec(self, V: torch.Tensor) -> torch.Tensor:
        U, lam = self.sketch.U, self.sketch.eigenvalues
        coeff = U.T @ V
        scale = (lam[-1] + self.mu) / (lam + self.mu) - 1.0
        return V + U @ (coeff * scale.unsqueeze(1))


class DeflatedKroneckerPreconditioner:
    """``P^{-1} = U diag(1/(lam + mu)) U^T + (I - U U^T) M^{-1} (I - U U^T)``, M a K-FAC /
    EK-FAC operator of the same problem, damping and weight decay."""

    def __init__(self, op, sketch: NystromSketch, kronecker, products: int = 0):
        if abs(float(kronecker.shift) - float(op.shift)) > 1e-12 * max(1.0, abs(float(op.shift))):
            raise InputError(f"the Kronecker preconditioner's weight decay + damping ({kronecker.shift}) must match "
                             f"the operator's ({op.shift})")
        self.sketch, self.mu, self.kronecker, self.products = sketch, _shift(op), kronecker, products

    def inverse_matvec(self, V: torch.Tensor) -> torch.Tensor:
        U, lam = self.sketch.U, self.sketch.eigenvalues
        coeff = U.T @ V
        complement = V - U @ coeff
        Z = self.kronecker.inverse_matvec(complement)
        Z -= U @ (U.T @ Z)
        return Z + U @ (coeff / (lam + self.mu).unsqueeze(1))


def make_nystrom(op, kind: str = "nystrom", *, rank: int | None = None, seed: int = 0, power_iterations: int = 0,
                 kronecker_options: dict | None = None):
    """The preconditioner ``kind`` for the exact operator ``op``. The sketch of op's data term
    is cached on op (it depends on neither damping nor weight decay); mu is op's.
    ``rank`` defaults to :data:`DEFAULT_RANK`, or op's dimension if that is smaller (``pcg``
    passes :func:`default_rank` for its right-hand sides when no rank is given)."""
    if kind not in NYSTROM_KINDS:
        raise InputError(f"kind must be one of {NYSTROM_KINDS}, got {kind!r}")
    if kind == "nystrom" and kronecker_options:
        raise InputError("kronecker_options apply to 'nystrom+ekfac' / 'nystrom+kfac' only")
    rank = _check_rank(min(DEFAULT_RANK, op.dim) if rank is None else rank, op.dim)
    key = ("nystrom_sketch", rank, int(seed), power_iterations)
    cached = op._cache.get(key)
    fresh = cached is None or cached[0] != op.problem.version
    sketch = op._cached(key, lambda: nystrom_sketch(op, rank, seed=seed, power_iterations=power_iterations))
    products = sketch.products if fresh else 0  # a reused sketch costs nothing more
    if kind == "nystrom":
        return NystromPreconditioner(op, sketch, products)
    kronecker = kronecker_preconditioner(op, kind.split("+")[1], **dict(kronecker_options or {}))
    kronecker.factors  # noqa: B018 -- built here, timed with the preconditioner
    return DeflatedKroneckerPreconditioner(op, sketch, kronecker, products)


def kronecker_preconditioner(op, kind: str, **options) -> KroneckerCurvature:
    """The K-FAC / EK-FAC inverse for an exact operator ``op`` (same problem, damping and
    weight decay), cached on it: every solve with that operator reuses the factors."""
    key = ("preconditioner", kind, tuple(sorted(options.items())))

    def build():
        opts = dict(options)
        opts.setdefault("distributed", bool(getattr(op, "spans_processes", False)))
        with warnings.catch_warnings():  # the coverage warning is for users of the operator itself
            warnings.simplefilter("ignore")
            return KroneckerCurvature(op.problem, op.damping, kind, batch_size=op.batch_size, **opts)

    return op._cached(key, build)
