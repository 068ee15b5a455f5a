"""Training to (near) convergence, with per-example weights for removal.

Removing example z with downweighting epsilon = 1/N is training on

    (1/N) sum_i w_i L_i + weight_decay/2 ||theta||^2,   w_z = 0, others 1,

which keeps the 1/N normalisation that influence functions linearise.
"""
from __future__ import annotations

import torch

from .problem import Problem

__all__ = ["weighted_objective", "fit_lbfgs", "train_sgd"]


def weighted_objective(problem: Problem, theta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1/N) sum_i w_i L_i(theta) + weight_decay/2 ||theta||^2, differentiable, chunked."""
    total = theta.new_zeros(())
    for chunk in problem.batches():
        losses = problem.example_losses(theta, *problem.batch(chunk))
        if weights is not None:
            losses = losses * weights[chunk.to(weights.device)]
        total = total + losses.sum()
    return total / problem.n + 0.5 * problem.weight_decay * theta.pow(2).sum()


def fit_lbfgs(problem: Problem, theta0: torch.Tensor | None = None, weights: torch.Tensor | None = None,
              *, max_iter: int = 500, tolerance_grad: float = 1e-10, history_size: int = 50) -> torch.Tensor:
    """Minimise the weighted objective by full-batch L-BFGS with a strong-Wolfe line search.

    Returns the parameters (the problem itself is not modified). Meant for
    convex or small problems such as L2-regularised logistic regression.
    """
    theta = (problem.theta if theta0 is None else theta0).detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=0.0, history_size=history_size,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = weighted_objective(problem, theta, weights)
        value.backward()
        return value

    optimiser.step(closure)
    result = theta.detach()
    if not torch.isfinite(result).all():
        raise FloatingPointError("L-BFGS produced non-finite parameters")
    return result


def train_sgd(problem: Problem, epochs: int, lr: float, batch_size: int = 128, momentum: float = 0.0,
              seed: int = 0) -> torch.Tensor:
    """Mini-batch SGD on J (weight decay included) from the problem's current parameters.

    The batch order comes from ``seed`` alone, so the run can be replayed.
    Writes the result into the problem and returns it.
    """
    theta = problem.theta.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(problem.n, generator=generator).split(batch_size):
            loss = problem.example_losses(theta, *problem.batch(batch)).mean()
            loss = loss + 0.5 * problem.weight_decay * theta.pow(2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    problem.set_theta(theta.detach())
    return problem.theta
