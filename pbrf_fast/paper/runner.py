"""Long experiment runs that write every finished piece atomically and resume.

A run's :class:`~pbrf_fast.results_folder.ResultsFolder` holds ``arguments.json``
(everything that determines the results), ``base.pt`` (theta^0, theta^s and the
training config) and one JSON per finished removed point under ``points/``.
Rerunning with ``resume=True`` reuses all of it; a run whose arguments differ
from those on disk is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .decomposition import GAPS, decomposition_gaps, predicted_test_loss_changes, test_loss_changes
from .experiments import Experiment
from ..atomic_io import atomic_save_tensor, atomic_write_json, load_tensor
from ..results_folder import ResultsFolder
from .responses import RESPONSES, ResponseSolver
from .training import TrainConfig, TrainResult, train

__all__ = ["train_base", "run_points", "choose_removed_points", "choose_test_points"]


def train_base(exp: Experiment, folder: ResultsFolder | None = None, progress: bool = True) -> TrainResult:
    """Train the base network, or load it from the folder when it is already there."""
    path = folder.file("base.pt") if folder else None
    if path is not None and path.exists():
        saved = load_tensor(path)
        exp.problem.set_theta(saved["theta"].to(exp.problem.device))
        return TrainResult(saved["theta0"].to(exp.problem.device), exp.problem.theta.clone(),
                           TrainConfig(**saved["config"]), saved["final_objective"])
    bar = tqdm(total=exp.train.epochs, desc=f"train {exp.name}", leave=False, disable=not progress)
    result = train(exp.problem, exp.train, progress=bar.update)
    bar.close()
    if path is not None:
        # saved from the CPU, so a run started on a GPU resumes on a CPU and the other way round
        atomic_save_tensor(path, {"theta0": result.theta0.cpu(), "theta": result.theta.cpu(),
                            "config": dataclasses.asdict(result.config),
                            "final_objective": result.final_objective})
    return result


def choose_removed_points(n: int, count: int, seed: int) -> list[int]:
    """The seeded random training points an experiment removes."""
    return sorted(np.random.default_rng(seed + 17).choice(n, size=min(count, n), replace=False).tolist())


def choose_test_points(n_test: int, count: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed + 29).choice(n_test, size=min(count, n_test), replace=False).tolist())


def run_points(exp: Experiment, base: TrainResult, removed: list[int], test_idx: list[int],
               folder: ResultsFolder | None = None, chunk: int = 10, responses=RESPONSES, progress: bool = True) -> list[dict]:
    """All responses, gaps and test-loss changes for each removed point, chunk by chunk.

    A chunk's points are retrained together (vmap) and each is written as soon
    as the chunk finishes; points already on disk are skipped.
    """
    solver = ResponseSolver(exp.problem, base, exp.responses)
    x_test, t_test = exp.x_test[test_idx], exp.t_test[test_idx]
    # Single points are filed under their index, removal groups under their position.
    keys = list(removed) if all(isinstance(r, int) for r in removed) else list(range(len(removed)))
    by_key = dict(zip(keys, removed))
    done, todo = {}, []
    for key in keys:
        path = folder.point_file("removed", key) if folder else None
        if path is not None and path.exists():
            done[key] = json.loads(path.read_text())
        else:
            todo.append(key)
    bar = tqdm(total=len(removed), initial=len(done), desc=f"responses {exp.name}", leave=False,
               disable=not progress)
    for start in range(0, len(todo), chunk):
        chunk_keys = todo[start : start + chunk]
        points = [by_key[k] for k in chunk_keys]
        params = {name: solver.compute(name, points) for name in responses}
        for key, point, record in zip(chunk_keys, points, _records(exp, params, x_test, t_test)):
            record["removed"] = point
            done[key] = record
            if folder:
                atomic_write_json(folder.point_file("removed", key), record)
        bar.update(len(points))
    bar.close()
    return [done[k] for k in keys]


def _records(exp: Experiment, params: dict, x_test, t_test) -> list[dict]:
    p = exp.problem
    gaps = decomposition_gaps(p, params) if all(k in params for _, a, b in GAPS for k in (a, b)) else {}
    predicted = predicted_test_loss_changes(p, params["influence"], x_test, t_test)
    changes = {name: test_loss_changes(p, theta, x_test, t_test) for name, theta in params.items()}
    records = []
    for row in range(len(predicted)):
        records.append({
            "gaps": {name: float(values[row]) for name, values in gaps.items()},
            "predicted_test_loss_change": predicted[row].tolist(),
            "test_loss_change": {name: values[row].tolist() for name, values in changes.items()},
        })
    return records
