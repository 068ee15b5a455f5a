"""Influence functions on top of a damped curvature operator.

Sign convention (Eq. 23 of the paper). Removing training example z is
downweighting it by epsilon = 1/N, which moves the parameters by

    delta_theta(z) = epsilon (C + (weight_decay + damping) I)^{-1} grad L(z)

and the loss of a test point by

    score(z, test) = epsilon grad L_test^T (C + (weight_decay + damping) I)^{-1} grad L(z).

A **positive score means removing z is predicted to increase the test loss**
(z helps that test point, a "proponent"); a negative score means removing z
helps it (an "opponent"). Self-influence is the score of z on its own loss,
which is >= 0 for the Gauss-Newton curvature.

The s_test trick: one solve per *test* point, s_test = A^{-1} grad L_test, done
for all m test points together as one (d, m) block; scores are then a single
matrix product with per-example training gradients.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import numpy as np
import torch

from .curvatures import curvature_kind, make_curvature
from .damping import AUTO as AUTO_DAMPING, DampingChoice, auto_damping, check_damping
from .problem import Problem, as_index
from .inverses import AUTO, SolveResult, choose_method, make_options, solve
from .errors import InputError, InputTypeError

__all__ = ["Influence"]


class Influence:
    """Influence of training examples on parameters and on test losses.

    Parameters
    ----------
    problem:
        The training problem at the parameters to analyse (theta^s).
    damping:
        lambda added to the curvature (weight decay is added on top, as part of J), or
        ``"auto"`` (the default): chosen from the curvature's spectrum by the rule of
        :mod:`pbrf_fast.damping` (the value and why: :attr:`damping_choice`).
    curvature:
        ``"gnh"`` (Gauss-Newton Hessian, the default), ``"hessian"``, or its
        Kronecker-factored approximations ``"kfac"`` / ``"ekfac"``
        (:class:`~pbrf_fast.curvatures.kronecker.KroneckerCurvature`; ``curvature_options`` go to
        it: ``relative_damping``, ``pseudo_gradients``, ``other``, ...). With those,
        ``"auto"`` solves by their exact inverse and scores contract layer by layer
        (no per-example gradient of the whole network).
    solver:
        ``"auto"`` (the cheapest exact inverse by size) or a name in
        :data:`pbrf_fast.INVERSES`: ``"direct"``, ``"kernel"``, ``"cg"``, ``"pcg"``
        (preconditioned CG on the exact operator: ``solver_options={"preconditioner":
        "nystrom", "preconditioner_rank": 200}``, or ``"ekfac"`` / ``"kfac"`` /
        ``"nystrom+ekfac"``), ``"lissa"``, ``"lowrank"``, ``"kronecker"``, ``"identity"``.
    solver_options:
        the solver's options dataclass (``pbrf_fast.inverses.CGOptions(tol=1e-8)``) or a
        dict of its fields; checked here, so a misspelt option fails before any work.
    """

    def __init__(self, problem: Problem, damping: float | str = AUTO_DAMPING, curvature: str = "gnh",
                 solver: str = "auto", solver_options: dict | None = None, curvature_options: dict | None = None):
        self.problem = problem
        damping = check_damping(damping)
        self.operator = make_curvature(problem, curvature, 0.0 if damping == AUTO_DAMPING else damping,
                                       **dict(curvature_options or {}))
        # What "auto" chose and from what (None for a damping given as a number).
        self.damping_choice: DampingChoice | None = None
        if damping == AUTO_DAMPING:
            self.damping_choice, self.operator = self._damped(damping)
        self.solver = solver
        if solver != AUTO:
            self.solver_options = make_options(solver, solver_options)
        else:  # the method, and so its options dataclass, is known only when it is chosen
            self.solver_options = dict(solver_options or {})
        self.last_solve: SolveResult | None = None

    @property
    def damping(self) -> float:
        return self.operator.damping

    def with_damping(self, damping: float | str) -> "Influence":
        """The same problem, curvature and solver at another damping (a number or ``"auto"``).
        The operator's cached work is shared, not redone: ``direct``'s eigendecomposition, the
        output-space Gram matrix, K-FAC / EK-FAC factors, a Nystrom sketch (each is built from
        the damping-free curvature), so a sweep over dampings pays for it once."""
        other = copy.copy(self)
        other.damping_choice, other.operator = self._damped(check_damping(damping))
        other.last_solve = None
        return other

    def _damped(self, damping):
        """(what "auto" chose or None, the operator at ``damping``): one place for the rule."""
        if damping != AUTO_DAMPING:
            return None, self.operator.with_damping(damping)
        choice = auto_damping(self.operator, curvature_kind(self.operator.kind).name)
        return choice, self.operator.with_damping(choice.value)

    @property
    def method(self) -> str:
        """The solver that runs (``"auto"`` resolved by problem size)."""
        return choose_method(self.operator)[0] if self.solver == "auto" else self.solver

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        self.last_solve = solve(self.operator, B, self.solver, self.solver_options)
        return self.last_solve.solution

    # -------------------------------------------------------------- gradients
    def test_gradients(self, x_test, t_test) -> torch.Tensor:
        """Gradients of each test loss, as columns (d, m)."""
        x, t = self.problem.check_data(x_test, t_test)
        chunks = [self.problem.per_example_gradients(x[b], t[b]).T
                  for b in self.problem.batches(range(len(x)), self.problem.gradient_chunk_size())]
        return torch.cat(chunks, 1)

    def s_test(self, x_test, t_test) -> torch.Tensor:
        """(C + shift I)^{-1} grad L_test for all m test points in one block solve: (d, m)."""
        return self._solve(self.test_gradients(x_test, t_test))

    # ----------------------------------------------------------------- scores
    def scores(self, x_test, t_test, train_idx=None, s_test: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted change of each test loss when each training example is removed.

        Returns ``(n_train, m)``: row i is training example ``train_idx[i]``,
        column j test point j. Positive: removal increases the test loss (see
        the module docstring). Pass ``s_test`` to reuse an earlier solve.
        """
        if s_test is None and self.method == "kernel":
            return self._output_space_scores(self.test_gradients(x_test, t_test), train_idx)
        S = self.s_test(x_test, t_test) if s_test is None else self.operator.check_vectors(s_test)
        return self.scores_from_s_test(S, train_idx)

    def _output_space_scores(self, V: torch.Tensor, train_idx) -> torch.Tensor:
        # Exact scores for every training example straight from output space:
        # no s_test in parameter space, no per-example gradients.
        from .inverses.output_space import OutputSpaceSolver

        start = time.perf_counter()
        scores = OutputSpaceSolver(self.operator).training_scores(V)
        self.last_solve = SolveResult(torch.empty(0), "kernel", 0, None, None, time.perf_counter() - start,
                                      {"path": "training scores in output space (s_test not formed)"})
        return scores if train_idx is None else scores[as_index(train_idx, self.problem.n, scores.device)]

    def scores_from_s_test(self, S: torch.Tensor, train_idx=None) -> torch.Tensor:
        epsilon = 1.0 / self.problem.n
        if curvature_kind(self.operator.kind).layerwise_scores:
            return self._layer_scores(S, train_idx) * epsilon
        rows = [grads @ S for _, grads in self.problem.training_gradients(train_idx)]
        if not rows:  # no training example asked for: an empty (0, m) block, as the kernel path gives
            return S.new_zeros(0, S.shape[1])
        return torch.cat(rows) * epsilon

    def _layer_scores(self, S: torch.Tensor, train_idx) -> torch.Tensor:
        """g_i^T S for the training examples, layer by layer with the score-contraction op
        (pbrf_fast.scale.layer_scores): no per-example gradient of the whole network."""
        import warnings

        from .scale.layer_scores import LayerScorer

        with warnings.catch_warnings():  # uncovered parameters are reported by the operator's coverage
            warnings.simplefilter("ignore")
            scorer = LayerScorer(self.problem)
        rows = [scorer.scores(*self.problem.batch(chunk), S) for chunk in self.problem.batches(train_idx)]
        return torch.cat(rows) if rows else S.new_zeros(0, S.shape[1])

    # ------------------------------------------------------ parameter changes
    def param_change(self, train_idx, epsilon: float | None = None) -> torch.Tensor:
        """Predicted parameter change from removing training examples.

        ``train_idx``: an int (returns (d,)), a sequence of ints (one column
        per example removed on its own, (d, k)), or a sequence of sequences
        (one column per *group* removed together, (d, g)). ``epsilon``
        defaults to 1/N per removed example.
        """
        if epsilon is None:
            epsilon = 1.0 / self.problem.n
        elif isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
            raise InputError(f"epsilon must be a finite number (the weight removed), got {epsilon!r}")
        epsilon = float(epsilon)
        if isinstance(train_idx, (int, np.integer)) and not isinstance(train_idx, bool):
            return self.param_change([train_idx], epsilon)[:, 0]
        groups = _as_groups(train_idx, self.problem.n)
        grads = self._group_gradients(groups)
        return self._solve(grads) * epsilon

    def _group_gradients(self, groups: list[list[int]]) -> torch.Tensor:
        flat = torch.tensor([i for g in groups for i in g], dtype=torch.long)
        owner = torch.tensor([k for k, g in enumerate(groups) for _ in g], dtype=torch.long)
        G = torch.zeros(self.problem.dim, len(groups), dtype=self.problem.dtype, device=self.problem.device)
        start = 0
        for chunk, grads in self.problem.training_gradients(flat):
            rows = owner[start : start + len(chunk)].to(G.device)
            G.index_add_(1, rows, grads.T)
            start += len(chunk)
        return G

    def self_influence(self, train_idx=None, chunk_size: int = 256) -> torch.Tensor:
        """Predicted increase of each training example's own loss on its removal: (k,)."""
        idx = as_index(train_idx, self.problem.n)
        epsilon = 1.0 / self.problem.n
        out, solves = [], []
        for chunk, grads in self.problem.training_gradients(idx, chunk_size):
            S = self._solve(grads.T)
            solves.append(self.last_solve)
            out.append((grads.T * S).sum(0) * epsilon)
        if solves:  # last_solve describes the whole call, every chunk's columns
            self.last_solve = SolveResult.combine(solves)
        if not out:
            return torch.zeros(0, dtype=self.problem.dtype, device=self.problem.device)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"Influence({self.problem!r}, operator={self.operator!r}, solver={self.solver!r})"


def _integer(value, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"train_idx: {where} must be an integer index, got {value!r}")
    return int(value)


def _as_groups(train_idx, n: int) -> list[list[int]]:
    """train_idx as removal groups: each int (or each True of a boolean mask over the
    n examples) alone, each inner sequence together."""
    if isinstance(train_idx, (torch.Tensor, np.ndarray)):
        values = torch.as_tensor(train_idx)
        if values.dtype == torch.bool:
            return [[i] for i in as_index(values, n).tolist()]
        if values.dim() > 2:
            raise InputError(f"train_idx: expected indices (k,) or groups (g, k), got shape {tuple(values.shape)}")
        train_idx = values.tolist()
    if not isinstance(train_idx, Sequence) or isinstance(train_idx, str) or len(train_idx) == 0:
        raise InputError("train_idx must be a non-empty sequence of indices or of index groups")
    groups = []
    for k, g in enumerate(train_idx):
        if isinstance(g, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(g, str):
            members = [_integer(i, f"entry {i!r} of group {k}") for i in (g.tolist() if hasattr(g, "tolist") else g)]
            if not members:
                raise InputError(f"train_idx: removal group {k} is empty")
            groups.append(members)
        else:
            groups.append([_integer(g, f"entry {k}")])
    return groups
