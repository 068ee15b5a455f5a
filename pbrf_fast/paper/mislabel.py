"""Mislabel detection (Appendix F.3): rank training points by self-influence from the
influence estimate and from the PBRF, and count the corrupted labels found."""
from __future__ import annotations

import json

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation import detection_auc, detection_curve
from ..atomic_io import atomic_write_json, atomic_write_text
from .report import figure_detection, markdown_table
from .responses import ResponseSolver
from .config import ExperimentConfig, RunOptions
from .jobs import ConfigError, build_experiment, open_results
from .runner import train_base

__all__ = ["self_influence_by_response", "run_mislabel", "FRACTIONS"]

FRACTIONS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
# Data sets whose labels are classes that corrupt_labels can flip (softmax cross-entropy).
MULTICLASS_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


def self_influence_by_response(solver: ResponseSolver, points: list[int]) -> dict[str, torch.Tensor]:
    """Each point's own-loss change on its removal: IF (Eq. 23, linear) and PBRF (actual)."""
    p = solver.problem
    x, t = p.batch(points)
    grads = p.per_example_gradients(x, t)                                  # (P, d)
    delta_if = solver.influence(points) - solver.theta_s
    theta_pbrf = solver.pbrf(points)
    own = torch.func.vmap(lambda th, xi, ti: p.example_losses(th, xi[None], ti[None])[0])
    base_losses = p.example_losses(solver.theta_s, x, t)
    return {"influence": (grads * delta_if).sum(1).detach().double().cpu(),
            "pbrf": (own(theta_pbrf, x, t) - base_losses).detach().double().cpu()}


def run_mislabel(config: ExperimentConfig, run: RunOptions) -> dict:
    """Figure 6: the fraction of corrupted labels found against the fraction inspected,
    ranking by influence and by PBRF self-influence. Writes table.md, results.json
    and mislabel.png into ``run.out``."""
    if config.dataset not in MULTICLASS_DATASETS or not 0 < config.corrupt < 1:
        raise ConfigError(f"mislabel needs a classification data set ({', '.join(MULTICLASS_DATASETS)}) and "
                          f"0 < --corrupt < 1; got --dataset {config.dataset} --corrupt {config.corrupt}")
    exp = build_experiment(config, device=run.device, corrupt_fraction=config.corrupt)
    folder = open_results(config, exp, run)
    out = folder.path
    base = train_base(exp, folder, progress=run.progress)
    solver = ResponseSolver(exp.problem, base, exp.responses)
    n = exp.problem.n
    count = config.candidates or (n if config.preset == "paper" else min(n, 300))
    candidates = sorted(np.random.default_rng(config.seed + 41).choice(n, size=count, replace=False).tolist())
    scores = _scores_with_resume(solver, candidates, folder, config.chunk, run.progress)
    corrupted = exp.corrupted[candidates]
    ranked = {name: torch.tensor([scores[i][name] for i in candidates]) for name in ("influence", "pbrf")}
    curves = {name: detection_curve(values, corrupted, FRACTIONS) for name, values in ranked.items()}
    aucs = {name: detection_auc(values, corrupted) for name, values in ranked.items()}
    rows = [[f"{int(100 * f)}%"] + [f"{100 * curves[k][j]:.1f}%" for k in curves] + [f"{100 * f:.0f}%"]
            for j, f in enumerate(FRACTIONS)]
    md = (f"**Mislabel detection, {exp.name}** ({int(corrupted.sum())} corrupted among {len(candidates)} scored)\n\n"
          + markdown_table(["inspected", "influence", "PBRF", "random"], rows)
          + f"\n\nArea under the curve: influence {aucs['influence']:.3f}, PBRF {aucs['pbrf']:.3f}, random 0.5\n")
    atomic_write_text(out / "table.md", md)
    atomic_write_json(out / "results.json", {"arguments": folder.arguments, "fractions": FRACTIONS, "curves": curves, "auc": aucs,
                                             "candidates": candidates, "corrupted": corrupted.tolist()})
    figure_detection(out / "mislabel.png", FRACTIONS, curves,
                     f"{exp.name}: {int(corrupted.sum())} corrupted among {len(candidates)} scored")
    print(md)
    return curves


def _scores_with_resume(solver, candidates, folder, chunk, progress) -> dict[int, dict]:
    done, todo = {}, []
    for i in candidates:
        path = folder.point_file("self_influence", i)
        if path.exists():
            done[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    bar = tqdm(total=len(candidates), initial=len(done), desc="self-influence", leave=False,
               disable=not progress)
    for start in range(0, len(todo), chunk):
        points = todo[start : start + chunk]
        values = self_influence_by_response(solver, points)
        for k, i in enumerate(points):
            done[i] = {name: float(v[k]) for name, v in values.items()}
            atomic_write_json(folder.point_file("self_influence", i), done[i])
        bar.update(len(points))
    bar.close()
    return done
