"""pbrf_fast: exact Gauss-Newton influence functions and the proximal Bregman
response function (PBRF) they actually approximate.

The public API lives here and nowhere else; submodules are implementation.
The paper's experiments live in :mod:`pbrf_fast.paper`, which imports this
library and is never imported by it.

The names below load on first use (PEP 562): ``import pbrf_fast`` alone does not
import torch, so ``pbrf-fast --help`` (whose ``python -m pbrf_fast`` runs this
file first) answers before torch, which takes seconds, is loaded. Every module
that loads a compiled extension imports torch before it (one OpenMP runtime).
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "AutogradLoss": "losses",
    "BCEWithLogitsLoss": "losses",
    "CrossEntropyLoss": "losses",
    "CurvatureOperator": "curvatures",
    "DivergenceError": "errors",
    "GaussNewton": "curvatures",
    "INVERSES": "inverses",
    "Hessian": "curvatures",
    "Influence": "influence",
    "KroneckerCurvature": "curvatures.kronecker",
    "KroneckerFactors": "curvatures.kronecker",
    "Loss": "losses",
    "MSELoss": "losses",
    "NonConvexLossError": "errors",
    "NotConvergedWarning": "errors",
    "PBRFError": "errors",
    "SlowPathWarning": "errors",
    "Problem": "problem",
    "SolveResult": "inverses",
    "backends": "backends",
    "explain": "explain",
    "format_plans": "explain",
    "get_loss": "losses",
    "make_curvature": "curvatures",
    "solve": "inverses",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``pbrf_fast.backends`` (or
    ``.explain``) must not rebind the public function of the same name to the module,
    which the import system does for every submodule it loads."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
