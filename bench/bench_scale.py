"""Score contraction (kernels/score_contraction.py) against this CPU's float32
matmul floor, on the layer shapes of ResNet-20 and of an MLP.

    python bench/bench_scale.py [--cuda]                        # ratio table
    python -m pytest bench/bench_scale.py --benchmark-only      # pytest-benchmark table

The floor of a case is (flops of its cheaper contraction order) / (torch.mm
GFLOP/s of a 2048^2 float32 product measured in the same run); ratio = time /
floor, so 1.0 is matmul speed and the target is <= 2.
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

# (name, b, t, o, i, m): ResNet-20 conv layers (unfolded), its fc layer, an MLP layer.
CASES = [
    ("resnet20-stage1-conv", 256, 1024, 16, 144, 10),
    ("resnet20-stage2-conv", 256, 256, 32, 288, 10),
    ("resnet20-stage3-conv", 256, 64, 64, 576, 10),
    ("resnet20-fc", 1024, 1, 10, 64, 10),
    ("mlp-784x1024", 2048, 1, 1024, 784, 10),
    ("mlp-1024x1024-m64", 512, 1, 1024, 1024, 64),
]


def _best(fn, device, repeats=3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(device="cpu", n=2048):
    x = torch.randn(n, n, device=device)
    return 2 * n ** 3 / _best(lambda: x @ x, device) / 1e9


def _inputs(b, t, o, i, m, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(device) for s in ((b, t, i), (b, t, o), (m, o, i))]


def table(device="cpu", backends=("torch", "cpu")):
    from pbrf_fast.kernels import BackendUnavailable, resolve
    from pbrf_fast.kernels.score_contraction import contraction_flops, score_contraction

    floor_rate = matmul_gflops(device)
    print(f"torch.mm float32 on {device}: {floor_rate:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    print(f"{'case':24s} {'backend':8s} {'ms':>9s} {'GFLOP/s':>8s} {'x floor':>8s}")
    for name, b, t, o, i, m in CASES:
        a, d, S = _inputs(b, t, o, i, m, device)
        flops = min(contraction_flops(b, t, o, i, m).values())
        for backend in backends:
            try:
                resolve("score_contraction", a, backend)
            except BackendUnavailable:
                continue
            sec = _best(lambda: score_contraction(a, d, S, backend=backend), device)
            print(f"{name:24s} {backend:8s} {sec * 1e3:9.2f} {flops / sec / 1e9:8.1f} "
                  f"{sec / (flops / (floor_rate * 1e9)):8.2f}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_score_contraction(benchmark, case, backend):
    from pbrf_fast.kernels import BackendUnavailable, resolve
    from pbrf_fast.kernels.score_contraction import score_contraction

    _, b, t, o, i, m = case
    a, d, S = _inputs(b, t, o, i, m, "cpu")
    try:
        resolve("score_contraction", a, backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    benchmark(lambda: score_contraction(a, d, S, backend=backend))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    if args.cuda:
        table("cuda", ("torch", "cuda", "triton"))
    else:
        table("cpu")
