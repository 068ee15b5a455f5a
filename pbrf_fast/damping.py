"""``damping="auto"``: the damping chosen from the curvature's own spectrum.

The damping lambda of ``(C + (weight_decay + lambda) I)^{-1}`` decides more of an influence
estimate's quality than the choice of solver does (docs/damping.md has the measurements), and
a fixed number cannot serve every model: the curvature's scale differs by orders of magnitude
between a logistic regression, an MLP and a ResNet. The rule here measures that scale on the
problem itself and sets

    lambda = factor * tr(C^2) / tr(C)

``tr(C^2) / tr(C) = sum_k l_k^2 / sum_k l_k`` is the *energy-weighted mean eigenvalue* of the
data term C (weight decay and damping excluded): the mean of C's eigenvalues, each weighted
by its own size. It follows the top of the spectrum, where the directions that move the
parameters live, and ignores the near-null directions that make the plain mean eigenvalue
``tr(C) / d`` tiny for over-parameterised nets (MNIST MLP: plain mean 5e-4, energy-weighted
mean 2.6, top eigenvalue 6.7). Both traces come from one Hutchinson pass:
``z^T C z`` and ``||C z||^2`` for ``probes`` seeded Rademacher vectors ``z``, over
``examples`` seeded training examples (an unbiased estimate of the full-data traces).
Small problems (d <= :data:`AUTO_EXACT_DIM` and at most ``examples`` training points) use the
d unit vectors instead, which gives both traces exactly; Kronecker curvatures have their
eigenvalues at hand, and use them exactly.

The factor is per curvature (:data:`AUTO_DAMPING_FACTORS`), chosen by the LDS grids of
docs/damping.md.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .errors import InputError, InputTypeError

__all__ = ["AUTO", "AUTO_DAMPING_FACTORS", "AUTO_EXACT_DIM", "DampingChoice", "auto_damping", "check_damping", "spectrum_scale"]

AUTO = "auto"

# lambda / (energy-weighted mean eigenvalue of C), per curvature: docs/damping.md has the LDS
# grids (MNIST logistic regression, MNIST MLP, CIFAR-10 ResNet-20) that chose them.
AUTO_DAMPING_FACTORS = {"gnh": 0.05, "hessian": 0.05, "kfac": 0.004, "ekfac": 0.004}

# Hutchinson's sample: probe vectors and training examples (seeded; see spectrum_scale).
AUTO_PROBES = 16
AUTO_EXAMPLES = 1024
# Up to this many parameters the traces are exact (d products in place of 16 probes: cheap
# at this size, and the rule is then a deterministic function of the problem).
AUTO_EXACT_DIM = 512


@dataclasses.dataclass(frozen=True)
class DampingChoice:
    """What ``damping="auto"`` chose, and from what."""

    value: float
    curvature: str
    factor: float
    scale: float              # tr(C^2) / tr(C): the energy-weighted mean eigenvalue
    mean_eigenvalue: float    # tr(C) / d, for the record
    method: str               # how the traces were measured
    seconds: float

    @property
    def reason(self) -> str:
        return (f"auto: {self.factor:g} x the energy-weighted mean eigenvalue tr(C^2)/tr(C) = {self.scale:.3g} of the "
                f"{self.curvature} ({self.method})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"reason": self.reason}

    def __str__(self) -> str:
        return f"damping {self.value:.3g} ({self.reason})"


def check_damping(damping, what: str = "damping"):
    """``damping`` as a non-negative float or the string ``"auto"``; a named error otherwise."""
    if isinstance(damping, str):
        if damping.strip().lower() == AUTO:
            return AUTO
        try:
            damping = float(damping)
        except ValueError:
            raise InputError(f"{what} must be a number >= 0 or 'auto', got {damping!r}") from None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise InputTypeError(f"{what} must be a number >= 0 or 'auto', got {type(damping).__name__}")
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise InputError(f"{what} must be a finite number >= 0 or 'auto', got {damping!r}")
    return damping


def spectrum_scale(operator, *, probes: int = AUTO_PROBES, examples: int = AUTO_EXAMPLES,
                   seed: int = 0) -> tuple[float, float, str]:
    """(tr(C^2) / tr(C), tr(C) / d, how measured) for the operator's data term C."""
    eigenvalues = getattr(operator, "eigenvalues", None)
    if callable(eigenvalues):  # a Kronecker curvature: its eigenvalues, exactly
        values = eigenvalues().double()
        total = float(values.sum())
        if not total > 0:
            raise InputError(f"damping='auto': the {operator.kind} curvature has no positive eigenvalue "
                             "(an untrained or constant model?); give a damping")
        return float((values * values).sum()) / total, total / operator.dim, "its eigenvalues, exactly"
    problem = operator.problem
    generator = torch.Generator().manual_seed(seed)
    n, d = operator.num_examples, operator.dim
    idx = None if n <= examples else torch.randperm(n, generator=generator)[:examples].to(problem.device)
    exact = idx is None and d <= AUTO_EXACT_DIM
    if exact:  # unit vectors: Z^T C Z = C, so both traces are exact
        Z = torch.eye(d, dtype=operator.dtype)
    else:
        Z = (torch.randint(0, 2, (d, probes), generator=generator) * 2 - 1).to(operator.dtype)
    CZ = operator.data_matvec(Z.to(operator.device), idx=idx).double().cpu()
    trace = float((Z.double() * CZ).sum())
    trace_squared = float((CZ * CZ).sum())
    if not exact:  # Hutchinson: the mean over probes
        trace, trace_squared = trace / probes, trace_squared / probes
    if not trace > 0 or not math.isfinite(trace_squared):
        raise InputError(f"damping='auto': the {operator.kind} curvature's trace estimate is {trace:g} (an "
                         "untrained or constant model, or non-finite outputs?); give a damping")
    if exact:
        return trace_squared / trace, trace / d, f"exact traces over all {n:,} examples"
    sample = f"all {n:,}" if idx is None else f"{len(idx):,} of {n:,}"
    return trace_squared / trace, trace / d, f"Hutchinson, {probes} probes over {sample} examples"


def auto_damping(operator, curvature: str | None = None, *, seed: int = 0) -> DampingChoice:
    """The damping the rule of this module gives ``operator`` (any damping it carries is ignored)."""
    import time

    curvature = curvature or getattr(operator, "kind", "gnh")
    start = time.perf_counter()
    scale, mean, method = spectrum_scale(operator, seed=seed)
    factor = AUTO_DAMPING_FACTORS.get(curvature, AUTO_DAMPING_FACTORS["gnh"])
    return DampingChoice(factor * scale, curvature, factor, scale, mean, method, time.perf_counter() - start)
