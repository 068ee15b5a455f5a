"""Ground truths for attribution metrics: models retrained on training subsets, and
the PBRF response to removing each subset's complement.

*Retraining.* A subset S is trained with the base model's recipe
(:class:`~.training.TrainConfig`: optimiser, epochs, learning-rate schedule,
batch size) on S alone, from a fresh initialisation: each epoch walks S in
batches of ``batch_size``, so every subset (all of one size) takes the same
number of steps, and many subset models advance together as one stack of
parameter vectors through ``torch.func.vmap`` (each replica gathers its own
batch). Full-batch L-BFGS recipes minimise the subset's mean loss instead
(``fit_lbfgs`` with weights n/|S| on S, 0 elsewhere). Repeats use other
initialisations and batch orders; the measurement is averaged over them.

*PBRF for groups.* :meth:`.responses.ResponseSolver.pbrf_mask` warm-starts at
theta^s and removes the complement of S with weight 1/N per point.

Both are written one subset at a time (``points/<kind>/<k>.json``, atomically)
and a rerun resumes from what is on disk.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic_io import atomic_write_json
from ..errors import TrainingDivergedError
from ..problem import Problem
from ..results_folder import ResultsFolder
from .responses import ResponseSolver
from .training import FunctionalOptimizer, TrainConfig, batch_order, fit_lbfgs, weighted_objective

__all__ = ["stacked_measurements", "train_on_subsets", "retraining_ground_truth", "pbrf_ground_truth",
           "replica_seed"]


def replica_seed(seed: int, subset: int, repeat: int) -> int:
    """The seed of one subset model (its initialisation and batch order)."""
    return int(seed) * 1_000_003 + 7_919 * int(repeat) + int(subset) + 1


def stacked_measurements(problem: Problem, params: torch.Tensor, x_test, t_test) -> torch.Tensor:
    """Test losses of each parameter vector of a stack: (P, m), float64 on the CPU."""
    x, t = problem.check_data(x_test, t_test)
    with torch.no_grad():
        losses = torch.func.vmap(lambda th: problem.example_losses(th, x, t))(params.to(problem.device))
    return losses.double().cpu()


def train_on_subsets(problem: Problem, config: TrainConfig, masks: torch.Tensor, theta0: torch.Tensor,
                     seeds: Sequence[int], progress: Callable[[int], None] | None = None,
                     lbfgs_max_iter: int = 500) -> torch.Tensor:
    """Train one model per row of ``masks`` (P, n) on that subset only, all at once.

    ``theta0``: (P, d) starting points; ``seeds[p]``: replica p's batch order.
    A full-batch L-BFGS recipe (a convex model) minimises each subset's mean loss
    to convergence; its answer does not depend on the start, so the caller may
    warm-start it.
    Every subset must have the same size (as :func:`pbrf_fast.evaluation.random_subsets`
    makes them). Returns the trained stack (P, d).
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    sizes = masks.sum(1)
    if masks.shape[1] != problem.n or len(theta0) != len(masks) or len(seeds) != len(masks):
        raise ValueError("masks (P, n), theta0 (P, d) and seeds (P,) must agree with each other and the problem")
    if config.optimizer == "lbfgs":
        # The P objectives are independent, so one L-BFGS on their sum (vmapped)
        # reaches every subset's optimum together.
        weights = (masks.to(problem.dtype) * (problem.n / sizes.to(problem.dtype)).unsqueeze(1)).to(problem.device)
        per_replica = torch.func.vmap(lambda theta, w: weighted_objective(problem, theta, w))
        return fit_lbfgs(problem, theta0, objective=lambda stack: per_replica(stack, weights).sum(),
                         max_iter=lbfgs_max_iter)
    if not bool((sizes == sizes[0]).all()):
        raise ValueError("vectorised subset training needs subsets of one size")
    members = torch.stack([torch.nonzero(row).squeeze(1) for row in masks]).to(problem.device)  # (P, s)
    wd = problem.weight_decay

    def batch_loss(tensors, batch):
        # Plain indexing: under vmap each replica gathers its own batch.
        x, t = problem.inputs[batch], problem.targets[batch]
        named = dict(zip(problem.param_names, tensors))
        out = torch.func.functional_call(problem.model, (named, problem.buffers), (x,))
        return problem.loss.value(out.reshape(out.shape[0], -1), t).mean()

    # The gradient is taken per parameter tensor (views into the flat stack), not of the
    # flat vector: that saves flattening every step's gradient (a cat of the whole
    # stack), and the weight-decay term wd * theta is added in place instead of being
    # differentiated. Equal, up to rounding, to the gradient of mean loss + wd/2 |theta|^2.
    gradient = torch.func.vmap(torch.func.grad(batch_loss))
    params = theta0.detach().clone().to(problem.device)
    views = tuple(problem.unflatten(params).values())  # (P, *shape) views sharing params' storage
    optimisers = [FunctionalOptimizer(config, view) for view in views]
    size = int(sizes[0])
    for epoch in range(config.epochs):
        order = torch.stack([batch_order(size, s, epoch) for s in seeds]).to(problem.device)
        walk = torch.gather(members, 1, order)
        lr = config.lr_at(epoch)
        for batch in walk.split(config.batch_size, dim=1):
            for view, grad, optimiser in zip(views, gradient(views, batch), optimisers):
                if wd:
                    grad.add_(view, alpha=wd)
                optimiser.step(view, grad, lr)
        if not torch.isfinite(params).all():
            raise TrainingDivergedError(f"subset training diverged at epoch {epoch}: lower the learning rate")
        if progress is not None:
            progress(1)
    return params


def _resumed(folder: ResultsFolder | None, kind: str, count: int,
             keys: Sequence[int] | None = None) -> tuple[dict[int, dict], list[int]]:
    """Rows already on disk (row k is the file ``keys[k]``, default k) and the rows to compute."""
    done, todo = {}, []
    for k in range(count):
        path = folder.point_file(kind, k if keys is None else int(keys[k])) if folder is not None else None
        if path is not None and path.exists():
            done[k] = json.loads(path.read_text())
        else:
            todo.append(k)
    return done, todo


def retraining_ground_truth(problem: Problem, config: TrainConfig, masks, make_theta0: Callable[[int], torch.Tensor],
                            x_test, t_test, *, repeats: int = 1, seed: int = 0, chunk: int = 20,
                            folder: ResultsFolder | None = None, progress: bool = True, kind: str = "retrain",
                            shared_seeds: bool = False, lbfgs_max_iter: int = 500,
                            keys: Sequence[int] | None = None) -> dict:
    """Test losses of models trained on each subset, averaged over ``repeats`` seeds.

    ``make_theta0(seed)``: a fresh initial parameter vector. Returns
    ``{"truth": (K, m) float64, "seconds", "call_seconds", "computed", "untimed"}``
    (see :func:`_timing`: "seconds" is the training time of every row, including
    rows an earlier, killed call finished); with ``folder`` each finished subset is
    written as ``points/retrain/<k>.json`` with its share of its chunks' wall time
    and skipped on a rerun (``kind`` names the folder). ``shared_seeds``: every
    subset's repeat r uses the same seed (common random numbers: leave-one-out
    changes then differ by the removed point, not by the initialisation). ``keys``:
    the file name of each row (default its index), for rows that are not one fixed
    list (leave-one-out retrainings are stored by the removed point, so a run with
    more points reuses the ones it shares with an earlier run).
    """
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    if keys is not None and (len(keys) != len(masks) or len(set(map(int, keys))) != len(keys)):
        raise ValueError(f"keys must name each of the {len(masks)} rows once, got {len(keys)}")
    done, todo = _resumed(folder, kind, len(masks), keys)
    jobs = [(k, r) for k in todo for r in range(repeats)]
    per_repeat: dict[int, list] = {k: [] for k in todo}
    spent: dict[int, float] = {k: 0.0 for k in todo}
    bar = tqdm(total=len(jobs), desc=f"{kind} subsets", leave=False, disable=not progress)
    start = time.perf_counter()
    for first in range(0, len(jobs), chunk):
        part = jobs[first : first + chunk]
        chunk_start = time.perf_counter()
        seeds = [replica_seed(seed, 0 if shared_seeds else k, r) for k, r in part]
        theta0 = torch.stack([make_theta0(s) for s in seeds])
        params = train_on_subsets(problem, config, masks[[k for k, _ in part]], theta0, seeds,
                                  lbfgs_max_iter=lbfgs_max_iter)
        losses = stacked_measurements(problem, params, x_test, t_test)
        share = (time.perf_counter() - chunk_start) / len(part)  # the chunk trains its replicas together
        for (k, _), row in zip(part, losses):
            per_repeat[k].append(row.tolist())
            spent[k] += share
            if len(per_repeat[k]) == repeats:
                done[k] = {"truth": np.mean(per_repeat[k], 0).tolist(), "repeats": per_repeat[k],
                           "seconds": spent[k]}
                if folder is not None:
                    atomic_write_json(folder.point_file(kind, k if keys is None else int(keys[k])), done[k])
        bar.update(len(part))
    bar.close()
    return _timing(done, len(masks), time.perf_counter() - start, len(todo))


def _timing(done: dict[int, dict], count: int, call_seconds: float, computed: int) -> dict:
    """The truth rows and their cost. "seconds": the wall time spent on all ``count`` rows,
    summed from each row's stored share, so a job killed and resumed reports what its ground
    truth cost, not only its last call's part; "call_seconds": this call's time;
    "untimed": rows stored without a time (written before rows carried one)."""
    untimed = sum("seconds" not in done[k] for k in range(count))
    return {"truth": np.array([done[k]["truth"] for k in range(count)]),
            "seconds": float(sum(done[k].get("seconds", 0.0) for k in range(count))),
            "call_seconds": call_seconds, "computed": computed, "untimed": untimed}


def pbrf_ground_truth(solver: ResponseSolver, masks, x_test, t_test, *, chunk: int = 20,
                      folder: ResultsFolder | None = None, progress: bool = True, lbfgs_max_iter: int = 500,
                      kind: str = "pbrf") -> dict:
    """Test losses at the PBRF response to removing each subset's complement: (K, m).

    Returns ``{"truth", "seconds", "call_seconds", "computed", "untimed"}`` like
    :func:`retraining_ground_truth`.
    """
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    done, todo = _resumed(folder, kind, len(masks))
    bar = tqdm(total=len(masks), initial=len(done), desc="PBRF subsets", leave=False, disable=not progress)
    start = time.perf_counter()
    for first in range(0, len(todo), chunk):
        part = todo[first : first + chunk]
        chunk_start = time.perf_counter()
        params = solver.pbrf_mask(~masks[part], lbfgs_max_iter=lbfgs_max_iter)
        rows = stacked_measurements(solver.problem, params, x_test, t_test)
        share = (time.perf_counter() - chunk_start) / len(part)
        for k, row in zip(part, rows):
            done[k] = {"truth": row.tolist(), "seconds": share}
            if folder is not None:
                atomic_write_json(folder.point_file(kind, k), done[k])
        bar.update(len(part))
    bar.close()
    return _timing(done, len(masks), time.perf_counter() - start, len(todo))
