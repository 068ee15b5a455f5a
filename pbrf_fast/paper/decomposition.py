"""Measurements of the paper: the five-term decomposition and test-loss correlations
(mislabel detection's curve is :func:`pbrf_fast.evaluation.detection_curve`).

Decomposition (Table 5): for each removed point, five distances between
consecutive responses, each the mean over training inputs of the L2 distance
between the two networks' outputs:

    warm-start gap        cold_start      vs warm_start
    proximity gap         warm_start      vs proximal
    non-convergence gap   proximal        vs pbrf
    linearization error   pbrf            vs linearized_pbrf
    solver error          linearized_pbrf vs influence
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..problem import Problem

__all__ = ["GAPS", "output_distance", "decomposition_gaps", "test_loss_changes", "predicted_test_loss_changes",
           "correlation"]

GAPS = (
    ("warm_start_gap", "cold_start", "warm_start"),
    ("proximity_gap", "warm_start", "proximal"),
    ("non_convergence_gap", "proximal", "pbrf"),
    ("linearization_error", "pbrf", "linearized_pbrf"),
    ("solver_error", "linearized_pbrf", "influence"),
)


@torch.no_grad()
def output_distance(problem: Problem, theta_a: torch.Tensor, theta_b: torch.Tensor) -> torch.Tensor:
    """Mean over training inputs of ||f(theta_a, x) - f(theta_b, x)||_2, for stacks (P, d) -> (P,)."""
    total = torch.zeros(len(theta_a), dtype=torch.float64)
    forward = torch.func.vmap(problem.forward, in_dims=(0, None))
    for chunk in problem.batches():
        x, _ = problem.batch(chunk)
        diff = forward(theta_a, x) - forward(theta_b, x)          # (P, b, C)
        total += diff.double().norm(dim=-1).sum(-1).cpu()
    return total / problem.n


def decomposition_gaps(problem: Problem, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The five gaps per removed point from each response's parameters (P, d)."""
    return {name: output_distance(problem, params[a], params[b]) for name, a, b in GAPS}


@torch.no_grad()
def test_loss_changes(problem: Problem, params: torch.Tensor, x_test, t_test) -> torch.Tensor:
    """L_test(theta_p) - L_test(theta^s) for each parameter row and test point: (P, T), in float64.

    The network is evaluated in float64 whatever its training dtype. A removed point
    moves a float32 network's test losses by ~1e-6 and the *differences between removed
    points* (what the correlations measure) by ~1e-8, while one float32 rounding step of
    a loss near 2.5 is 2.4e-7: subtracting float32 losses would report rounding
    (a barely trained VGG13 on CIFAR-10 gave identical changes for different points).
    """
    x, t = problem.check_data(x_test, t_test)
    x64 = x.double() if x.is_floating_point() else x   # token ids stay integers
    model, buffers = _float64_copy(problem)
    names, shapes, sizes = problem.param_names, problem.param_shapes, problem.param_sizes

    def losses(theta):
        tensors = {n: v.reshape(s) for n, v, s in zip(names, theta.split(sizes), shapes)}
        out = torch.func.functional_call(model, (tensors, buffers), (x64,))
        return problem.loss.value(out.reshape(out.shape[0], -1), t)

    changed = torch.func.vmap(losses)(params.double())
    return (changed - losses(problem.theta.double())).cpu()


def _float64_copy(problem: Problem):
    """A float64 copy of the problem's network and its floating buffers (the original is untouched)."""
    model = copy.deepcopy(problem.model).double()
    buffers = {k: (b.double() if b.is_floating_point() else b) for k, b in problem.buffers.items()}
    return model, buffers


def predicted_test_loss_changes(problem: Problem, influence_params: torch.Tensor, x_test, t_test) -> torch.Tensor:
    """Eq. 23: grad L_test^T (theta_IF - theta^s) for each removed point and test point: (P, T)."""
    x, t = problem.check_data(x_test, t_test)
    grads = problem.per_example_gradients(x, t)                    # (T, d)
    return ((influence_params - problem.theta) @ grads.T).double().cpu()


def _rank(a: np.ndarray) -> np.ndarray:
    order = a.argsort(kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    for value in np.unique(a):  # average ranks over ties
        tied = a == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def correlation(predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman across removed points, per test point, then mean and std over test points."""
    pearson, spearman = [], []
    for j in range(predicted.shape[1]):
        a, b = predicted[:, j].numpy(), actual[:, j].numpy()
        if a.std() == 0 or b.std() == 0:
            continue
        pearson.append(float(np.corrcoef(a, b)[0, 1]))
        spearman.append(float(np.corrcoef(_rank(a), _rank(b))[0, 1]))
    if not pearson:
        return {"pearson": float("nan"), "pearson_std": float("nan"), "spearman": float("nan"),
                "spearman_std": float("nan")}
    return {"pearson": float(np.mean(pearson)), "pearson_std": float(np.std(pearson)),
            "spearman": float(np.mean(spearman)), "spearman_std": float(np.std(spearman))}
