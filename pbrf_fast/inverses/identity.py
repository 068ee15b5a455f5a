"""``identity``: no curvature at all, s_test = the gradient itself, so a score is the
plain gradient dot product g_test^T g_train / N: the baseline every curvature-aware
estimate is measured against (TRAK's and dattri's "grad-dot")."""
from __future__ import annotations

import dataclasses
import time

import torch

from .common import SolveResult, check_columns
from .options import InverseOptions


@dataclasses.dataclass
class IdentityOptions(InverseOptions):
    """The identity has no options."""


def identity(op, B: torch.Tensor, options: IdentityOptions) -> SolveResult:
    start = time.perf_counter()
    B2 = check_columns(op, B)
    return SolveResult(B2.clone().reshape(B.shape), "identity", 0, None, None, time.perf_counter() - start,
                       {"note": "no curvature: scores are gradient dot products"})
