"""Ablations (Figure 5): the five terms against one hyperparameter at a time."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .io import atomic_write_json, atomic_write_text
from .report import figure_sweep, gap_table, markdown_table
from .runner import RunFolder, choose_test_points, run_points, train_base

__all__ = ["run_sweep"]

_BUILD_OVERRIDES = {"width": int, "depth": int, "epochs": int, "weight_decay": float}


def _removal_sets(exp, parameter, value, seed):
    rng = np.random.default_rng(seed + 17)
    if parameter == "fraction_removed":
        size = max(1, int(round(value * exp.problem.n)))
        return [sorted(rng.choice(exp.problem.n, size=size, replace=False).tolist()) for _ in range(exp.n_removed)]
    return sorted(rng.choice(exp.problem.n, size=exp.n_removed, replace=False).tolist())


def run_sweep(args) -> list[dict]:
    from .cli import _arguments, _experiment

    out = Path(args.out)
    tables = []
    for value in args.values:
        overrides = {args.parameter: _BUILD_OVERRIDES[args.parameter](value)} if args.parameter in _BUILD_OVERRIDES else {}
        exp = _experiment(args, **overrides)
        if args.parameter == "damping":
            exp.responses.damping = value
        if args.parameter == "fraction_removed":
            exp.n_removed = min(exp.n_removed, 5)
        sub_args = argparse.Namespace(**(vars(args) | {"sweep_value": value}))
        folder = RunFolder(out / f"{args.parameter}={value:g}", _arguments(sub_args, exp), resume=args.resume,
                           overwrite=args.overwrite)
        base = train_base(exp, folder)
        removed = _removal_sets(exp, args.parameter, value, args.seed)
        tests = choose_test_points(len(exp.x_test), exp.n_test_points, args.seed)
        records = run_points(exp, base, removed, tests, folder, chunk=args.chunk)
        tables.append(gap_table(records))
    header = [args.parameter] + [g for g in tables[0]]
    rows = [[f"{v:g}"] + [f"{t[g]['mean']:.4f}" for g in t] for v, t in zip(args.values, tables)]
    md = f"**Sweep over {args.parameter}** (mean output distance)\n\n" + markdown_table(header, rows)
    atomic_write_text(out / "table.md", md)
    atomic_write_json(out / "results.json", {"parameter": args.parameter, "values": args.values, "gaps": tables})
    figure_sweep(out / "sweep.png", args.parameter, list(args.values), tables)
    print(md)
    return tables
