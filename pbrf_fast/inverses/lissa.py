"""``lissa``: the stochastic Neumann recursion of Eq. 51-52 with mini-batch curvature,
repeats and a scale chosen automatically by power iteration."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..curvatures import CurvatureOperator
from ..lissa_divergence import check_lissa_step
from .common import SolveResult, check_columns, finish, integer_option, positive_number, progress_bar
from .options import InverseOptions, option


@dataclasses.dataclass
class LissaOptions(InverseOptions):
    """Options of LiSSA (Eq. 52)."""

    depth: int = option(1000, "recursion steps per repeat", flags=("--depth", "--lissa-depth"))
    repeats: int = option(1, "independent recursions averaged")
    batch_size: int = option(128, "training examples in each step's mini-batch curvature",
                             flags=("--lissa-batch-size",))
    scale: float | str = option("auto", "sigma, or 'auto': from power iteration on 8 random mini-batches", cli=False)
    seed: int = option(0, "seed of the mini-batch draws", cli=False)
    tol: float = option(5e-2, "relative residual a column must meet to count as converged", cli=False)
    compute_residual: bool = option(True, "measure the true residual with one more operator product", cli=False)
    check_every: int = option(1, "steps between divergence checks", cli=False)
    progress: bool = option(False, "show a progress bar over the steps", cli=False)
    engine: str = option("auto", "'native' (compiled recursion for MLPs), 'python' or 'auto'", cli=False)


# ----------------------------------------------------------------------- lissa
def estimate_largest_eigenvalue(op: CurvatureOperator, idx=None, *, iterations: int = 30,
                                generator: torch.Generator | None = None) -> float:
    """Largest eigenvalue of the undamped curvature (over ``idx``) by power iteration."""
    v = torch.randn(op.dim, generator=generator, dtype=op.dtype).to(op.device)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        w = op.undamped_matvec(v, idx)
        value = float(v @ w)
        norm = w.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = w / norm
    return max(value, 0.0)


def lissa_batches(n: int, depth: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The (depth, batch) training indices one LiSSA repeat visits, drawn up front.

    Drawing them before the recursion makes the schedule a plain tensor, which
    a native engine can replay exactly from the same seed.
    """
    if batch_size >= n:  # the whole set every step: deterministic recursion
        return torch.arange(n).expand(depth, n)
    return torch.randint(n, (depth, batch_size), generator=generator)


def auto_lissa_scale(op: CurvatureOperator, batch_size: int, generator: torch.Generator,
                     probes: int = 8) -> float:
    """A scale sigma for which every sampled mini-batch recursion is a contraction.

    The recursion h <- v + (I - (C_B + shift I)/sigma) h is non-expansive when
    every mini-batch curvature C_B has eigenvalues below 2 sigma - shift.
    Power iteration on several random batches estimates max_B lambda_max(C_B);
    taking sigma = that + shift leaves a factor-2 margin for batches not probed.
    """
    n = op.num_examples
    batch_size = min(batch_size, n)
    largest = 0.0
    for _ in range(probes if batch_size < n else 1):
        idx = torch.randperm(n, generator=generator)[:batch_size]
        largest = max(largest, estimate_largest_eigenvalue(op, idx, generator=generator))
    return largest + op.damping


def _lissa_update(h, v, gh, damping, scale):
    from ..kernels import lissa_update_

    return lissa_update_(h, v, gh, damping, scale)


def lissa(op: CurvatureOperator, B: torch.Tensor, options: LissaOptions) -> SolveResult:
    """Stochastic LiSSA (Eq. 52): averaged truncated Neumann series with mini-batch curvature.

    Per repeat: h_0 = b; h_t = b + (1 - damping/sigma) h_{t-1} - C_{B_t} h_{t-1} / sigma,
    with C_{B_t} the undamped curvature (weight decay included) on batch B_t;
    the estimate is h_depth / sigma, averaged over repeats.

    A recursion that converges keeps ||h_t|| <= min(t + 1, sigma / shift) ||b||.
    An iterate past that bound (or non-finite) raises :class:`DivergenceError`.

    ``engine``: ``"native"`` runs the whole recursion in the compiled extension
    (GNH of an MLP model, pbrf_fast.kernels.lissa_engine), ``"python"`` this
    loop; ``"auto"`` the native engine where it pays (:func:`plan_lissa` says which
    runs and why; ``result.info["engine"]`` records it). Same seed, same batches.
    """
    start = time.perf_counter()
    B2 = check_columns(op, B)
    o = options
    scale, seed, progress, engine = o.scale, o.seed, o.progress, o.engine
    depth, repeats = integer_option("depth", o.depth), integer_option("repeats", o.repeats)
    batch_size, check_every = integer_option("batch_size", o.batch_size), integer_option("check_every", o.check_every)
    tol = positive_number("tol", o.tol)
    plan = plan_lissa(op, B2, batch_size=batch_size, engine=engine)
    native = plan.backend if plan.implementation == "native" else None
    generator = torch.Generator().manual_seed(int(seed))
    if scale == "auto":
        scale = auto_lissa_scale(op, batch_size, generator)
    scale = positive_number("LiSSA scale", scale)
    b_norm = B2.norm(dim=0).double().cpu()
    shift = op.shift
    ceiling = scale / shift if shift > 0 else math.inf
    # The bound assumes PSD mini-batch curvature; a Hessian may have negative
    # directions that a damped recursion still survives, so allow more room.
    slack = 1.01 if op.kind == "gnh" else 10.0
    if native is not None:  # the whole recursion in the extension, no Python per step
        total = _native_lissa(op, B2, native, depth, repeats, batch_size, generator, scale,
                              b_norm * slack, ceiling, check_every)
    else:
        total = torch.zeros_like(B2)
    bar = progress_bar(0 if native else depth * repeats, "lissa", progress)
    for r in range(0 if native else repeats):
        schedule = lissa_batches(op.num_examples, depth, batch_size, generator)
        h = B2.clone()
        for t in range(depth):
            gh = op.undamped_matvec(h, schedule[t])
            norms, nonfinite = _lissa_update(h, B2, gh, op.damping, scale)
            if nonfinite or (t + 1) % check_every == 0:
                check_lissa_step(norms, nonfinite, b_norm * slack, min(t + 2, ceiling), t, r, scale,
                                 op.damping)
            bar.update(1)
        total += h
    bar.close()
    X2 = total / (repeats * scale)
    info = {"scale": scale, "depth": depth, "repeats": repeats, "batch_size": batch_size,
            "engine": plan.implementation, "engine_reason": plan.reason}
    return finish(op, X2, B, B2, "lissa", depth, start, o.compute_residual, tol, info)


def plan_lissa(op: CurvatureOperator, B: torch.Tensor, *, batch_size: int = LissaOptions.batch_size,
               engine: str = LissaOptions.engine):
    """Where :func:`lissa` runs its recursion for this operator and right-hand side, and
    why (:func:`pbrf_fast.kernels.lissa_engine.plan_lissa_engine` holds the rule)."""
    from ..kernels import lissa_engine

    if op.spans_processes:
        mlp = (None, "the operator spans processes: each step's product is all-reduced from Python")
    elif op.kind == "gnh":
        mlp = op.mlp_spec()
    else:
        mlp = (None, "the native engine needs the Gauss-Newton operator")
    return lissa_engine.plan_lissa_engine(mlp, op.problem.inputs, B, batch_size, engine=engine,
                                          backend=getattr(op, "backend", "auto"))


def _native_lissa(op, B2, backend, depth, repeats, batch_size, generator, scale, limits, ceiling,
                  check_every):
    from ..kernels.lissa_engine import mlp_lissa

    # Drawn in the order the Python loop draws them: one (depth, batch) block per repeat.
    schedule = torch.stack([lissa_batches(op.num_examples, depth, batch_size, generator)
                            for _ in range(repeats)]).contiguous()
    problem = op.problem
    return mlp_lissa(op.mlp_spec()[0], problem.loss.kernel_kind, problem.theta,
                     problem.inputs, B2, schedule, weight_decay=problem.weight_decay,
                     damping=op.damping, scale=scale, limits=limits, ceiling=ceiling,
                     check_every=check_every, backend=backend)


