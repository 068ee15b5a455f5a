"""Score contraction (kernels/score_contraction.py) against this CPU's float32
matmul floor, on the layer shapes of ResNet-20 and of an MLP.

    python bench/bench_scale.py [--cuda]                        # ratio tables
    python -m pytest bench/bench_scale.py --benchmark-only      # pytest-benchmark table

The floor of a case is (flops of its cheaper contraction order) / (torch.mm
GFLOP/s of a 2048^2 float32 product measured in the same run); ratio = time /
floor, so 1.0 is matmul speed and the target is <= 2. A second table times ResNet-20's
convolutions from the layer input (what the scale pipeline runs), patches included.
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


# (name, b, C_in, H = W, C_out, m): ResNet-20's 3x3 stride-1 convs from the layer input, as
# the scale pipeline calls them (conv2d_score_contraction), against unfolding every patch first.
CONV_CASES = [
    ("resnet20-stage1-conv", 256, 16, 32, 16, 10),
    ("resnet20-stage2-conv", 256, 32, 16, 32, 10),
    ("resnet20-stage3-conv", 256, 64, 8, 64, 10),
]


def _best(fn, device, repeats=5):
    """Best per-call time over `repeats` samples; sub-millisecond calls are looped so
    one sample lasts >= 20 ms (timer and scheduler noise otherwise dominate)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    inner = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def matmul_gflops(device="cpu", n=2048):
    x = torch.randn(n, n, device=device)
    return 2 * n ** 3 / _best(lambda: x @ x, device) / 1e9


def _inputs(b, t, o, i, m, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(device) for s in ((b, t, i), (b, t, o), (m, o, i))]


def table(device="cpu", backends=("torch", "cpu")):
    from pbrf_fast.kernels import BackendUnavailable, plan_backend
    from pbrf_fast.kernels.score_contraction import contraction_flops, score_contraction

    floor_rate = matmul_gflops(device)
    print(f"torch.mm float32 on {device}: {floor_rate:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    print(f"{'case':24s} {'backend':8s} {'ms':>9s} {'GFLOP/s':>8s} {'x floor':>8s}")
    for name, b, t, o, i, m in CASES:
        a, d, S = _inputs(b, t, o, i, m, device)
        flops = min(contraction_flops(b, t, o, i, m).values())
        for backend in backends:
            try:
                plan_backend("score_contraction", a.dtype, a.device, backend)
            except BackendUnavailable:
                continue
            sec = _best(lambda: score_contraction(a, d, S, backend=backend), device)
            print(f"{name:24s} {backend:8s} {sec * 1e3:9.2f} {flops / sec / 1e9:8.1f} "
                  f"{sec / (flops / (floor_rate * 1e9)):8.2f}")


def _conv_paths(x, dy, S):
    """{path: call} for one conv case: auto (shifted views on CPU) and unfold-all."""
    from pbrf_fast.kernels.score_contraction import (conv2d_score_contraction, score_contraction,
                                                     unfold_conv_input)

    m, O = S.shape[:2]
    return {"auto": lambda: conv2d_score_contraction(x, dy, S, kernel_size=3, padding=1),
            "unfold_all": lambda: score_contraction(unfold_conv_input(x, 3, 1, 1, 1),
                                                    dy.flatten(2).transpose(1, 2), S.reshape(m, O, -1))}


def _conv_inputs(b, C, H, O, m, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(b, c, H, H, generator=g).to(device) for c in (C, O))
    return x, dy, torch.randn(m, O, C, 3, 3, generator=g).to(device)


def conv_table(device="cpu", repeats=5):
    """Scores of a Conv2d straight from its input: auto (shifted views on CPU) vs unfold-all."""
    floor_rate = matmul_gflops(device)
    print(f"\nConv2d from the layer input (3x3, stride 1, padding 1); floor at {floor_rate:.1f} GFLOP/s")
    print(f"{'case':24s} {'path':12s} {'ms':>9s} {'x floor':>8s}")
    for name, b, C, H, O, m in CONV_CASES:
        floor = 2 * b * O * C * 9 * (H * H + m) / (floor_rate * 1e9)
        for path, fn in _conv_paths(*_conv_inputs(b, C, H, O, m, device)).items():
            sec = _best(fn, device, repeats)
            print(f"{name:24s} {path:12s} {sec * 1e3:9.2f} {sec / floor:8.2f}")


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] + "-from-input" for c in CONV_CASES])
@pytest.mark.parametrize("path", ["auto", "unfold_all"])
def test_conv2d_from_input(benchmark, case, path):
    benchmark(_conv_paths(*_conv_inputs(*case[1:]))[path])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_score_contraction(benchmark, case, backend):
    from pbrf_fast.kernels import BackendUnavailable, plan_backend
    from pbrf_fast.kernels.score_contraction import score_contraction

    _, b, t, o, i, m = case
    a, d, S = _inputs(b, t, o, i, m, "cpu")
    try:
        plan_backend("score_contraction", a.dtype, a.device, backend)
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
        conv_table("cpu")
