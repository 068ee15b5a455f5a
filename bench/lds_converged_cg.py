"""LDS of a converged exact solve on a few test columns of an existing ``pbrf-fast evaluate``
run folder, beside the solvers already stored there (same columns, same ground truths).

Converging CG on the damped GNH of the MNIST MLP (d = 101,770, damping 1e-3) costs one
GNH product over all training points per iteration and column; on the shared box that
fits for a handful of columns, not for the run's 100-500. Usage:

    python bench/lds_converged_cg.py RUN_FOLDER --columns 8 --tol 1e-3 --max-iter 200
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pbrf_fast.atomic_io import load_tensor
from pbrf_fast.evaluation import linear_datamodeling_score
from pbrf_fast.influence import Influence
from pbrf_fast.paper.config import EvaluateConfig
from pbrf_fast.paper.evaluate_job import build_setting


def truth(folder: Path, kind: str) -> np.ndarray:
    files = sorted((folder / "points" / kind).glob("*.json"))
    return np.array([json.loads(f.read_text())["truth"] for f in files])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--preconditioner", default="ekfac", help="ekfac, kfac, or none (plain CG)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    saved = json.loads((args.folder / "arguments.json").read_text())
    fields = {k: v for k, v in saved.items() if k in EvaluateConfig.__dataclass_fields__}
    config = EvaluateConfig(**fields)
    setting = build_setting(config)
    problem = setting.problem(config.seed)
    problem.set_theta(load_tensor(args.folder / "base" / "0.pt")["theta"])
    cols = slice(0, args.columns)
    if args.preconditioner == "none":
        influence = Influence(problem, config.damping, solver="cg",
                              solver_options={"tol": args.tol, "max_iter": args.max_iter})
    else:
        influence = Influence(problem, config.damping, solver="pcg",
                              solver_options={"tol": args.tol, "max_iter": args.max_iter,
                                              "preconditioner": args.preconditioner,
                                              "preconditioner_options": {"seed": config.seed}})
    start = time.perf_counter()
    scores = influence.scores(setting.x_test[cols], setting.y_test[cols]).double().numpy()
    seconds = time.perf_counter() - start
    last = influence.last_solve
    masks = np.load(args.folder / "masks.npy")
    truths = {kind: truth(args.folder, kind)[:, cols] for kind in ("retrain", "pbrf")
              if (args.folder / "points" / kind).exists()}
    rows = {f"{'cg' if args.preconditioner == 'none' else 'pcg-' + args.preconditioner} (this run)": scores}
    for path in sorted((args.folder / "scores").glob("*-0.npy")):
        rows[path.stem[:-2]] = np.load(path)[:, cols]
    print(f"{args.columns} test columns; solve {seconds:.0f} s, {int(torch.as_tensor(last.iterations).max())} "
          f"iterations, converged {int(torch.as_tensor(last.converged).sum())}/{args.columns}, "
          f"max relative residual {float(torch.as_tensor(last.residual_norms).max()):.2e}")
    for name, s in rows.items():
        cells = [f"{kind} {linear_datamodeling_score(s, masks, t).mean:.3f}" for kind, t in truths.items()]
        print(f"  {name:32s} LDS " + ", ".join(cells))


if __name__ == "__main__":
    main()
