"""Every curvature the library builds, in one table.

A curvature is a damped ``d x d`` operator built from a :class:`~pbrf_fast.Problem` with one
protocol (:class:`CurvatureOperator`): ``matvec`` (the product), ``coverage`` (what it treats
how), ``state_dict`` (what a long job saves to resume) and, where the structure gives one,
an exact ``inverse_matvec``. :data:`CURVATURES` lists them; :class:`pbrf_fast.Influence`,
the score pipeline, the command line and ``evaluate`` read what they need to know about a
curvature (its own inverse, how scores contract) from its row, never from its name.

To add a curvature: a module here with the operator, one row in :data:`CURVATURES`
(CONTRIBUTING.md, "A new curvature"); tests/test_inverse_table.py fails until it is tested.
"""
from __future__ import annotations

import dataclasses
import inspect

from ..errors import InputError
from .kronecker import KroneckerCurvature, KroneckerFactors
from .operators import CurvatureOperator, GaussNewton, Hessian

__all__ = ["CURVATURES", "CurvatureKind", "CurvatureOperator", "GaussNewton", "Hessian", "KroneckerCurvature",
           "KroneckerFactors", "OWN_INVERSES", "make_curvature", "curvature_kind"]


@dataclasses.dataclass(frozen=True)
class CurvatureKind:
    """One curvature: how to build it and what the rest of the library needs to know of it."""

    name: str
    operator: type             # operator(problem, damping, **fixed, **options): a CurvatureOperator
    summary: str               # one line: the docs and --help
    exact: bool                # the GNH / Hessian itself (else an approximation of the GNH)
    own_inverse: str | None    # the inverse in pbrf_fast.INVERSES that solves it exactly by its structure
    layerwise_scores: bool     # scores contract layer by layer (it covers only the adapter layers exactly)
    at_scale: bool             # the score pipeline builds it over a streamed training set
    fixed: tuple = ()          # (name, value) options this row sets for its operator class

    def options(self) -> set[str]:
        """The keyword options the operator takes, read off its constructors' signatures
        (through GaussNewton's ``**kwargs`` to CurvatureOperator's)."""
        names = set()
        for cls in self.operator.__mro__:
            if "__init__" not in vars(cls):
                continue
            parameters = inspect.signature(cls.__init__).parameters
            names |= {n for n, p in parameters.items() if p.kind == p.KEYWORD_ONLY and not n.startswith("_")}
            if "kwargs" not in parameters:
                break
        return names - {name for name, _ in self.fixed}

    def build(self, problem, damping: float = 0.0, **options) -> CurvatureOperator:
        return self.operator(problem, damping, **dict(self.fixed), **options)


CURVATURES: dict[str, CurvatureKind] = {c.name: c for c in (
    CurvatureKind("gnh", GaussNewton, "the exact Gauss-Newton Hessian: jvp, output Hessian, vjp; no Jacobian formed",
                  exact=True, own_inverse=None, layerwise_scores=False, at_scale=True),
    CurvatureKind("hessian", Hessian, "the exact Hessian of the training objective (may be indefinite)",
                  exact=True, own_inverse=None, layerwise_scores=False, at_scale=False),
    CurvatureKind("kfac", KroneckerCurvature, "K-FAC: per layer A (x) S, the Kronecker product of input and "
                  "pseudo-gradient covariances", exact=False, own_inverse="kronecker", layerwise_scores=True,
                  at_scale=True, fixed=(("kind", "kfac"),)),
    CurvatureKind("ekfac", KroneckerCurvature, "EK-FAC: K-FAC's eigenbasis with eigenvalues refitted to the "
                  "pseudo-gradients' second moments", exact=False, own_inverse="kronecker", layerwise_scores=True,
                  at_scale=True, fixed=(("kind", "ekfac"),)),
)}

# Inverses that solve one curvature by its structure (not a general solver of the GNH).
OWN_INVERSES = frozenset(c.own_inverse for c in CURVATURES.values() if c.own_inverse)

# Older spelling kept as an input alias only (the table has one name per curvature).
_ALIASES = {"gauss_newton": "gnh"}


def curvature_kind(name: str) -> CurvatureKind:
    """The row of :data:`CURVATURES` for ``name``; a named error for an unknown one."""
    name = _ALIASES.get(name, name)
    if name not in CURVATURES:
        raise InputError(f"unknown curvature {name!r}; choose one of {sorted(CURVATURES)}")
    return CURVATURES[name]


def make_curvature(problem, curvature: str = "gnh", damping: float = 0.0, **options) -> CurvatureOperator:
    """The damped operator ``curvature`` (a name in :data:`CURVATURES`) of ``problem``; ``options``
    go to its constructor (GNH: ``batch_size``, ``backend``; K-FAC / EK-FAC: ``pseudo_gradients``,
    ``relative_damping``, ``samples``, ``seed``, ``other``, ...)."""
    kind = curvature_kind(curvature)
    unknown = sorted(set(options) - kind.options())
    if unknown:
        raise InputError(f"curvature_options {unknown} are not options of curvature {kind.name!r}; its options are "
                         f"{sorted(kind.options()) or 'none'}")
    return kind.build(problem, damping, **options)
