"""Exact train x test scores on the paper's Concrete MLP (issue: output-space solver).

930 training points x 20 test points, MLP 8-128-128-1 trained with SGD for 200
epochs (batch 128), GNH with damping 1e-3, float32. Compares, in one session:
the output-space ("kernel") solver end to end (Gram matrix, factorisation and
Jacobian products included), CG on all 20 test points as one block, and CG one
test point at a time (the way many influence codes run it), each at 200 iterations.

Run: .venv/bin/pytest bench/bench_output_space.py --benchmark-only
Needs the Concrete CSV under $PBRF_DATA or ../shared/data.

Script mode, ResNet-20 (issue 15: "output-space solver on ResNet-20 in <= 60 s"):

    python bench/bench_output_space.py --resnet20 [--train 500] [--test 20] [--variants new,float64,old]
        [--old-train 100]

ResNet-20 (pbrf_fast.paper.resnet, seed 0, eval mode with batch-norm statistics from the
training images, float32), the first N CIFAR-10 training images and K test images,
cross-entropy, damping 1e-3: ``Influence(solver="kernel").scores`` end to end (test
gradients, J's rows, Gram, Cholesky, scores), each variant in its own process (for its
peak RSS): ``new`` (this library), ``float64`` (the same rows, every GEMM in float64: the
precision reference), ``old`` (output_space.py of commit f1595c8: vmap(jacrev) Jacobians
and a float64 Gram, at --old-train images since at 500 it peaks near 13 GB). Prints the time
breakdown (rows / GEMMs / factorisation), GEMM GFLOP/s beside the torch.mm ceiling of the
same run, and Pearson / max relative error of the scores between variants.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pbrf_fast
from pbrf_fast.paper.data import load_concrete
from pbrf_fast.paper.models import mlp
from pbrf_fast.paper.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import shared_data_dir  # noqa: E402

DAMPING = 1e-3
N_TEST = 20


@pytest.fixture(scope="module")
def concrete():
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("Concrete data not found (set PBRF_DATA)")
    x, y, x_test, y_test = load_concrete(data_dir)
    problem = pbrf_fast.Problem(mlp(8, (128, 128), 1, seed=0), "mse", x, y, batch_size=1024)
    train(problem, TrainConfig(epochs=200, lr=0.03, batch_size=128))
    problem64 = pbrf_fast.Problem(mlp(8, (128, 128), 1, dtype=torch.float64), "mse", x.double(), y.double(),
                                  batch_size=1024)
    problem64.set_theta(problem.theta.double())
    exact = pbrf_fast.Influence(problem64, DAMPING, solver="kernel").scores(x_test[:N_TEST], y_test[:N_TEST])
    return problem, x_test[:N_TEST], y_test[:N_TEST], exact


def _record(benchmark, scores, exact):
    scores = scores.double()
    benchmark.extra_info["relative_error_vs_float64"] = float((scores - exact).norm() / exact.norm())
    benchmark.extra_info["pearson_vs_exact"] = float(np.corrcoef(scores.flatten(), exact.flatten())[0, 1])


def test_kernel_end_to_end(benchmark, concrete):
    problem, x_test, y_test, exact = concrete
    benchmark.group = "concrete 930 x 20 scores"

    def run():  # a fresh Influence: nothing cached from the previous round
        return pbrf_fast.Influence(problem, DAMPING, solver="kernel").scores(x_test, y_test)

    scores = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, scores, exact)
    assert benchmark.extra_info["relative_error_vs_float64"] < 1e-3


def test_cg_block_200_iterations(benchmark, concrete):
    problem, x_test, y_test, exact = concrete
    benchmark.group = "concrete 930 x 20 scores"
    influence = pbrf_fast.Influence(problem, DAMPING, solver="cg",
                                    solver_options={"tol": 0.0, "max_iter": 200, "compute_residual": False})
    scores = benchmark.pedantic(influence.scores, args=(x_test, y_test), rounds=1)
    _record(benchmark, scores, exact)


def test_cg_loop_200_iterations_2_of_20_points(benchmark, concrete):
    """One CG solve per test point; times 2 of the 20 points (multiply by 10)."""
    problem, x_test, y_test, exact = concrete
    benchmark.group = "concrete 930 x 20 scores"
    influence = pbrf_fast.Influence(problem, DAMPING, solver="cg",
                                    solver_options={"tol": 0.0, "max_iter": 200, "compute_residual": False})
    benchmark.pedantic(lambda: [influence.scores(x_test[j:j + 1], y_test[j:j + 1]) for j in range(2)], rounds=1)


# ------------------------------------------------------------------ ResNet-20 (script mode)
OLD_COMMIT = "f1595c8"  # output_space.py before the row path, for the "old" variant


def matmul_ceiling(dtype, rows=1024, cols=8192, repeats=3) -> float:
    """GFLOP/s of torch.mm on the Gram's slice shape (rows x cols) @ (cols x rows)."""
    a, b = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    torch.mm(a, b.T)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b.T)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * rows * cols / best / 1e9


def _cifar_subset(path, n_train, n_test):
    from pbrf_fast.paper.data.cifar import load_cifar10

    x, y, x_test, y_test = load_cifar10(os.environ.get("PBRF_DATA"), n_train=n_train, n_test=n_test)
    torch.save({"x": x, "y": y, "x_test": x_test, "y_test": y_test}, path)


def _resnet_problem(data):
    from pbrf_fast.paper.resnet import resnet20

    model = resnet20(seed=0)
    model.train()
    for m in model.modules():  # cumulative batch-norm statistics of the training images
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        for lo in range(0, len(data["x"]), 100):
            model(data["x"][lo:lo + 100])
    return pbrf_fast.Problem(model.eval(), "cross_entropy", data["x"], data["y"], batch_size=100)


def _instrument(module, timings):
    """Wrap the row computation, the GEMMs and the factorisation to accumulate their time."""
    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    compute = timed("rows", module._RowStream.compute)

    def counted_rows(stream, lo, hi, *args, **kwargs):  # examples whose rows were computed (> N: recomputed)
        timings["rows_examples"] = timings.get("rows_examples", 0) + (hi - lo)
        return compute(stream, lo, hi, *args, **kwargs)

    module._RowStream.compute = counted_rows
    gemm = timed("gemm", module._mm64)

    def counted(A, B):  # the multiply-adds actually run (diagonal tiles are full squares)
        timings["gemm_flop"] = timings.get("gemm_flop", 0.0) + 2.0 * len(A) * len(B) * A.shape[1]
        return gemm(A, B)

    module._mm64 = counted
    module.torch.linalg.cholesky = timed("cholesky", module.torch.linalg.cholesky)


def _float64_mm(A, B):
    out = torch.zeros(len(A), len(B), dtype=torch.float64)
    for lo in range(0, A.shape[1], 8192):
        out += A[:, lo:lo + 8192].double() @ B[:, lo:lo + 8192].double().T
    return out


def _run_variant(variant, data_path, out_path, n_train):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = torch.load(data_path)
    data["x"], data["y"] = data["x"][:n_train], data["y"][:n_train]
    problem = _resnet_problem(data)
    timings = {}
    if variant == "old":
        import importlib.util

        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:pbrf_fast/output_space.py"], check=True,
                                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
        path = Path(tempfile.mkdtemp()) / "pbrf_fast_old_output_space.py"
        path.write_text(source.replace("from .curvature", "from pbrf_fast.curvatures")
                        .replace("from .errors", "from pbrf_fast.errors"))
        spec = importlib.util.spec_from_file_location("pbrf_fast_old_output_space", path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        influence = pbrf_fast.Influence(problem, DAMPING, solver="kernel")
        start = time.perf_counter()
        V = influence.test_gradients(data["x_test"], data["y_test"])
        scores = old.OutputSpaceSolver(influence.operator).training_scores(V)
    else:
        import pbrf_fast.inverses.output_space as module

        _instrument(module, timings)
        budget = module.default_rows_bytes()  # what the solver below will take (memory free now)
        if variant == "float64":
            module._mm64 = _float64_mm
        start = time.perf_counter()
        scores = pbrf_fast.Influence(problem, DAMPING, solver="kernel").scores(data["x_test"], data["y_test"])
    seconds = time.perf_counter() - start
    torch.save(scores, out_path)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_rss_gb": peak_gb, "n": problem.n,
                      "d": problem.dim, "timings": timings,
                      "rows_budget_gb": budget / 1e9 if variant != "old" else None}))


def _compare(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    pearson = float(np.corrcoef(a.numpy(), b.numpy())[0, 1])
    return pearson, float((a - b).abs().max() / b.abs().max()), float((a - b).norm() / b.norm())


def main_resnet(args):
    work = Path(tempfile.mkdtemp())
    data_path = work / "data.pt"
    _cifar_subset(data_path, args.train, args.test)
    print(f"load average before: {os.getloadavg()}")
    torch.set_num_threads(args.threads)
    ceilings = {str(dt): matmul_ceiling(dt) for dt in (torch.float32, torch.float64)}
    print(f"torch.mm ceiling (1024 x 8192 @ 8192 x 1024, {args.threads} threads): "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in ceilings.items()))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results, scores = {}, {}
    for variant in args.variants.split(","):
        n = args.old_train if variant.startswith("old") else args.train
        for name in ([variant] if variant != "old" else ["old", "new@old"]):
            kind = "new" if name == "new@old" else name
            out = work / f"{name}.pt"
            line = subprocess.run([sys.executable, __file__, "--variant", kind, "--data", str(data_path),
                                   "--out", str(out), "--train", str(n)], env=env, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[name] = json.loads(line)
            scores[name] = torch.load(out)
            r = results[name]
            gemm_flops = r["timings"].pop("gemm_flop", 0.0)
            examples = r["timings"].pop("rows_examples", 0)
            if examples:
                print(f"{name:8s}: rows of {examples} examples computed ({examples - r['n']} recomputed), "
                      f"row budget {r['rows_budget_gb']:.2f} GB")
            rate = gemm_flops / r["timings"]["gemm"] / 1e9 if r["timings"].get("gemm") else float("nan")
            print(f"{name:8s} N={r['n']:4d}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings"].items())
                  + (f", GEMMs {rate:.1f} GFLOP/s ({gemm_flops:.2e} flop run)" if rate == rate else ""),
                  flush=True)
    ceiling32 = ceilings[str(torch.float32)]
    if "new" in results:
        r = results["new"]
        floor = 2 * (r["n"] * 10) ** 2 * r["d"] / 2 / ceiling32 / 1e9
        print(f"GEMM floor of the Gram (upper triangle, {(r['n'] * 10) ** 2 * r['d']:.2e} flop) at this run's "
              f"float32 ceiling: {floor:.1f} s")
        if (r["n"], args.test) == (500, 20):  # the case
            print(f"target <= 60 s: {'met' if r['seconds'] <= 60 else 'missed'} ({r['seconds']:.1f} s)")
    for a, b in (("new", "float64"), ("new@old", "old")):
        if a in scores and b in scores:
            pearson, max_rel, rel = _compare(scores[a], scores[b])
            print(f"scores {a} vs {b}: Pearson {pearson:.7f}, max |diff| / max |ref| {max_rel:.2e}, "
                  f"relative Frobenius error {rel:.2e}")
    if "old" in results:
        print(f"old / new at N={results['old']['n']}: {results['old']['seconds'] / results['new@old']['seconds']:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="output-space solver on ResNet-20 (issue 15)")
    parser.add_argument("--resnet20", action="store_true")
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--old-train", type=int, default=100)
    parser.add_argument("--variants", default="new,float64,old")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _run_variant(args.variant, args.data, args.out, args.train)
    elif args.resnet20:
        main_resnet(args)
    else:
        parser.error("pass --resnet20 (the Concrete cases run under pytest --benchmark-only)")
