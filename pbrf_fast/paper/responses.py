"""The response objectives of Table 1, two-stage LOO (Appendix F.2), and the influence estimate.

For removed points (or groups) z with downweighting epsilon (default 1/N) each
response answers a different question; all but cold-start start from theta^s:

==================  ============================================================  ==========
response            objective                                                     init
==================  ============================================================  ==========
cold_start          J(theta) - eps L_z(theta)                                     theta^0
warm_start          J(theta) - eps L_z(theta)                                     theta^s
proximal            J(theta) - eps L_z(theta) + lam/2 ||theta - theta^s||^2       theta^s
pbrf                1/N sum_i D_L(f(theta, x_i), f(theta^s, x_i))                 theta^s
                    + wd/2 ||theta - theta^s||^2 - eps L_z(theta)
                    + lam/2 ||theta - theta^s||^2                        (Eq. 8)
linearized_pbrf     the same with f_lin and L_quad; its optimum is                theta^s
                    theta^s + eps (G + (wd + lam) I)^{-1} grad L_z   (Eq. 11)
influence           that optimum, computed by a linear solver (LiSSA by default)  -
two_stage           theta^s + warm_start(z) - warm_start(nothing)    (App. F.2)   theta^s
==================  ============================================================  ==========

Weight decay is part of J, so it enters the PBRF as its own Bregman divergence
(wd/2 ||theta - theta^s||^2): with it the linearized PBRF optimum is exactly
the damped-GNH influence estimate the library computes.

Mini-batch training: ``J`` is estimated on each batch as usual and the
removal term ``-eps L_z`` is applied at every step, which is Table 1's
objective literally and keeps the replayed batch order of the base run.
Cold-start runs K + K/2 epochs from theta^0 (the first K replaying the base
run exactly); the others K/2 epochs from theta^s, PBRF and linearized PBRF
with the learning rate divided by 10 (Appendix E.3). Many removed points are
retrained at once: their parameters are stacked (P, d) and the step is
vectorised with torch.func.vmap.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..curvatures import GaussNewton, make_curvature
from ..problem import Problem
from ..inverses import solve
from .training import TrainConfig, TrainResult, fit_lbfgs, run_epochs

__all__ = ["RESPONSES", "ResponseSettings", "Removal", "ResponseSolver"]

# Cold start with a fresh batch order uses the base seed plus this offset.
FRESH_ORDER_SEED_OFFSET = 7919

RESPONSES = ("cold_start", "warm_start", "proximal", "pbrf", "linearized_pbrf", "influence", "two_stage")


@dataclasses.dataclass
class ResponseSettings:
    """Hyperparameters of the responses; ``None`` means the paper's default."""

    damping: float = 1e-3
    epsilon: float | None = None             # default 1/N per removed point
    response_epochs: int | None = None       # default K/2
    bregman_lr_factor: float = 0.1           # PBRF and linearized PBRF learning rate factor
    linearized: str = "exact"                # "exact" (solve) or "train" (K/2 epochs, like the paper)
    influence_solver: str = "lissa"
    influence_options: dict = dataclasses.field(default_factory=dict)
    curvature: str = "gnh"                   # the influence estimate's curvature: "gnh" or "hessian"
    cold_start_order: str = "replay"         # "replay" the base run's batch order, or a "fresh" one


@dataclasses.dataclass
class Removal:
    """P removals as padded index/weight tables: replica p removes ``index[p, j]`` with weight ``weight[p, j]``."""

    index: torch.Tensor    # (P, k) long
    weight: torch.Tensor   # (P, k), epsilon per member, 0 for padding

    @classmethod
    def from_points(cls, removed, epsilon: float, n: int, dtype, device=None) -> "Removal":
        groups = [[int(i)] if not isinstance(i, (Sequence, torch.Tensor)) else [int(j) for j in i] for i in removed]
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("removed must be a non-empty list of indices or non-empty index groups")
        if any(not 0 <= i < n for g in groups for i in g):
            raise IndexError(f"removed indices must lie in [0, {n})")
        width = max(len(g) for g in groups)
        index = torch.zeros(len(groups), width, dtype=torch.long)
        weight = torch.zeros(len(groups), width, dtype=dtype)
        for p, g in enumerate(groups):
            index[p, : len(g)] = torch.tensor(g)
            weight[p, : len(g)] = epsilon
        # on the problem's device: the weights multiply its losses inside the vmapped step
        return cls(index.to(device), weight.to(device))

    def __len__(self) -> int:
        return len(self.index)


class ResponseSolver:
    """Computes each response's parameters for a set of removed points.

    ``base`` is the recorded base run (theta^0, config, theta^s); the problem
    must hold theta^s. Every method returns parameters stacked as (P, d).
    """

    def __init__(self, problem: Problem, base: TrainResult, settings: ResponseSettings | None = None,
                 progress=None):
        self.problem = problem
        self.base = base
        self.settings = settings or ResponseSettings()
        self.theta_s = base.theta
        if not torch.equal(problem.theta, base.theta):
            raise ValueError("the problem must hold the base run's trained parameters theta^s")
        self.epsilon = self.settings.epsilon if self.settings.epsilon is not None else 1.0 / problem.n
        config = base.config
        self.response_epochs = (self.settings.response_epochs if self.settings.response_epochs is not None
                                else max(1, config.epochs // 2))
        self.reference_outputs = problem.outputs(self.theta_s)  # y^s for the Bregman terms
        self.progress = progress
        self._warm_full = None

    def removal(self, removed) -> Removal:
        return Removal.from_points(removed, self.epsilon, self.problem.n, self.problem.dtype, self.problem.device)

    # ------------------------------------------------------------ objectives
    def _removal_term(self, theta, removal_index, removal_weight):
        # Plain indexing (no validation): this runs under vmap with batched indices.
        x, t = self.problem.inputs[removal_index], self.problem.targets[removal_index]
        return (removal_weight * self.problem.example_losses(theta, x, t)).sum()

    def _objective(self, kind: str):
        p, lam, wd = self.problem, self.settings.damping, self.problem.weight_decay
        theta_s = self.theta_s

        def objective(theta, batch, removal_index, removal_weight):
            x, t = p.batch(batch)
            if kind == "pbrf":
                divergence = p.loss.bregman(p.forward(theta, x), self.reference_outputs[batch], t).mean()
                value = divergence + 0.5 * (wd + lam) * (theta - theta_s).pow(2).sum()
            else:
                value = p.example_losses(theta, x, t).mean() + 0.5 * wd * theta.pow(2).sum()
                if kind == "proximal":
                    value = value + 0.5 * lam * (theta - theta_s).pow(2).sum()
            return value - self._removal_term(theta, removal_index, removal_weight)

        return objective

    def _full_objective(self, kind: str, removal_index, removal_weight):
        """The same objective over the whole training set (for L-BFGS)."""
        objective = self._objective(kind)

        def full(theta):
            total = theta.new_zeros(())
            for chunk in self.problem.batches():
                # each chunk's mean, re-weighted to the full-set mean; the
                # removal term and regularisers are added once, below
                total = total + objective(theta, chunk, removal_index, removal_weight * 0) * len(chunk)
            total = total / self.problem.n
            return total - self._removal_term(theta, removal_index, removal_weight)

        return full

    def _retrain(self, kind: str, removal: Removal, start: torch.Tensor, epochs: range, lr_scale: float,
                 config: TrainConfig | None = None):
        config = config or self.base.config
        if config.optimizer == "lbfgs":
            return torch.stack([
                fit_lbfgs(self.problem, start, objective=self._full_objective(kind, removal.index[p], removal.weight[p]))
                for p in range(len(removal))
            ])
        grad = torch.func.grad(self._objective(kind))
        batched = torch.func.vmap(grad, in_dims=(0, None, 0, 0))

        def gradient(params, batch):
            return batched(params, batch, removal.index, removal.weight)

        params = start.unsqueeze(0).repeat(len(removal), 1)
        return run_epochs(params, gradient, config, self.problem.n, epochs, lr_scale, self.progress)

    # ------------------------------------------------------------- responses
    def cold_start(self, removed) -> torch.Tensor:
        """K + K/2 epochs from theta^0, replaying the base run's batch order (Appendix E.2), or with
        ``cold_start_order="fresh"`` another seeded order, so that the retraining differs from the base
        run also by its batch noise, not only by the removed point."""
        K = self.base.config.epochs
        config = self.cold_start_config()
        return self._retrain("loo", self.removal(removed), self.base.theta0, range(K + self.response_epochs), 1.0,
                             config=config)

    def cold_start_config(self) -> TrainConfig:
        """The training config cold start runs with: the base run's, or the same with a fresh order seed."""
        order = self.settings.cold_start_order
        if order == "replay":
            return self.base.config
        if order == "fresh":
            # batch_order(n, seed, epoch) is a pure function of (seed, epoch): another seed is another order
            return dataclasses.replace(self.base.config, seed=self.base.config.seed + FRESH_ORDER_SEED_OFFSET)
        raise ValueError(f"cold_start_order must be 'replay' or 'fresh', got {order!r}")

    def warm_start(self, removed) -> torch.Tensor:
        return self._retrain("loo", self.removal(removed), self.theta_s, self._response_range(), 1.0)

    def proximal(self, removed) -> torch.Tensor:
        return self._retrain("proximal", self.removal(removed), self.theta_s, self._response_range(), 1.0)

    def pbrf(self, removed) -> torch.Tensor:
        return self._retrain("pbrf", self.removal(removed), self.theta_s, self._response_range(),
                             self.settings.bregman_lr_factor)

    def pbrf_mask(self, removed: torch.Tensor, lbfgs_max_iter: int = 500) -> torch.Tensor:
        """The PBRF response to removing each row's points together: ``removed`` is (P, n) 0/1 or boolean.

        Each removed point has weight epsilon (default 1/N), as in :meth:`pbrf` with a
        group, so the linearized optimum is theta^s + eps (G + (wd + lam) I)^{-1} sum of
        the members' gradients. With mini-batch training the removal term
        eps sum_{i removed} L_i is estimated on each batch as N eps mean_{i in B} r_i L_i
        (unbiased, and it costs nothing beyond the batch); full-batch L-BFGS
        minimises the exact objective.
        """
        removed = torch.as_tensor(removed)
        if removed.dim() != 2 or removed.shape[1] != self.problem.n:
            raise ValueError(f"removed must be a (P, {self.problem.n}) mask, got shape {tuple(removed.shape)}")
        weights = removed.to(self.problem.dtype).to(self.problem.device) * (self.epsilon * self.problem.n)
        params = self.theta_s.unsqueeze(0).repeat(len(removed), 1)
        if self.base.config.optimizer == "lbfgs":
            # The exact objective (chunk means weighted to the full-set mean); the rows are
            # independent, so one L-BFGS on their vmapped sum optimises all of them.
            batch_value = self._pbrf_mask_objective()
            n = self.problem.n

            def full(theta, w):
                return sum(batch_value(theta, chunk, w) * (len(chunk) / n) for chunk in self.problem.batches())

            per_row = torch.func.vmap(full)
            return fit_lbfgs(self.problem, params, objective=lambda stack: per_row(stack, weights).sum(),
                             max_iter=lbfgs_max_iter)
        grad = torch.func.grad(self._pbrf_mask_objective())
        batched = torch.func.vmap(grad, in_dims=(0, None, 0))

        def gradient(params, batch):
            return batched(params, batch, weights)

        return run_epochs(params, gradient, self.base.config, self.problem.n, self._response_range(),
                          self.settings.bregman_lr_factor, self.progress)

    def _pbrf_mask_objective(self):
        """Eq. 8 on a batch, the removal term estimated from per-example weights (n,): one forward pass."""
        p, lam, wd, theta_s = self.problem, self.settings.damping, self.problem.weight_decay, self.theta_s

        def value(theta, batch, weights):
            x, t = p.inputs[batch], p.targets[batch]   # plain indexing: this runs under vmap
            outputs = p.forward(theta, x)
            divergence = p.loss.bregman(outputs, self.reference_outputs[batch], t).mean()
            removal = (weights[batch] * p.loss.value(outputs, t)).mean()
            return divergence + 0.5 * (wd + lam) * (theta - theta_s).pow(2).sum() - removal

        return value

    def two_stage(self, removed) -> torch.Tensor:
        if self._warm_full is None:
            device = self.problem.device
            nothing = Removal(torch.zeros(1, 1, dtype=torch.long, device=device),
                              torch.zeros(1, 1, dtype=self.problem.dtype, device=device))
            self._warm_full = self._retrain("loo", nothing, self.theta_s, self._response_range(), 1.0)[0]
        return self.theta_s + (self.warm_start(removed) - self._warm_full)

    def _response_range(self) -> range:
        K = self.base.config.epochs
        return range(K, K + self.response_epochs)

    def removal_gradients(self, removed) -> torch.Tensor:
        """eps * sum of the removed members' loss gradients at theta^s, as columns (d, P)."""
        removal = self.removal(removed)

        def one(index, weight):
            return torch.func.grad(lambda th: self._removal_term(th, index, weight))(self.theta_s)

        return torch.func.vmap(one)(removal.index, removal.weight).T

    def linearized_pbrf(self, removed) -> torch.Tensor:
        """The linearized PBRF optimum (exact solve), or K/2 epochs on Eq. 11 with ``linearized="train"``."""
        op = GaussNewton(self.problem, self.settings.damping)
        B = self.removal_gradients(removed)
        if self.settings.linearized == "exact":
            delta = solve(op, B, method="auto").solution
            return self.theta_s + delta.T
        return self.theta_s + self._train_linearized(op, B).T

    def _train_linearized(self, op: GaussNewton, B: torch.Tensor) -> torch.Tensor:
        # Gradient of Eq. 11 in delta = theta - theta^s on a batch: (G_B + (wd + lam) I) delta - B.
        def gradient(params, batch):
            return (op.matvec(params.T.contiguous(), batch) - B).T

        delta = torch.zeros(B.shape[1], B.shape[0], dtype=B.dtype, device=B.device)
        return run_epochs(delta, gradient, self.base.config, self.problem.n, self._response_range(),
                          self.settings.bregman_lr_factor, self.progress).T

    def influence(self, removed) -> torch.Tensor:
        """theta^s + eps (C + (wd + lam) I)^{-1} grad L_z with the configured solver (LiSSA by default)."""
        op = make_curvature(self.problem, self.settings.curvature, self.settings.damping)
        result = solve(op, self.removal_gradients(removed), self.settings.influence_solver,
                       **self.settings.influence_options)
        self.last_influence_solve = result
        return self.theta_s + result.solution.T

    def compute(self, name: str, removed) -> torch.Tensor:
        if name not in RESPONSES:
            raise ValueError(f"unknown response {name!r}; choose from {RESPONSES}")
        return getattr(self, name)(removed)
