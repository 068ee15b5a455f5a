"""Top-k eigenpairs of the damped GNH by Lanczos with full reorthogonalisation,
computed once and reused for every right-hand side.

With C V = V diag(lam) on the top-k Krylov subspace and shift = weight decay +
damping, the inverse is approximated by

    (C + shift I)^{-1} b ~ V diag(1 / (lam + shift)) V^T b + (b - V V^T b) / shift,

exact on span(V) and treating the rest of C as zero (its eigenvalues are below
lam_k, so the error there is bounded by the ratio lam_k / shift).
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..errors import InputError
from .common import SolveResult, check_columns, integer_option, progress_bar
from .options import InverseOptions, option

__all__ = ["lanczos_eigenpairs", "LowRankInverse", "LowRankOptions", "lowrank", "lowrank_eigenpairs"]


@dataclasses.dataclass
class LowRankOptions(InverseOptions):
    """Options of the low-rank inverse."""

    rank: int = option(32, "Lanczos eigenpairs kept (that many operator products, and a few more)", cli=False)
    iterations: int | None = option(None, "Lanczos iterations (None: a few more than rank)", cli=False)
    seed: int = option(0, "seed of the Lanczos start vector", cli=False)
    progress: bool = option(False, "show a progress bar over the Lanczos iterations", cli=False)


def lanczos_eigenpairs(op, rank: int, *, iterations: int | None = None, seed: int = 0,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` eigenpairs (float64 values, vectors (d, rank) in op.dtype) of the
    undamped operator ``op.undamped_matvec`` (data term + weight decay).

    Runs ``iterations`` (default 2 rank + 10, at most d) Lanczos steps with full
    reorthogonalisation in float64; the start vector comes from ``seed``.
    """
    d = op.dim
    rank = min(int(rank), d)
    steps = min(d, iterations or 2 * rank + 10)
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(d, generator=gen, dtype=torch.float64)
    Q = torch.zeros(d, steps, dtype=torch.float64)
    alphas, betas = [], []
    q /= q.norm()
    bar = _bar(steps, progress)
    for j in range(steps):
        Q[:, j] = q
        w = op.undamped_matvec(q.to(op.dtype).to(op.device)).double().cpu()
        alpha = float(q @ w)
        w -= alpha * q
        if j:
            w -= betas[-1] * Q[:, j - 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w -= Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        alphas.append(alpha)
        beta = float(w.norm())
        bar.update(1)
        if j + 1 == steps or beta <= 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q = w / beta
    bar.close()
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    order = torch.argsort(evals, descending=True)[:rank]
    vectors = Q[:, :k] @ evecs[:, order]
    return evals[order].clamp_min(0.0), vectors.to(op.dtype).to(op.device)


class LowRankInverse:
    """(C + shift I)^{-1} from the top-``rank`` Lanczos eigenpairs of C + weight decay.

    ``LowRankInverse(op, rank).solve(B)`` returns a :class:`SolveResult`; the
    eigenpairs are computed on first use (or passed in) and reused afterwards.
    """

    def __init__(self, op, rank: int, *, eigenpairs=None, seed: int = 0, iterations: int | None = None,
                 progress: bool = False):
        self.op = op
        self.rank = int(rank)
        self.seed, self.iterations, self.progress = seed, iterations, progress
        self._pairs = eigenpairs

    @property
    def eigenpairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pairs is None:
            self._pairs = lanczos_eigenpairs(self.op, self.rank, iterations=self.iterations, seed=self.seed,
                                             progress=self.progress)
        return self._pairs

    def solve(self, B: torch.Tensor) -> SolveResult:
        start = time.perf_counter()
        B2 = self.op.check_vectors(B)
        evals, V = self.eigenpairs
        # Eigenvalues of the undamped operator include weight decay: add damping only.
        damping = self.op.damping
        if damping <= 0 and self.op.problem.weight_decay <= 0:
            raise InputError("the low-rank inverse needs damping > 0 (or weight decay) for the remainder")
        shift = self.op.shift
        coeff = V.T @ B2
        inv = (1.0 / (evals + damping)).to(dtype=B2.dtype, device=B2.device).unsqueeze(1)
        X = V @ (coeff * inv) + (B2 - V @ coeff) / shift
        info = {"rank": self.rank, "largest_eigenvalue": float(evals.max()) if len(evals) else math.nan,
                "smallest_kept_eigenvalue": float(evals.min()) if len(evals) else math.nan}
        return SolveResult(X.reshape(B.shape), "lowrank", 0, None, None, time.perf_counter() - start, info)

    def quadratic_form(self, coeff: torch.Tensor, norms_squared: torch.Tensor) -> torch.Tensor:
        """g^T (C + shift I)^{-1} g from V^T g (rows: examples, cols: rank) and ||g||^2."""
        evals, _ = self.eigenpairs
        coeff = coeff.double()
        evals = evals.to(coeff.device)
        top = (coeff ** 2 / (evals + self.op.damping)).sum(1)
        rest = (norms_squared.double().to(coeff.device) - (coeff ** 2).sum(1)).clamp_min(0.0) / self.op.shift
        return top + rest


def _bar(total, enabled):
    return progress_bar(total, "lanczos", enabled)


def lowrank(op, B: torch.Tensor, options: LowRankOptions) -> SolveResult:
    """The low-rank inverse of ``op``; its eigenpairs are cached on ``op`` (they depend on
    neither damping nor the right-hand side), so every solve after the first is two GEMMs."""
    check_columns(op, B)
    return LowRankInverse(op, options.rank, eigenpairs=lowrank_eigenpairs(op, options)).solve(B)


def lowrank_eigenpairs(op, options: LowRankOptions, compute=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``options.rank`` eigenpairs of ``op``, cached on it; ``compute()`` gives them
    when they are not cached yet (default: Lanczos), e.g. read back from a results folder."""
    rank = integer_option("rank", options.rank)
    key = ("lowrank", rank, options.iterations, int(options.seed))
    if compute is None:
        def compute():
            return lanczos_eigenpairs(op, rank, iterations=options.iterations, seed=options.seed,
                                      progress=options.progress)
    return op._cached(key, compute)
