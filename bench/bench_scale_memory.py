"""Peak memory of a 50,000-example score run: training data from a Dataset that makes
each example when asked, against the same data as in-memory tensors.

    python bench/bench_scale_memory.py            # both, each in its own process

Each run: a small CNN on CIFAR-shaped images (3 x 32 x 32, 614 MB as float32
tensors), 10 test points, CG on a 1,000-example curvature sample. The score matrix
and results are the same; only where the training images live differs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import Dataset

N_TRAIN, N_TEST = 50_000, 10


class GeneratedImages(Dataset):
    """Example i is made from seed i on demand: nothing is held in memory."""

    def __len__(self):
        return N_TRAIN

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(3, 32, 32, generator=g), torch.randint(10, (), generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def run(kind: str, out: str) -> dict:
    from pbrf_fast.scale import ScoreArguments, ScorePipeline, ScoreTask

    torch.set_num_threads(2)
    images = GeneratedImages()
    test = torch.stack([images[i][0] for i in range(N_TEST)]), torch.stack([images[i][1] for i in range(N_TEST)])
    if kind == "tensors":
        xs, ys = zip(*(images[i] for i in range(N_TRAIN)))
        train = (torch.stack(xs), torch.stack(ys))
        del xs, ys
    else:
        train = images
    task = ScoreTask(model(), "cross_entropy", train, test)
    args = ScoreArguments(damping=1e-2, solver="cg", solver_options={"max_iter": 50, "tol": 1e-4},
                          curvature_samples=1000, batch_size=512, self_influence=False, query_chunk=N_TEST)
    summary = ScorePipeline(task, args, out, progress=False).run()
    return {"kind": kind, "peak_rss_gb": summary["peak_rss_gb"], "seconds": summary["stage_seconds"]}


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(json.dumps(run(sys.argv[1], sys.argv[2])))
        sys.exit(0)
    results = []
    for kind in ("dataset", "tensors"):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, __file__, kind, tmp], capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['kind']:8s} peak RSS {r['peak_rss_gb']:.2f} GB  stages {json.dumps(r['seconds'])}")
