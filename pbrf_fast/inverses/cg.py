"""Solvers for damped curvature systems (C + shift I) X = B with many right-hand sides.

``solve(op, B, method=...)`` dispatches to

* ``direct`` - dense eigendecomposition of the data term, cached on the
  operator, so every right-hand side and every damping value reuses it;
* ``cg``     - conjugate gradients run on all columns at once, each column with
  its own step sizes and relative tolerance (a converged column stops costing
  products);
* ``pcg``    - the same CG preconditioned by the K-FAC / EK-FAC inverse
  (:mod:`pbrf_fast.kronecker`): the exact solve in fewer iterations;
* ``kronecker`` - the exact inverse of a K-FAC / EK-FAC operator itself;
* ``lissa``  - the stochastic Neumann recursion of Eq. 51-52 with mini-batch
  curvature, repeats and a scale chosen automatically by power iteration.

All return a :class:`SolveResult` with the solution and diagnostics.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import torch

from .curvature import CurvatureOperator
from .errors import IndefiniteOperatorError, InputError, InputTypeError, NonFiniteError
from .lissa_divergence import check_lissa_step

__all__ = ["SolveResult", "solve", "direct", "conjugate_gradient", "pcg", "lissa", "kernel",
           "estimate_largest_eigenvalue", "choose_method", "plan_lissa", "DIRECT_MAX_DIM", "KERNEL_MEMORY_BYTES",
           "SOLVERS"]

logger = logging.getLogger(__name__)

# Above this many parameters a dense d x d factorisation stops being cheap.
DIRECT_MAX_DIM = 6000
# The output-space solver keeps about three (N*C)^2 float64 matrices.
KERNEL_MEMORY_BYTES = 4 << 30


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


def _columns(op: CurvatureOperator, B: torch.Tensor, name: str = "right-hand side B") -> torch.Tensor:
    """``B`` as a finite (d, m) block; a named error for anything else."""
    try:
        B2 = op.check_vectors(B)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    if not torch.isfinite(B2).all():
        bad = (~torch.isfinite(B2)).any(0).nonzero().reshape(-1).tolist()
        raise NonFiniteError(f"{name} has NaN/Inf in columns {bad[:10]}")
    return B2


def _positive_finite(name: str, value) -> float:
    """A float option that must be finite and > 0 (a tolerance, a scale)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputTypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{name} must be finite and > 0, got {value!r}")
    return number


def _count(name: str, value, minimum: int = 1) -> int:
    """An integer option that must be >= minimum (a depth, a batch size)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _relative_residuals(op, X2, B2) -> torch.Tensor:
    r = (op.matvec(X2) - B2).norm(dim=0)
    b = B2.norm(dim=0)
    return torch.where(b > 0, r / b.clamp_min(torch.finfo(b.dtype).tiny), r)


def _finish(op, X2, B, B2, method, iterations, start, compute_residual, tol, info,
            residual_norms=None, converged=None):
    if not torch.isfinite(X2).all():
        bad = (~torch.isfinite(X2)).any(0).nonzero().reshape(-1).tolist()
        raise NonFiniteError(f"{method}: the solution has NaN/Inf in columns {bad[:10]} (the operator "
                             "produced non-finite values; check the model, the data and the damping)")
    if compute_residual:
        # converged always means the true residual met tol (the solver's own estimate,
        # e.g. CG's recurrence, can drift from it): one meaning for every method.
        residual_norms = _relative_residuals(op, X2, B2)
        if converged is not None:
            info["solver_converged"] = converged
        converged = residual_norms <= tol
    return SolveResult(X2.reshape(B.shape), method, iterations, residual_norms, converged,
                       time.perf_counter() - start, info)


# ---------------------------------------------------------------------- direct
def direct(op: CurvatureOperator, B: torch.Tensor, *, compute_residual: bool = True,
           tol: float = 1e-6) -> SolveResult:
    """Dense solve through the cached float64 eigendecomposition of the data term."""
    start = time.perf_counter()
    B2 = _columns(op, B)
    tol = _positive_finite("tol", tol)
    if op.dim > 4 * DIRECT_MAX_DIM:
        raise InputError(f"direct solver needs a dense {op.dim}x{op.dim} matrix; use method='cg' or 'lissa'")
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
    return _finish(op, X2, B, B2, "direct", 0, start, compute_residual, tol, info)


# ---------------------------------------------------------------------- kernel
def kernel(op: CurvatureOperator, B: torch.Tensor, *, compute_residual: bool = True,
           tol: float = 1e-6) -> SolveResult:
    """Exact GNH solve in output space (Woodbury); see :mod:`pbrf_fast.output_space`."""
    from .output_space import OutputSpaceSolver

    start = time.perf_counter()
    B2 = _columns(op, B)
    tol = _positive_finite("tol", tol)
    # All N training outputs enter one Gram matrix: a sharded operator gathers them first.
    local = op.gathered() if op.spans_processes else op
    X2 = OutputSpaceSolver(local).solve(B2)
    info = {"outputs": op.num_examples * op.problem.num_outputs}
    return _finish(op, X2, B, B2, "kernel", 0, start, compute_residual, tol, info)


# -------------------------------------------------------------------------- cg
def conjugate_gradient(op: CurvatureOperator, B: torch.Tensor, *, tol: float = 1e-6,
                       max_iter: int | None = None, x0: torch.Tensor | None = None,
                       compute_residual: bool = True, progress: bool = False,
                       preconditioner=None) -> SolveResult:
    """CG on every column at once, stopping each column at ``||r|| <= tol ||b||``.

    Columns are independent CG runs that share operator products: only the
    still-active columns go through the network each iteration.
    ``preconditioner``: None, or a function M(R) ~ op^{-1} R on (d, k) blocks
    (symmetric positive definite); the stopping rule stays the unpreconditioned
    residual ``||r||``.
    """
    start = time.perf_counter()
    B2 = _columns(op, B)
    tol = _positive_finite("tol", tol)
    m = B2.shape[1]
    max_iter = 10 * op.dim if max_iter is None else _count("max_iter", max_iter, minimum=0)
    if x0 is not None:
        X = _columns(op, x0, "warm start x0").clone()
        if X.shape != B2.shape:
            raise InputError(f"warm start x0 must have the right-hand side's shape {tuple(B.shape)}, "
                             f"got {tuple(x0.shape)}")
    else:
        X = torch.zeros_like(B2)
    R = B2 - op.matvec(X) if x0 is not None else B2.clone()
    rs = (R * R).sum(0)
    target = tol * B2.norm(dim=0)
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
    bar = _progress(max_iter, "pcg" if preconditioner is not None else "cg", progress)
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
    result = _finish(op, X, B, B2, "cg", iterations, start, compute_residual, tol, {},
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


# Preconditioners by name: name -> factory(op, **options) returning an object with
# .inverse_matvec(V). pbrf_fast.kronecker registers "kfac" / "ekfac" on import,
# pbrf_fast.preconditioners "nystrom", "nystrom+ekfac" and "nystrom+kfac".
PRECONDITIONERS: dict = {}


# PCG's preconditioner when none is named. Nystrom, not EK-FAC: on ReLU networks the
# block-diagonal Kronecker inverse made CG *slower* (MNIST MLP: 1.75x CG's iterations), while
# a rank-r sketch of the exact GNH cut them to 0.12x there and to 0.2-0.3x on ResNet-20
# (bench/RESULTS.md, issue 17). EK-FAC stays one argument away for one-layer models.
DEFAULT_PRECONDITIONER = "nystrom"


def register_preconditioner(name: str, factory) -> None:
    """Make ``factory(op, **options)`` available as ``solve(op, B, "pcg", preconditioner=name)``."""
    PRECONDITIONERS[name] = factory


def register_kronecker(kinds, factory) -> None:
    """Called by :mod:`pbrf_fast.kronecker`: its inverses become PCG preconditioners, and
    its operators are solved by their own inverse (``method="kronecker"``)."""
    for kind in kinds:
        register_preconditioner(kind, functools.partial(factory, kind=kind))


def _build_preconditioner(op, preconditioner, options):
    """The preconditioner object for a name (built now, so its cost is timed apart from the
    iterations) or the object itself; and its name."""
    if not isinstance(preconditioner, str):
        if options:
            raise InputError("preconditioner_options apply to a preconditioner given by name")
        return preconditioner, type(preconditioner).__name__
    if preconditioner not in PRECONDITIONERS:
        raise InputError(f"unknown preconditioner {preconditioner!r}; choose one of {sorted(PRECONDITIONERS)} "
                         "or pass an object with inverse_matvec")
    if getattr(op, "problem", None) is None or op.kind not in ("gnh", "hessian"):
        raise InputError(f"preconditioner {preconditioner!r} is built from the operator's problem: op must be "
                         "a GaussNewton or Hessian operator")
    if not isinstance(options, dict):
        raise InputTypeError(f"preconditioner_options must be a dict, got {options!r}")
    built = PRECONDITIONERS[preconditioner](op, **options)
    getattr(built, "factors", None)  # a Kronecker preconditioner computes its factors on first use
    return built, preconditioner


def pcg(op: CurvatureOperator, B: torch.Tensor, *, preconditioner=None, preconditioner_options: dict | None = None,
        **options) -> SolveResult:
    """Preconditioned block CG: the exact solve of ``op`` (e.g. the damped GNH), built from
    the same problem, damping and weight decay. ``preconditioner`` (default
    :data:`DEFAULT_PRECONDITIONER`, ``"nystrom"``):

    * ``"ekfac"`` / ``"kfac"``: the Kronecker inverse (``preconditioner_options`` go to
      :class:`pbrf_fast.kronecker.KroneckerCurvature`);
    * ``"nystrom"``: a rank-r randomized Nystrom approximation of the GNH that flattens its
      top r eigenvalues (options ``rank``, ``seed``, ``power_iterations``;
      :mod:`pbrf_fast.preconditioners`); r column products to build;
    * ``"nystrom+ekfac"`` / ``"nystrom+kfac"``: the sketch's top eigenspace inverted exactly,
      EK-FAC / K-FAC on its complement (also ``kronecker_options``);
    * or any object with ``inverse_matvec`` (symmetric positive definite).

    Built once per operator and cached. ``options`` (``tol``, ``max_iter``, ``x0``, ...) as
    :func:`conjugate_gradient`. ``result.info`` records the preconditioner, the seconds and
    the operator column products spent building it (``preconditioner_products``; 0 when
    reused) beside the iterations' ``operator_products``.
    """
    start = time.perf_counter()
    preconditioner = DEFAULT_PRECONDITIONER if preconditioner is None else preconditioner
    preconditioner, name = _build_preconditioner(op, preconditioner, {} if preconditioner_options is None
                                                 else preconditioner_options)
    if not callable(getattr(preconditioner, "inverse_matvec", None)):
        raise InputTypeError(f"preconditioner must be one of {sorted(PRECONDITIONERS)} or have inverse_matvec, "
                             f"got {preconditioner!r}")
    built = time.perf_counter() - start
    result = conjugate_gradient(op, B, preconditioner=preconditioner.inverse_matvec, **options)
    result.method = "pcg"
    result.time += built
    # honest cost: operator column products of the iterations and of the preconditioner's build
    build_products = int(getattr(preconditioner, "products", 0))
    result.info.update({"preconditioner": name, "preconditioner_seconds": built,
                        "preconditioner_products": build_products})
    return result


def kronecker_inverse(op, B: torch.Tensor, **options) -> SolveResult:
    """Solve with a K-FAC / EK-FAC operator's own exact inverse (``op.solve``)."""
    if not callable(getattr(op, "inverse_matvec", None)):
        raise InputError("method 'kronecker' needs a K-FAC / EK-FAC operator (curvature='kfac' or 'ekfac')")
    return op.solve(B, **options)


def _take(T: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` of T: T itself (a view, updated in place) when that is all of them."""
    return T if len(cols) == T.shape[1] else T[:, cols]


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
    from .kernels import lissa_update_

    return lissa_update_(h, v, gh, damping, scale)


def lissa(op: CurvatureOperator, B: torch.Tensor, *, depth: int = 5000, repeats: int = 1,
          batch_size: int = 128, scale: float | str = "auto", seed: int = 0,
          tol: float = 5e-2, compute_residual: bool = True, check_every: int = 1,
          progress: bool = False, engine: str = "auto") -> SolveResult:
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
    B2 = _columns(op, B)
    depth, repeats = _count("depth", depth), _count("repeats", repeats)
    batch_size, check_every = _count("batch_size", batch_size), _count("check_every", check_every)
    tol = _positive_finite("tol", tol)
    plan = plan_lissa(op, B2, batch_size=batch_size, engine=engine)
    native = plan.backend if plan.implementation == "native" else None
    generator = torch.Generator().manual_seed(int(seed))
    if scale == "auto":
        scale = auto_lissa_scale(op, batch_size, generator)
    scale = _positive_finite("LiSSA scale", scale)
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
    bar = _progress(0 if native else depth * repeats, "lissa", progress)
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
    return _finish(op, X2, B, B2, "lissa", depth, start, compute_residual, tol, info)


def plan_lissa(op: CurvatureOperator, B: torch.Tensor, *, batch_size: int = 128, engine: str = "auto"):
    """Where :func:`lissa` runs its recursion for this operator and right-hand side, and
    why (:func:`pbrf_fast.kernels.lissa_engine.plan_lissa_engine` holds the rule)."""
    from .kernels import lissa_engine

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
    from .kernels.lissa_engine import mlp_lissa

    # Drawn in the order the Python loop draws them: one (depth, batch) block per repeat.
    schedule = torch.stack([lissa_batches(op.num_examples, depth, batch_size, generator)
                            for _ in range(repeats)]).contiguous()
    problem = op.problem
    return mlp_lissa(op.mlp_spec()[0], problem.loss.kernel_kind, problem.theta,
                     problem.inputs, B2, schedule, weight_decay=problem.weight_decay,
                     damping=op.damping, scale=scale, limits=limits, ceiling=ceiling,
                     check_every=check_every, backend=backend)


def _progress(total, desc, enabled):
    if not enabled:
        class _Silent:
            def update(self, k):
                pass

            def close(self):
                pass

        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


SOLVERS = {"direct": direct, "cg": conjugate_gradient, "pcg": pcg, "lissa": lissa, "kernel": kernel,
           "kronecker": kronecker_inverse}


def choose_method(op: CurvatureOperator) -> tuple[str, str]:
    """The exact solver that is cheapest by size, or CG when neither fits; with the reason.

    ``direct`` factorises d x d, ``kernel`` N*C x N*C (GNH only): take the smaller.
    """
    if callable(getattr(op, "inverse_matvec", None)):
        return "kronecker", f"{op.kind} operator: its own exact inverse, layer by layer in the Kronecker eigenbasis"
    d, outputs = op.dim, op.num_examples * op.problem.num_outputs
    kernel_ok = (op.kind == "gnh" and op.shift > 0 and op.problem.loss.kernel_kind in ("mse", "bce", "cross_entropy")
                 and 3 * 8 * outputs ** 2 <= KERNEL_MEMORY_BYTES)
    direct_ok = d <= DIRECT_MAX_DIM
    if kernel_ok and (not direct_ok or outputs < d):
        return "kernel", f"N*C = {outputs} training outputs < d = {d} parameters: exact output-space solve"
    if direct_ok:
        return "direct", f"d = {d} <= {DIRECT_MAX_DIM}: dense eigendecomposition"
    reason = (f"d = {d} is too large for a dense solve and N*C = {outputs} outputs "
              f"{'do not fit the output-space memory budget' if op.kind == 'gnh' else 'need the GNH'}: using CG")
    logger.info(reason)
    return "cg", reason


def solve(op: CurvatureOperator, B: torch.Tensor, method: str = "auto", **options) -> SolveResult:
    """Solve ``op X = B`` for B of shape (d,) or (d, m).

    ``method``: ``"auto"`` (see :func:`choose_method`: the cheaper exact
    solver of ``direct`` and ``kernel`` by size, else ``cg``; a K-FAC / EK-FAC
    operator's own inverse), ``"direct"``, ``"kernel"``, ``"cg"``, ``"pcg"``
    (``preconditioner="nystrom"`` by default, or ``"ekfac"``, ``"kfac"``, ...),
    ``"kronecker"`` or ``"lissa"``;
    ``options`` go to that solver.
    """
    reason = None
    if method == "auto":
        method, reason = choose_method(op)
    if method not in SOLVERS:
        raise InputError(f"unknown solver {method!r}; choose one of {sorted(SOLVERS)} or 'auto'")
    result = SOLVERS[method](op, B, **options)
    if reason:
        result.info["dispatch"] = reason
    return result
