"""Training with a recorded start and batch order, for one model or many at once.

Every run is reproducible from ``(theta0, TrainConfig)``: the batch order of
epoch ``e`` depends only on ``(config.seed, e)``, so cold-start retraining can
replay the base run's first K epochs exactly. The optimisers are written
functionally over a stack of parameter vectors ``(P, d)``, so P retrainings
(one per removed point) advance together through ``torch.func.vmap``; a stack
of one is ordinary training, and the two agree step for step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..errors import TrainingDivergedError
from ..problem import Problem

__all__ = ["TrainConfig", "TrainResult", "batch_order", "FunctionalOptimizer", "run_epochs", "train",
           "weighted_objective", "fit_lbfgs"]


@dataclasses.dataclass
class TrainConfig:
    """How the base network is trained (and how responses are retrained).

    ``optimizer``: ``"sgd"``, ``"momentum"`` (SGD with heavy-ball momentum),
    ``"adam"`` or ``"lbfgs"`` (full batch, to convergence; ``epochs`` ignored).
    Step decay: the learning rate is multiplied by ``lr_gamma`` at each epoch
    in ``lr_milestones``.
    """

    epochs: int = 100
    lr: float = 0.03
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("sgd", "momentum", "adam", "lbfgs"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd, momentum, adam or lbfgs")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
        self.lr_milestones = tuple(self.lr_milestones)
        self.betas = tuple(self.betas)

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)


@dataclasses.dataclass
class TrainResult:
    """The recorded start, the config, and the trained parameters theta^s."""

    theta0: torch.Tensor
    theta: torch.Tensor
    config: TrainConfig
    final_objective: float


def batch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training set used in ``epoch`` (a pure function of its inputs)."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=generator)


class FunctionalOptimizer:
    """SGD / momentum / Adam on a stack of parameter vectors, with torch.optim's update rules."""

    def __init__(self, config: TrainConfig, params: torch.Tensor):
        self.config = config
        self.step_count = 0
        self.buffer = torch.zeros_like(params) if config.optimizer in ("momentum", "adam") else None
        self.second = torch.zeros_like(params) if config.optimizer == "adam" else None

    @torch.no_grad()
    def step(self, params: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
        c = self.config
        self.step_count += 1
        if c.optimizer == "sgd":
            params.sub_(lr * grads)
        elif c.optimizer == "momentum":
            if self.step_count == 1:
                self.buffer.copy_(grads)
            else:
                self.buffer.mul_(c.momentum).add_(grads)
            params.sub_(lr * self.buffer)
        else:
            b1, b2 = c.betas
            self.buffer.mul_(b1).add_(grads, alpha=1 - b1)
            self.second.mul_(b2).addcmul_(grads, grads, value=1 - b2)
            m_hat = self.buffer / (1 - b1 ** self.step_count)
            v_hat = self.second / (1 - b2 ** self.step_count)
            params.sub_(lr * m_hat / (v_hat.sqrt() + c.adam_eps))


def run_epochs(params: torch.Tensor, gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               config: TrainConfig, n: int, epochs: range, lr_scale: float = 1.0,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Advance a stack ``params`` (P, d) through ``epochs`` of mini-batches, in place.

    ``gradient(params, batch_indices) -> (P, d)``. The batch order of each
    epoch comes from :func:`batch_order`, the learning rate from the config's
    schedule at that epoch, times ``lr_scale``.
    """
    optimiser = FunctionalOptimizer(config, params)
    for epoch in epochs:
        lr = config.lr_at(epoch) * lr_scale
        for batch in batch_order(n, config.seed, epoch).split(config.batch_size):
            optimiser.step(params, gradient(params, batch), lr)
        if progress is not None:
            progress(1)
        if not torch.isfinite(params).all():
            raise TrainingDivergedError(f"training diverged at epoch {epoch}: lower the learning rate")
    return params


def _batch_objective(problem: Problem):
    def objective(theta, x, t):
        return problem.example_losses(theta, x, t).mean() + 0.5 * problem.weight_decay * theta.pow(2).sum()

    return objective


def train(problem: Problem, config: TrainConfig, theta0: torch.Tensor | None = None,
          progress: Callable[[int], None] | None = None) -> TrainResult:
    """Train J from ``theta0`` (default: the problem's current parameters) and record the run.

    The problem's parameters are set to the result.
    """
    theta0 = (problem.theta if theta0 is None else theta0).detach().clone()
    if config.optimizer == "lbfgs":
        theta = fit_lbfgs(problem, theta0)
    else:
        grad = torch.func.grad(_batch_objective(problem))

        def gradient(params, batch):
            return grad(params[0], *problem.batch(batch)).unsqueeze(0)

        theta = run_epochs(theta0.clone().unsqueeze(0), gradient, config, problem.n, range(config.epochs),
                           progress=progress)[0]
    problem.set_theta(theta)
    return TrainResult(theta0, problem.theta.clone(), config, float(problem.objective()))


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
              *, objective: Callable[[torch.Tensor], torch.Tensor] | None = None, max_iter: int = 500,
              tolerance_grad: float = 1e-10, history_size: int = 50) -> torch.Tensor:
    """Minimise an objective by full-batch L-BFGS with a strong-Wolfe line search.

    Default objective: the weighted training objective (removal = weight 0).
    Returns the parameters; the problem itself is not modified. Meant for
    convex or small problems such as L2-regularised logistic regression.
    """
    objective = objective or (lambda th: weighted_objective(problem, th, weights))
    theta = (problem.theta if theta0 is None else theta0).detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=0.0, history_size=history_size,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimiser.step(closure)
    result = theta.detach()
    if not torch.isfinite(result).all():
        raise TrainingDivergedError("L-BFGS produced non-finite parameters")
    return result
