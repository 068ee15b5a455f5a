"""Wall time of the retraining ground truth of ``pbrf-fast evaluate`` for the MNIST MLP
(5,000 train, 500 test, alpha 0.5, the base recipe: 10 epochs of SGD, batch 128).

Run under ``flock /tmp/pbrf-bench.lock`` and compare code versions in the same run, e.g.
``PYTHONPATH=<checkout> python bench/bench_subset_retraining.py --subsets 100 --chunk 100``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pbrf_fast.evaluation import random_subsets
from pbrf_fast.paper.config import EvaluateConfig
from pbrf_fast.paper.evaluate_job import build_setting
from pbrf_fast.paper.ground_truth import retraining_ground_truth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="write the (K, m) test losses here (.npy), to compare versions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setting = build_setting(EvaluateConfig(dataset="mnist", model="mlp", test_points=500))
    problem = setting.problem(0)
    masks = random_subsets(problem.n, args.subsets, 0.5, 101)
    print(os.popen("uptime").read().strip(), flush=True)
    start = time.perf_counter()
    out = retraining_ground_truth(problem, setting.train, masks, setting.theta0, setting.x_test, setting.y_test,
                                  chunk=args.chunk, progress=False)
    print(f"{args.subsets} subsets, chunk {args.chunk}, {torch.get_num_threads()} threads: "
          f"{time.perf_counter() - start:.1f} s wall", flush=True)
    print(os.popen("uptime").read().strip())
    if args.save:
        np.save(args.save, out["truth"])


if __name__ == "__main__":
    main()
