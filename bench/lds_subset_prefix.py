"""LDS of every stored score matrix of an evaluate run folder, on the first K subsets.

For a ground truth that covers only a prefix of the run's subsets (a PBRF run stopped
early): ``random_subsets`` draws its masks one after the other, so the first K masks of a
run with more subsets are the masks of a K-subset run. Reports, per score file and for
``retraining`` and ``pbrf``, the LDS over the first K subsets (default: all subsets both
truths cover), and the mean over checkpoints-ensembles 1, 3, 5 where those files exist.

    python bench/lds_subset_prefix.py RUN [--subsets K]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

import numpy as np

from pbrf_fast.evaluation import linear_datamodeling_score


def _truth(run: str, kind: str) -> np.ndarray:
    files = sorted(glob.glob(os.path.join(run, "points", kind, "*.json")))
    rows = [int(os.path.basename(f).split(".")[0]) for f in files]
    count = next((k for k, row in enumerate(rows) if row != k), len(rows))  # the contiguous prefix
    return np.array([json.load(open(f))["truth"] for f in files[:count]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--subsets", type=int, default=None)
    args = parser.parse_args()
    truths = {kind: _truth(args.run, kind) for kind in ("retrain", "pbrf")}
    truths = {kind: t for kind, t in truths.items() if len(t)}
    k = args.subsets or min(len(t) for t in truths.values())
    masks = np.load(os.path.join(args.run, "masks.npy"))[:k]
    by_solver: dict[str, dict[int, np.ndarray]] = {}
    for path in glob.glob(os.path.join(args.run, "scores", "*.npy")):
        stem, checkpoint = re.match(r"(.+)-(\d+)\.npy$", os.path.basename(path)).groups()
        by_solver.setdefault(stem, {})[int(checkpoint)] = np.load(path)
    print(f"first {k} subsets; truths: " + ", ".join(f"{kind} ({len(t)} stored)" for kind, t in truths.items()))
    print("| solver | checkpoints | " + " | ".join(f"LDS vs {kind}" for kind in truths) + " |")
    print("|---|---|" + "---|" * len(truths))
    for stem in sorted(by_solver):
        stored = by_solver[stem]
        for count in (1, 3, 5):
            if not all(c in stored for c in range(count)):
                continue
            scores = np.mean([stored[c] for c in range(count)], 0)
            cells = []
            for kind, truth in truths.items():
                if len(truth) < k or (kind == "pbrf" and count != 1):  # the PBRF is base model 0's
                    cells.append("-")
                    continue
                cells.append(f"{linear_datamodeling_score(scores, masks, truth[:k]).mean:.3f}")
            print(f"| {stem} | {count} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
