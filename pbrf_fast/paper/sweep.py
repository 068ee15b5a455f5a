"""Ablations (Figure 5): the five terms against one hyperparameter at a time."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..atomic_io import atomic_write_json, atomic_write_text
from .config import ExperimentConfig, RunOptions, SweepConfig
from .jobs import build_experiment, open_results
from .report import figure_sweep, format_number, gap_table, markdown_table
from .runner import choose_test_points, run_points, train_base

__all__ = ["run_sweep"]

# Parameters that change how the experiment is built (the others change its responses).
_BUILD_OVERRIDES = {"width": int, "depth": int, "epochs": int, "weight_decay": float}


def _removal_sets(exp, parameter, value, seed):
    rng = np.random.default_rng(seed + 17)
    if parameter == "fraction_removed":
        size = max(1, int(round(value * exp.problem.n)))
        return [sorted(rng.choice(exp.problem.n, size=size, replace=False).tolist()) for _ in range(exp.n_removed)]
    return sorted(rng.choice(exp.problem.n, size=exp.n_removed, replace=False).tolist())


def run_sweep(config: ExperimentConfig, sweep: SweepConfig, run: RunOptions) -> list[dict]:
    """One decomposition per value of ``sweep.parameter``, each in its own resumable
    folder ``run.out / "<parameter>=<value>"``; the table, JSON and figure in ``run.out``."""
    tables = []
    for value in sweep.values:
        overrides = ({sweep.parameter: _BUILD_OVERRIDES[sweep.parameter](value)}
                     if sweep.parameter in _BUILD_OVERRIDES else {})
        exp = build_experiment(config, device=run.device, **overrides)
        if sweep.parameter == "damping":
            exp.responses.damping = value
        if sweep.parameter == "fraction_removed":
            exp.n_removed = min(exp.n_removed, 5)
        folder = open_results(config, exp, dataclasses.replace(run, out=run.out / f"{sweep.parameter}={value:g}"),
                              sweep_parameter=sweep.parameter, sweep_value=value)
        base = train_base(exp, folder, progress=run.progress)
        removed = _removal_sets(exp, sweep.parameter, value, config.seed)
        tests = choose_test_points(len(exp.x_test), exp.n_test_points, config.seed)
        records = run_points(exp, base, removed, tests, folder, chunk=config.chunk, progress=run.progress)
        tables.append(gap_table(records))
    header = [sweep.parameter] + [g for g in tables[0]]
    rows = [[f"{v:g}"] + [format_number(t[g]['mean']) for g in t] for v, t in zip(sweep.values, tables)]
    md = f"**Sweep over {sweep.parameter}** (mean output distance)\n\n" + markdown_table(header, rows)
    atomic_write_text(run.out / "table.md", md)
    atomic_write_json(run.out / "results.json", {"parameter": sweep.parameter, "values": list(sweep.values),
                                                 "gaps": tables})
    figure_sweep(run.out / "sweep.png", sweep.parameter, list(sweep.values), tables,
                 title=f"{exp.name}: each term against {sweep.parameter.replace('_', ' ')} (seed {config.seed})")
    print(md)
    return tables
