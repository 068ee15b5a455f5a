"""Run one piece of a ``pbrf-fast evaluate`` job in another process, into the same results folder.

The evaluate job is sequential (base models, retraining, PBRF, scores). On a shared
machine where each job gets one thread, the PBRF ground truth or a slow solver's scores
can run beside the retraining: this script takes the evaluate command's arguments, waits
for the base models it needs, computes only its piece (files the job would write itself,
in the same places), and exits. A final ``pbrf-fast evaluate ... --resume`` then finds
every piece on disk and writes the table. Give two processes different pieces (or
different --solvers): they do not lock files against each other.

    python bench/evaluate_piece.py pbrf   <evaluate arguments> --out RUN
    python bench/evaluate_piece.py scores <evaluate arguments> --out RUN --solvers kernel
    python bench/evaluate_piece.py base,scores <evaluate arguments> --checkpoints 1,3,5 --out RUN

``base`` trains base models 1, 2, ... (after the job's base model 0 is on disk), so a job
run with ``--checkpoints 1`` starts its retraining at once while this trains the others.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from pbrf_fast.cli import _fields, build_parser
from pbrf_fast.evaluation import random_subsets
from pbrf_fast.paper.config import EvaluateConfig
from pbrf_fast.paper.evaluate_job import REPORT_ONLY, _all_scores, _base_models, build_setting
from pbrf_fast.paper.ground_truth import pbrf_ground_truth
from pbrf_fast.paper.responses import ResponseSettings, ResponseSolver
from pbrf_fast.results_folder import ResultsFolder


def main(argv) -> int:
    pieces, rest = argv[0].split(","), argv[1:]
    if not pieces or any(p not in ("base", "pbrf", "scores") for p in pieces):
        raise SystemExit(f"pieces must be a comma-separated list of base, pbrf, scores; got {argv[0]!r}")
    args = build_parser().parse_args(["evaluate", *rest])
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _fields(EvaluateConfig, args, pbrf=not args.no_pbrf)
    setting = build_setting(config)
    arguments = config.arguments() | {"setting": setting.name}
    while not os.path.exists(os.path.join(args.out, "base", "0.pt")):  # the main job trains base model 0
        time.sleep(20)
    folder = ResultsFolder(args.out, arguments, result_keys=[k for k in arguments if k not in REPORT_ONLY], resume=True)
    for piece in pieces:
        count = 1 if piece == "pbrf" else max(config.checkpoints)
        if piece == "scores":  # never train a base model twice: wait for the ones a "base" piece trains
            while not all(os.path.exists(os.path.join(args.out, "base", f"{c}.pt")) for c in range(count)):
                time.sleep(20)
        start = time.perf_counter()
        models = _base_models(setting, count, config.seed, folder, progress=False)
        if piece == "base":
            print(f"base models 0-{count - 1} on disk ({time.perf_counter() - start:.1f} s)", flush=True)
        elif piece == "pbrf":
            problem0, base0 = models[0]
            masks = random_subsets(problem0.n, config.subsets, config.alpha, config.seed + 101)  # as run_evaluate
            solver = ResponseSolver(problem0, base0, ResponseSettings(damping=config.damping))
            out = pbrf_ground_truth(solver, masks, setting.x_test, setting.y_test, chunk=config.chunk,
                                    folder=folder, progress=True, lbfgs_max_iter=config.lbfgs_iters)
            print(f"PBRF: {out['computed']} subsets in {out['seconds']:.1f} s", flush=True)
        else:
            out = _all_scores(models, config, setting, folder, progress=True)
            for solver, entry in out.items():
                print(solver, entry.get("skipped") or [round(i["seconds"], 1) for i in entry["info"]], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
