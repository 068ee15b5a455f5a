"""Fused MLP Gauss-Newton product and native LiSSA against the torch paths, same run.

    python -m pytest bench/bench_mlp_kernels.py --benchmark-only   # pytest-benchmark table
    python bench/bench_mlp_kernels.py [--cuda]                     # + ratios and matmul floor
    python bench/bench_mlp_kernels.py --overhead [--baseline COMMIT]  # Python overhead per product

Pairs (float32, batch 128): fused vs torch.func product (GaussNewton backend="cpu"
or "cuda" vs backend="torch"; "auto" shows what the dispatch picks, repeated on one
operator, "auto_cold" from scratch every time) for MLP 8-128-128-1 and 784-1024-1024-10
at m = 1 and 32;
native vs Python LiSSA at the paper's MLP setting (8-128-128-1, N = 930,
batch 128, 1 repeat; the Python engine runs PY_DEPTH steps and is scaled to
DEPTH). The floor is the product's FLOP count / this machine's torch.mm rate.
"""
from __future__ import annotations

import sys
import time

import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.inverses import solve

import os  # noqa: E402

# pytest gets the device through the environment (it rejects unknown flags).
DEVICE = os.environ.get("PBRF_BENCH_DEVICE") or ("cuda" if "--cuda" in sys.argv else "cpu")
BATCH = 128
MLPS = {"8-128-128-1": (8, 128, 128, 1), "784-1024-1024-10": (784, 1024, 1024, 10)}
DEPTH, PY_DEPTH, N_TRAIN = 5000, 100, 930


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def mlp(dims):
    torch.manual_seed(0)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DEVICE)


def problem(dims, n=BATCH):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dims[0], generator=g)
    loss = "mse" if dims[-1] == 1 else "cross_entropy"
    t = torch.randn(n, 1, generator=g) if loss == "mse" else torch.randint(dims[-1], (n,), generator=g)
    return pbrf_fast.Problem(mlp(dims), loss, x.to(DEVICE), t.to(DEVICE), batch_size=512)


def product_flops(dims, m, batch=BATCH):
    """forward once; per vector: tangent (2 GEMMs, 1 on layer 1), backward (2, 1 on layer 1)."""
    return sum(2 * batch * dims[l] * dims[l + 1] * (1 + (4 if l else 2) * m) for l in range(len(dims) - 1))


def matmul_gflops():
    a = torch.randn(4096, 1024, device=DEVICE)
    b = torch.randn(1024, 1024, device=DEVICE)
    a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 1024 * 1024 / best / 1e9


@pytest.mark.parametrize("m", [1, 32])
@pytest.mark.parametrize("name", list(MLPS))
@pytest.mark.parametrize("backend", ["fused", "auto", "auto_cold", "torch"],
                         ids=["fused", "auto", "auto_cold", "torch_func"])
def test_gnh_product(benchmark, backend, name, m):
    """auto: repeated products on one operator, as in a solver (the MLP forward state
    is kept between them); auto_cold: every product from scratch."""
    dims = MLPS[name]
    p = problem(dims)
    chosen = {"fused": DEVICE, "auto_cold": "auto"}.get(backend, backend)
    op = pbrf_fast.GaussNewton(p, 1e-3, backend=chosen)
    V = torch.randn(p.dim, m, device=DEVICE)
    benchmark.group = f"gnh product {name} m={m}"
    benchmark.extra_info["flops"] = product_flops(dims, m)
    big = dims[0] > 100 and m > 1

    def run():
        if backend == "auto_cold":
            op._cache.clear()
        out = op.matvec(V)
        sync()
        return out

    if big:
        benchmark.pedantic(run, rounds=4, warmup_rounds=1)  # few rounds: each is 0.3-0.8 s
    else:
        benchmark(run)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_lissa(benchmark, engine):
    p = problem(MLPS["8-128-128-1"], N_TRAIN)
    b = torch.randn(p.dim, device=DEVICE)
    depth = DEPTH if engine == "native" else PY_DEPTH
    op = pbrf_fast.GaussNewton(p, 1e-3, backend="auto" if engine == "native" else "torch")
    benchmark.group = f"lissa 8-128-128-1 N={N_TRAIN} batch {BATCH} (python scaled from depth {PY_DEPTH})"
    benchmark.extra_info["depth"] = depth
    benchmark.extra_info["scale_to_depth"] = DEPTH / depth
    benchmark.pedantic(lambda: solve(op, b, "lissa", depth=depth, batch_size=BATCH, scale=50.0, engine=engine,
                                     compute_residual=False), rounds=2, warmup_rounds=0)


def overhead_child(rounds):
    """One process's numbers for --overhead (the pbrf_fast on PYTHONPATH): the product's Python
    overhead with the compiled work stubbed out, beside one small in-place op as the unit a
    loaded box slows alike, and the real product against the plain torch.func reference."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_conv_gnh import best_times, mlp_variants, stubbed_overhead

    torch.set_num_threads(1)
    times = {name: seconds for name, seconds in best_times(mlp_variants(), rounds, inner=200).items()}
    times.update(stubbed_overhead(rounds) or {})
    print(json.dumps({k: v * 1e6 for k, v in times.items()}))


def overhead(baseline, rounds, repeats):
    """--overhead: this tree and ``baseline`` (a commit, exported with the built extension
    copied in) alternately, ``repeats`` processes each; best of each number over them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": root}
    if baseline:
        base = tempfile.mkdtemp()
        archive = subprocess.run(["git", "archive", baseline, "pbrf_fast"], cwd=root, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        for name in os.listdir(os.path.join(root, "pbrf_fast")):
            if name.endswith(".so"):
                shutil.copy(os.path.join(root, "pbrf_fast", name), os.path.join(base, "pbrf_fast", name))
        trees[f"baseline {baseline}"] = base
    print(f"load average before: {os.getloadavg()}")
    best = {}
    for _ in range(repeats):
        for label, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--overhead-child", "--rounds", str(rounds)], env=env,
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            for k, v in json.loads(out).items():
                best.setdefault(label, {})[k] = min(best.get(label, {}).get(k, float("inf")), v)
    for label, t in best.items():
        unit = t["one in-place op"]
        print(f"{label}:")
        for k, v in t.items():
            print(f"  {k:24s} {v:9.1f} us = {v / unit:6.1f} in-place ops")
        print(f"  torch.func / matvec: {t['mlp torch_func'] / t['mlp matvec(V, idx)']:.2f}x (target >= 5); "
              f"extension call stubbed {t['extension call stubbed']:.1f} us (target < 30)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__" and ("--overhead" in sys.argv or "--overhead-child" in sys.argv):
    import argparse
    import json
    import shutil
    import subprocess
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--overhead", action="store_true", help="Python overhead of the small MLP product")
    parser.add_argument("--overhead-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="", help="a commit to time alongside, e.g. 02a9f1b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.overhead_child:
        overhead_child(args.rounds)
    else:
        overhead(args.baseline, args.rounds, args.repeats)
elif __name__ == "__main__":
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        args = [sys.executable, "-m", "pytest", __file__, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                f"--benchmark-json={out}"]
        subprocess.run(args, check=False, env=dict(os.environ, PBRF_BENCH_DEVICE=DEVICE))
        results = json.load(open(out))["benchmarks"]
    gflops = matmul_gflops()
    times = {(r["group"], r["name"]): (r["stats"]["min"], r["extra_info"]) for r in results}
    print(f"\n{DEVICE} float32 torch.mm: {gflops:.1f} GFLOP/s")
    for name in MLPS:
        for m in (1, 32):
            group = f"gnh product {name} m={m}"
            fused = times.get((group, f"test_gnh_product[fused-{name}-{m}]"))
            slow = times.get((group, f"test_gnh_product[torch_func-{name}-{m}]"))
            auto = times.get((group, f"test_gnh_product[auto-{name}-{m}]"))
            cold = times.get((group, f"test_gnh_product[auto_cold-{name}-{m}]"))
            if fused and slow:
                floor = fused[1]["flops"] / gflops / 1e9
                auto_text = (f"  auto {auto[0]*1e3:9.3f} ms ({auto[0]/floor:4.2f} floor)" if auto else "") + (
                    f"  auto cold {cold[0]*1e3:9.3f} ms ({cold[0]/floor:4.2f} floor)" if cold else "")
                print(f"{group:36s} fused {fused[0]*1e3:9.3f} ms  torch.func {slow[0]*1e3:9.3f} ms  "
                      f"speed-up {slow[0]/fused[0]:5.1f}x  floor {floor*1e3:8.3f} ms  fused/floor {fused[0]/floor:4.2f}"
                      f"{auto_text}")
    lissa_times = {k[1]: v for k, v in times.items() if k[0].startswith("lissa")}
    if len(lissa_times) == 2:
        native = lissa_times["test_lissa[native]"][0]
        python = lissa_times["test_lissa[python]"][0] * DEPTH / PY_DEPTH
        print(f"lissa depth {DEPTH}: native {native:.2f} s, python (scaled) {python:.2f} s, "
              f"speed-up {python/native:.1f}x")
