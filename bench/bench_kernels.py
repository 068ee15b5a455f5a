"""Compiled kernels against their torch reference, side by side, plus this
machine's matmul and copy ceilings.

    python -m pytest bench/bench_kernels.py --benchmark-only     # pytest-benchmark table
    python bench/bench_kernels.py [--cuda]                       # + speed-up ratio table

CUDA / compiled-triton cases run only where a GPU is present (skipped here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch


def kernels():
    # Imported on use, so `python bench/bench_kernels.py` (which only spawns
    # pytest and summarises) works from any directory.
    import pbrf_fast.kernels
    return pbrf_fast.kernels

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("torch", "cuda", id="torch-cuda", marks=needs_cuda),
    pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=needs_cuda),
]


def synchronizing(fn, device):
    """GPU launches are asynchronous: time until the work is done."""
    if device != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


def skip_unless_available(op_name, backend, tensor):
    try:
        kernels().plan_backend(op_name, tensor.dtype, tensor.device, backend)
    except kernels().BackendUnavailable as exc:
        pytest.skip(str(exc))


def record_bandwidth(benchmark, bytes_moved):
    benchmark.extra_info["bytes_moved"] = bytes_moved


@pytest.mark.benchmark(group="output_hessian_product CE B=4096 C=10 M=32 fp32")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_output_hessian_cross_entropy(benchmark, backend, device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 10, generator=gen).to(device)
    vectors = torch.randn(32, 4096, 10, generator=gen).to(device)
    skip_unless_available("output_hessian_product", backend, logits)
    out = torch.empty_like(vectors)
    if backend == "torch":  # the reference allocates its result, as eager code would
        fn = lambda: kernels().output_hessian_product("cross_entropy", logits, vectors, backend="torch")  # noqa: E731
    else:
        fn = lambda: kernels().output_hessian_product("cross_entropy", logits, vectors, backend=backend, out=out)  # noqa: E731
    record_bandwidth(benchmark, 2 * vectors.numel() * 4 + logits.numel() * 4)
    benchmark(synchronizing(fn, device))


@pytest.mark.benchmark(group="bregman_divergence CE B=4096 C=1000 fp32")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bregman_cross_entropy(benchmark, backend, device):
    gen = torch.Generator().manual_seed(1)
    outputs = torch.randn(4096, 1000, generator=gen).to(device)
    ref_outputs = torch.randn(4096, 1000, generator=gen).to(device)
    skip_unless_available("bregman_divergence", backend, outputs)
    record_bandwidth(benchmark, 3 * outputs.numel() * 4)
    benchmark(synchronizing(lambda: kernels().bregman_divergence("cross_entropy", outputs, ref_outputs,
                                                       backend=backend), device))


@pytest.mark.benchmark(group="lissa_update_ d=1e6 m=4 fp32")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_lissa_update(benchmark, backend, device):
    gen = torch.Generator().manual_seed(2)
    h, v, gh = (torch.randn(1_000_000, 4, generator=gen).to(device) for _ in range(3))
    skip_unless_available("lissa_update_", backend, h)
    # keep = 1 - damping/scale = 0.5: repeated steps stay bounded.
    record_bandwidth(benchmark, 4 * h.numel() * 4)
    benchmark(synchronizing(lambda: kernels().lissa_update_(h, v, gh, 0.5, 1.0, backend=backend), device))


@pytest.mark.benchmark(group="ceiling: matmul 1024^3 fp32")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_matmul_ceiling(benchmark, device):
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    benchmark.extra_info["flops"] = 2 * 1024**3
    benchmark(synchronizing(lambda: torch.mm(a, b), device))


@pytest.mark.benchmark(group="ceiling: copy 64 MiB fp32")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_copy_ceiling(benchmark, device):
    src = torch.randn(16 * 2**20, device=device)
    dst = torch.empty_like(src)
    record_bandwidth(benchmark, 2 * src.numel() * 4)  # read + write
    benchmark(synchronizing(lambda: dst.copy_(src), device))


# ---- ratio table ---------------------------------------------------------------------------------

def _summarise(results: dict) -> str:
    rows, groups = [], {}
    for bench in results["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    for group, benches in groups.items():
        medians = {b["param"]: b["stats"]["median"] for b in benches}
        for b in benches:
            median, extra = b["stats"]["median"], b.get("extra_info", {})
            device = "cuda" if "cuda" in b["param"] else "cpu"
            reference = medians.get(f"torch-{device}")
            ratio = f"{reference / median:6.2f}x" if reference and not b["param"].startswith("torch") else ""
            rate = ""
            if "bytes_moved" in extra:
                rate = f"{extra['bytes_moved'] / median / 1e9:8.1f} GB/s"
            if "flops" in extra:
                rate = f"{extra['flops'] / median / 1e9:8.1f} GFLOP/s"
            rows.append(f"{group:<48} {b['param']:<12} {median * 1e3:10.3f} ms {rate:>15} {ratio:>8}")
    header = f"{'benchmark':<48} {'backend':<12} {'median':>13} {'rate':>15} {'vs torch':>8}"
    return "\n".join([header, "-" * len(header)] + rows)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        selection = [] if "--cuda" not in argv else ["-k", "cuda"]
        code = subprocess.call([sys.executable, "-m", "pytest", __file__, "--benchmark-only",
                                "-q", "-p", "no:cacheprovider", f"--benchmark-json={path}",
                                *selection])
        if os.path.exists(path):
            with open(path) as f:
                print("\n" + _summarise(json.load(f)))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
