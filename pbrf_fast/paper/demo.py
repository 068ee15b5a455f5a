"""The README's main job: what question do influence scores answer? On built-in data.

1. Logistic regression on breast cancer (convex, trained to convergence): all
   five terms vanish and influence predicts leave-one-out retraining.
2. An MLP on scikit-learn's digits (non-convex, stopped early): influence no
   longer predicts retraining (cold- or warm-start), yet it matches the PBRF;
   the gap lies in the warm-start, proximity and non-convergence terms.

Prints the decomposition and correlation tables, and writes results, tables
and figures under the output folder.
"""
from __future__ import annotations

import time
from pathlib import Path

from .config import ExperimentConfig, RunOptions
from .jobs import run_decomposition
from .report import figure_gap_bars

__all__ = ["run_demo"]


def run_demo(out: Path, seed: int = 0, log=print) -> dict:
    out = Path(out)
    start = time.perf_counter()
    results = {}
    for dataset in ("cancer", "digits"):
        t0 = time.perf_counter()
        result = run_decomposition(ExperimentConfig(dataset=dataset, seed=seed),
                                   RunOptions(out / dataset, resume=True, overwrite=True), quiet=True)
        results[dataset] = result
        log(result["markdown"])
        log(f"({dataset}: {time.perf_counter() - t0:.1f} s)\n")
    figure = figure_gap_bars(out / "decomposition.png", {d: r["gaps"] for d, r in results.items()})
    log("Reading the tables: for the converged logistic regression every term is ~0 and influence tracks\n"
        "leave-one-out retraining (cold start). For the early-stopped MLP the first three terms dominate: influence\n"
        "misses retraining but matches the PBRF, the question it actually answers.")
    log(f"demo finished in {time.perf_counter() - start:.1f} s; figure {figure}, tables and JSON under {out}/")
    return results
