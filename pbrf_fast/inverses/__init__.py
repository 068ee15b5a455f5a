"""Every way of applying (C + shift I)^{-1} to a block of right-hand sides, in one table.

An inverse is an :class:`InverseMethod`: a name, a typed options dataclass (each field with
its default and help) and ``run(op, B, options) -> SolveResult``. :data:`INVERSES` lists
them all; :class:`pbrf_fast.Influence`, the score pipeline, the command line (its
``--solver`` choices and option flags), ``evaluate`` and the README's solver table read
this table and nothing else. ``solve(op, B, method, **options)`` is the one entry point.

To add an inverse: one module here with its options dataclass and run function, one row
in :data:`INVERSES` (CONTRIBUTING.md, "A new solver"); tests/test_inverse_table.py fails
until the README's table and the tests know it.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable

import torch

from ..errors import InputError, NotConvergedWarning
from .cg import CGOptions, conjugate_gradient
from .common import SolveResult
from .direct import DIRECT_MAX_DIM, DirectOptions, direct
from .identity import IdentityOptions, identity
from .kernel import KERNEL_MEMORY_BYTES, KernelOptions, kernel
from .kronecker import KroneckerOptions, kronecker_inverse
from .lissa import LissaOptions, lissa, plan_lissa
from .lowrank import LowRankInverse, LowRankOptions, lanczos_eigenpairs, lowrank, lowrank_eigenpairs
from .options import InverseOptions
from .pcg import DEFAULT_PRECONDITIONER, PRECONDITIONERS, PCGOptions, pcg

__all__ = ["INVERSES", "InverseMethod", "SolveResult", "solve", "choose_method", "make_options",
           "CGOptions", "PCGOptions", "DirectOptions", "KernelOptions", "LissaOptions", "LowRankOptions",
           "KroneckerOptions", "IdentityOptions", "InverseOptions", "LowRankInverse", "lanczos_eigenpairs",
           "lowrank_eigenpairs", "plan_lissa", "DEFAULT_PRECONDITIONER", "PRECONDITIONERS", "DIRECT_MAX_DIM",
           "KERNEL_MEMORY_BYTES", "AUTO"]

logger = logging.getLogger(__name__)

# The name that asks :func:`choose_method` to pick an exact inverse by problem size.
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class InverseMethod:
    """One way of applying (C + shift I)^{-1}: ``run(op, B, options)`` for B (d,) or (d, m)."""

    name: str
    options: type                 # an InverseOptions dataclass: the method's only options
    run: Callable                 # run(op, B, options) -> SolveResult
    use_when: str                 # one line: the docs' table and --help
    exact: bool                   # solves the damped operator to its tolerance (else: an approximation)
    if_not_converged: str = "raise the damping"   # what to change when columns miss their tolerance


INVERSES: dict[str, InverseMethod] = {m.name: m for m in (
    InverseMethod("cg", CGOptions, conjugate_gradient,
                  "larger d, accurate answers: block CG, a tolerance per column", True,
                  "raise max_iter, use solver='pcg' (fewer iterations on deep nets), or raise the damping"),
    InverseMethod("pcg", PCGOptions, pcg,
                  "exact answers at large d in fewer iterations than cg (Nystrom or Kronecker preconditioner)", True,
                  "raise max_iter or preconditioner_rank, or raise the damping"),
    InverseMethod("lissa", LissaOptions, lissa,
                  "very large data, the paper's estimator: the stochastic Neumann series (Eq. 52)", False,
                  "raise depth (the truncated series) or repeats (its noise), or use an exact solver"),
    InverseMethod("lowrank", LowRankOptions, lowrank,
                  "many queries, a rough answer: the top-k Lanczos eigenpairs plus 1/shift on the rest", False),
    InverseMethod("kernel", KernelOptions, kernel,
                  "GNH with N*C training outputs << d: exact, in output space (Woodbury)", True,
                  "the residual is the dtype's round-off: solve in float64, or raise the damping"),
    InverseMethod("direct", DirectOptions, direct,
                  "d up to a few thousand: a float64 eigendecomposition cached on the operator", True,
                  "the residual is the dtype's round-off: solve in float64, or raise the damping"),
    InverseMethod("kronecker", KroneckerOptions, kronecker_inverse,
                  "the operator is K-FAC / EK-FAC: its own exact inverse, layer by layer", True),
    InverseMethod("identity", IdentityOptions, identity,
                  "a baseline: no curvature, scores are gradient dot products", False),
)}


def make_options(method: str, options: InverseOptions | dict | None = None) -> InverseOptions:
    """``method``'s options dataclass from a mapping of its fields (or checked as given)."""
    entry = _method(method)
    if isinstance(options, InverseOptions):
        if not isinstance(options, entry.options):
            raise InputError(f"solver {method!r} takes {entry.options.__name__}, got {type(options).__name__}")
        return options
    return entry.options.from_mapping(method, options)


def _method(name: str) -> InverseMethod:
    if name not in INVERSES:
        raise InputError(f"unknown solver {name!r}; choose one of {sorted(INVERSES)} or {AUTO!r}")
    return INVERSES[name]


def choose_method(op) -> tuple[str, str]:
    """The exact solver that is cheapest by size, or CG when neither fits; with the reason.

    ``direct`` factorises d x d, ``kernel`` N*C x N*C (GNH only): take the smaller. An
    operator with its own exact inverse (K-FAC / EK-FAC) is solved by it.
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
    # Nystrom-PCG, not CG: the same exact answer, in 0.12x CG's iterations on the MNIST MLP and
    # 0.2-0.3x on ResNet-20 (bench/RESULTS.md), for r products spent once on its sketch.
    reason = (f"d = {d} is too large for a dense solve and N*C = {outputs} outputs "
              f"{'do not fit the output-space memory budget' if op.kind == 'gnh' else 'need the GNH'}: "
              f"using PCG with a Nystrom preconditioner")
    logger.info(reason)
    return "pcg", reason


def solve(op, B: torch.Tensor, method: str = AUTO, options: InverseOptions | dict | None = None,
          **option_values) -> SolveResult:
    """Solve ``op X = B`` for B of shape (d,) or (d, m) with one of :data:`INVERSES`.

    ``method``: a name in :data:`INVERSES`, or ``"auto"`` (:func:`choose_method`: the cheaper
    exact solver of ``direct`` and ``kernel`` by size, else ``cg``; a K-FAC / EK-FAC
    operator's own inverse). The method's options come as its options dataclass
    (``options=CGOptions(tol=1e-8)``), a dict, or keywords (``tol=1e-8``); an option the
    method does not have is a named error.
    """
    reason = None
    if method == AUTO:
        method, reason = choose_method(op)
    entry = _method(method)
    if options is not None and option_values:
        raise InputError("give the solver's options either as options=... or as keywords, not both")
    options = make_options(method, option_values if options is None else options)
    result = entry.run(op, B, options)
    if reason:
        result.info["dispatch"] = reason
    warn_if_not_converged(result, entry, options)
    return result


def warn_if_not_converged(result: SolveResult, entry: InverseMethod, options: InverseOptions) -> None:
    """A :class:`NotConvergedWarning` naming the columns above tolerance, their residuals, and
    what to change; silent when every column converged or the solve measured nothing."""
    if result.converged is None or bool(torch.as_tensor(result.converged).all()):
        return
    converged = torch.as_tensor(result.converged).reshape(-1)
    residuals = None if result.residual_norms is None else torch.as_tensor(result.residual_norms).reshape(-1)
    missed = (~converged).nonzero().reshape(-1)
    worst = "" if residuals is None else (f"; worst relative residual {float(residuals[missed].max()):.2e} in column "
                                          f"{int(missed[residuals[missed].argmax()])}")
    tol = result.info.get("tol", getattr(options, "tol", None))
    limits = ", ".join(f"{name}={getattr(options, name)}" for name in ("max_iter", "depth", "repeats")
                       if hasattr(options, name) and getattr(options, name) is not None)
    warnings.warn(NotConvergedWarning(
        f"{result.method}: {len(missed)} of {converged.numel()} columns did not reach "
        f"{'the tolerance' if tol is None else f'tol={tol:g}'} (columns {missed[:10].tolist()}"
        f"{' ...' if len(missed) > 10 else ''}{worst}; {limits or 'default options'}): "
        f"{entry.if_not_converged}"), stacklevel=3)
