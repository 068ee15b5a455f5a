"""pbrf_fast: exact Gauss-Newton influence functions and the proximal Bregman
response function (PBRF) they actually approximate.

The public API lives here and nowhere else; submodules are implementation.
The paper's experiments live in :mod:`pbrf_fast.paper`, which imports this
library and is never imported by it.
"""
import torch  # noqa: F401  -- torch's OpenMP runtime must load before our extension

from .backends import backends
from .curvatures import CurvatureOperator, GaussNewton, Hessian, make_curvature
from .errors import DivergenceError, NonConvexLossError, NotConvergedWarning, PBRFError, SlowPathWarning
from .explain import explain, format_plans
from .influence import Influence
from .curvatures.kronecker import KroneckerCurvature, KroneckerFactors
from .losses import AutogradLoss, BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss, get_loss
from .problem import Problem
from .inverses import INVERSES, SolveResult, solve

__version__ = "0.1.0"

__all__ = [
    "AutogradLoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "CurvatureOperator",
    "DivergenceError",
    "GaussNewton",
    "INVERSES",
    "Hessian",
    "Influence",
    "KroneckerCurvature",
    "KroneckerFactors",
    "Loss",
    "MSELoss",
    "NonConvexLossError",
    "NotConvergedWarning",
    "PBRFError",
    "SlowPathWarning",
    "Problem",
    "SolveResult",
    "backends",
    "explain",
    "format_plans",
    "get_loss",
    "make_curvature",
    "solve",
    "__version__",
]
