"""The README's `scores` command on a user's own small CNN, as a new user runs it: default
flags (exact influence, damping and solver chosen by `auto`) against `--curvature ekfac`, in
one run, end to end through the CLI (a fresh process each, so imports are counted).

    python bench/bench_user_cnn.py --data-dir ../shared/data [--work /tmp/user-cnn]

The setting (issue 30's): Conv2d(1, 8, 5), ReLU, MaxPool2d(2), Conv2d(8, 16, 5), ReLU,
MaxPool2d(2), Flatten, Linear(256, 32), ReLU, Linear(32, 10) -- d = 11,978 -- trained 10
epochs of Adam (lr 1e-3, batch 64) on 2,000 seeded MNIST training images; 10 seeded test
points; cross-entropy loss, margin measurement. Prints the wall time of each command, their
ratio, what `auto` chose (summary.json) and the Pearson correlation of the two score
matrices. Targets: default flags <= 60 s and <= 3x the EK-FAC run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

MODEL_FILE = textwrap.dedent("""
    from torch import nn


    def make_model():
        return nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
""")


def prepare(work: Path, data_dir: str) -> None:
    """my_net.py, data.pt and a trained model.pt in ``work`` (reused when present)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "my_net.py").write_text(MODEL_FILE)
    if (work / "model.pt").exists() and (work / "data.pt").exists():
        return
    from pbrf_fast.paper.data.idx import load_mnist

    x_train, y_train, x_test, y_test = load_mnist(data_dir, flatten=False)
    g = torch.Generator().manual_seed(0)
    train = torch.randperm(len(x_train), generator=g)[:2000]
    test = torch.randperm(len(x_test), generator=g)[:10]
    data = {"x_train": x_train[train].contiguous(), "y_train": y_train[train].contiguous(),
            "x_test": x_test[test].contiguous(), "y_test": y_test[test].contiguous()}
    sys.path.insert(0, str(work))
    from my_net import make_model  # noqa: E402  (the file written above)

    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        for idx in torch.randperm(2000, generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx]).backward()
            opt.step()
    torch.save(data, work / "data.pt")
    torch.save(model.state_dict(), work / "model.pt")


def run_scores(work: Path, out: str, extra: list[str]) -> float:
    command = [sys.executable, "-m", "pbrf_fast", "scores", "--model", "my_net.py:make_model",
               "--checkpoint", "model.pt", "--data", "data.pt", "--loss", "cross_entropy",
               "--measurement", "margin", "--out", out, *extra]
    # this checkout's pbrf_fast (its compiled modules built in place or copied there by install.sh's build)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if "damping" in line or "solver auto" in line or "warning" in line.lower()]
    print("\n".join(f"    {line.strip()}" for line in lines[:6]))
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("PBRF_DATA", "../shared/data"))
    parser.add_argument("--work", default="/tmp/pbrf-user-cnn")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    prepare(work, args.data_dir)
    times = {}
    for name, extra in (("default flags", []), ("--curvature ekfac", ["--curvature", "ekfac"])):
        out = work / "runs" / name.replace(" ", "_").strip("-")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        print(f"{name}:")
        times[name] = run_scores(work, str(out), extra)
        summary = json.loads((out / "summary.json").read_text())
        solves = summary.get("solves") or [{}]
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary.get("stage_seconds", {}).items())
        iterative = all(s.get("converged_columns") is not None for s in solves)
        converged = (f"{sum(s['converged_columns'] for s in solves)}/{sum(s['columns'] for s in solves)} columns "
                     "converged" if iterative else "exact inverse")
        print(f"    {times[name]:.1f} s end to end; {solves[0].get('method')} ({converged}); stages: {stages}")
    scores = [np.load(work / "runs" / n / "scores.npy") for n in ("default_flags", "curvature_ekfac")]
    pearson = float(np.corrcoef(scores[0].ravel(), scores[1].ravel())[0, 1])
    ratio = times["default flags"] / times["--curvature ekfac"]
    print(f"default / ekfac: {ratio:.2f}x (target <= 3x); default {times['default flags']:.1f} s (target <= 60 s); "
          f"Pearson between the two score matrices {pearson:.3f}")


if __name__ == "__main__":
    main()
