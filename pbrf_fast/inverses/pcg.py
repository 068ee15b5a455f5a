"""``pcg``: block CG on the exact operator, preconditioned by an approximation built from
the same problem, damping and weight decay (:data:`PRECONDITIONERS`, one table)."""
from __future__ import annotations

import dataclasses
import functools
import time

import torch

from ..curvatures import CURVATURES, curvature_kind
from ..errors import InputError, InputTypeError
from .cg import CGOptions, conjugate_gradient
from .common import SolveResult
from .options import option
from .preconditioners import NYSTROM_KINDS, default_rank, kronecker_preconditioner, make_nystrom

# Preconditioners by name: name -> factory(op, **preconditioner_options) returning an object
# with .inverse_matvec(V) (symmetric positive definite), built once per operator and cached.
PRECONDITIONERS: dict = {
    **{kind: functools.partial(make_nystrom, kind=kind) for kind in NYSTROM_KINDS},
    **{kind: functools.partial(kronecker_preconditioner, kind=kind)
       for kind, curvature in CURVATURES.items() if curvature.own_inverse == "kronecker"},
}

# PCG's preconditioner when none is named. Nystrom, not EK-FAC: on ReLU networks the
# block-diagonal Kronecker inverse made CG *slower* (MNIST MLP: 1.75x CG's iterations), while
# a rank-r sketch of the exact GNH cut them to 0.12x there and to 0.2-0.3x on ResNet-20
# (bench/RESULTS.md, issue 17). EK-FAC stays one argument away for one-layer models.
DEFAULT_PRECONDITIONER = "nystrom"


@dataclasses.dataclass
class PCGOptions(CGOptions):
    """Options of preconditioned block CG: CG's, plus the preconditioner."""

    preconditioner: object = option(DEFAULT_PRECONDITIONER,
                                    "nystrom: a rank-r sketch of the GNH that flattens its top eigenvalues (cuts "
                                    "CG's iterations on deep nets); ekfac / kfac: the Kronecker inverse (best for "
                                    "one-layer models); nystrom+ekfac / nystrom+kfac: the sketch's top eigenspace "
                                    "exactly, the Kronecker inverse on the rest; or an object with inverse_matvec",
                                    choices=sorted(PRECONDITIONERS))
    preconditioner_options: dict | None = option(None, "options of the named preconditioner (nystrom: rank, seed, "
                                                       "power_iterations; kfac / ekfac: KroneckerCurvature's)",
                                                 cli=False)
    preconditioner_rank: int | None = option(None, "columns of the Nystrom sketch, that many GNH products to "
                                                   "build it once (None: 2 per right-hand side, 16 to 100, at most d); nystrom "
                                                   "preconditioners only; the same as preconditioner_options['rank']")


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
    if getattr(op, "problem", None) is None or not curvature_kind(op.kind).exact:
        raise InputError(f"preconditioner {preconditioner!r} is built from the operator's problem: op must be "
                         "a GaussNewton or Hessian operator")
    built = PRECONDITIONERS[preconditioner](op, **options)
    getattr(built, "factors", None)  # a Kronecker preconditioner computes its factors on first use
    return built, preconditioner


def pcg(op, B: torch.Tensor, options: PCGOptions) -> SolveResult:
    """Preconditioned block CG: the exact solve of ``op`` (e.g. the damped GNH), built from
    the same problem, damping and weight decay. ``preconditioner`` (default
    :data:`DEFAULT_PRECONDITIONER`, ``"nystrom"``):

    * ``"ekfac"`` / ``"kfac"``: the Kronecker inverse (``preconditioner_options`` go to
      :class:`pbrf_fast.curvatures.kronecker.KroneckerCurvature`);
    * ``"nystrom"``: a rank-r randomized Nystrom approximation of the GNH that flattens its
      top r eigenvalues (options ``rank``, ``seed``, ``power_iterations``;
      :mod:`pbrf_fast.preconditioners`); r column products to build;
    * ``"nystrom+ekfac"`` / ``"nystrom+kfac"``: the sketch's top eigenspace inverted exactly,
      EK-FAC / K-FAC on its complement (also ``kronecker_options``);
    * or any object with ``inverse_matvec`` (symmetric positive definite).

    Built once per operator and cached. ``tol``, ``max_iter``, ``x0``, ... as
    :func:`conjugate_gradient`. ``result.info`` records the preconditioner, the seconds and
    the operator column products spent building it (``preconditioner_products``; 0 when
    reused) beside the iterations' ``operator_products``.
    """
    start = time.perf_counter()
    preconditioner = DEFAULT_PRECONDITIONER if options.preconditioner is None else options.preconditioner
    built_options = _preconditioner_options(options)
    if preconditioner in NYSTROM_KINDS and "rank" not in built_options and hasattr(op, "_cached"):
        built_options["rank"] = default_rank(op, 1 if B.dim() == 1 else B.shape[1])
    preconditioner, name = _build_preconditioner(op, preconditioner, built_options)
    if not callable(getattr(preconditioner, "inverse_matvec", None)):
        raise InputTypeError(f"preconditioner must be one of {sorted(PRECONDITIONERS)} or have inverse_matvec, "
                             f"got {preconditioner!r}")
    built = time.perf_counter() - start
    cg_options = CGOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(CGOptions)})
    result = conjugate_gradient(op, B, cg_options, preconditioner=preconditioner.inverse_matvec)
    result.method = "pcg"
    result.time += built
    # honest cost: operator column products of the iterations and of the preconditioner's build
    build_products = int(getattr(preconditioner, "products", 0))
    result.info.update({"preconditioner": name, "preconditioner_seconds": built,
                        "preconditioner_products": build_products})
    return result




def _preconditioner_options(options: PCGOptions) -> dict:
    """``preconditioner_options`` with ``preconditioner_rank`` folded in (one of the two)."""
    built = options.preconditioner_options
    if built is not None and not isinstance(built, dict):
        raise InputTypeError(f"preconditioner_options must be a dict, got {built!r}")
    built = dict(built or {})
    nystrom = options.preconditioner in NYSTROM_KINDS
    if options.preconditioner_rank is not None and nystrom:  # the other preconditioners have no rank
        if "rank" in built and built["rank"] != options.preconditioner_rank:
            raise InputError("give the Nystrom rank once: preconditioner_rank or preconditioner_options['rank']")
        built["rank"] = options.preconditioner_rank
    return built
