"""What a score measures on a test point: a differentiable function f(outputs, targets).

Scores are ``grad f(z_test)^T (G + lambda I)^{-1} grad L(z_i) / N``: the predicted
change of the measurement f on the test point when training example z_i is removed.

- ``"loss"``: the training loss on the test point (the paper's test-loss change);
- ``"margin"``: for classification with class targets, the logit of the true class
  minus the log-sum-exp of the others (the measurement TRAK and dattri use); it
  rises as the model grows more confident in the right answer;
- any callable ``f(outputs (b, C), targets (b,...)) -> (b,)``, differentiable in the outputs.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import autodiff
from ..errors import InputError
from ..problem import Problem

__all__ = ["MEASUREMENTS", "resolve_measurement", "measurement_gradients", "margin"]

MEASUREMENTS = ("loss", "margin")


def margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """y_true - logsumexp(y_others) per example, for class-index targets."""
    if targets.dtype not in (torch.int32, torch.int64) or targets.dim() != 1:
        raise InputError("measurement 'margin' needs class-index targets of shape (b,)")
    true = outputs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = outputs.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return true - torch.logsumexp(others, -1)


def resolve_measurement(measurement, loss) -> tuple[str, Callable]:
    """(name, f) for ``"loss"``, ``"margin"`` or a callable."""
    if callable(measurement):
        return getattr(measurement, "__name__", "custom"), measurement
    if measurement == "loss":
        return "loss", loss.value
    if measurement == "margin":
        if loss.kernel_kind != "cross_entropy":
            raise InputError(f"measurement 'margin' is defined for cross_entropy classification, not {loss.name!r}")
        return "margin", margin
    raise InputError(f"measurement must be one of {MEASUREMENTS} or a callable f(outputs, targets), "
                     f"got {measurement!r}")


def measurement_gradients(problem: Problem, f: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of f at the problem's parameters, as columns (d, b)."""
    x, t = problem.check_data(x, t)
    theta = problem.theta

    def values(th, xs, ts):
        value = f(problem.forward(th, xs), ts)
        if not isinstance(value, torch.Tensor) or value.shape != (len(xs),):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"a measurement must return one value per example, shape (b,); got {shape} for "
                             f"b = {len(xs)}")
        return value

    values = autodiff.per_example_gradients(lambda th, xi, ti: values(th, xi.unsqueeze(0), ti.unsqueeze(0)).sum(),
                                            lambda th: values(th, x, t), theta, x, t)
    if not torch.isfinite(values).all():
        raise InputError("the measurement's gradient is not finite on some test point")
    return values.T.contiguous()
