"""EK-FAC / K-FAC of pbrf_fast beside kronfluence's, and the EK-FAC-preconditioned exact solve.

A script, not a CI test (kronfluence is no dependency of pbrf_fast). Install it next to
the CPU torch without letting pip touch torch:

    .venv/bin/pip install --no-deps kronfluence accelerate einops einconv opt_einsum safetensors pyyaml psutil

Run (one process, the same threads for both libraries; timings of one run, ratios matter):

    PYTHONPATH=$PWD .venv/bin/python bench/bench_kronfluence.py --task concrete mnist --threads 2

Tasks: ``concrete`` (MLP 8-128-128-1, MSE, 930 train x 20 test, SGD 200 epochs, the
output-space solver as exact reference) and ``mnist`` (MLP 784-64-10, cross-entropy,
5,000 train x 100 test, 20 epochs SGD; the direct and output-space solvers do not fit:
with ``--pcg`` the exact reference is plain CG on the first ``--pcg-columns`` test points). For each: kronfluence EK-FAC and K-FAC (its defaults:
true-Fisher sampled labels, bias folded into the weight, damping = ours), pbrf_fast EK-FAC
and K-FAC with kronfluence's conventions (sampled pseudo-gradients) and with exact
pseudo-gradients, Pearson / Spearman of the scores against kronfluence's and against the
exact solve. ``--pcg`` (mnist) adds plain CG and EK-FAC-preconditioned CG to the same
residual (iterations and time), and exact scores for every test point by PCG, timed
against EK-FAC alone. ``--json FILE`` saves every number.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pbrf_fast
from pbrf_fast.paper.data import load_concrete, load_mnist
from pbrf_fast.paper.models import mlp
from pbrf_fast.paper.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import shared_data_dir  # noqa: E402

DAMPING = 1e-3


# ------------------------------------------------------------------------------------ tasks
CACHE = Path(__file__).resolve().parent / ".runs"  # gitignored


def _trained(problem, name, config):
    """Train once and keep the parameters in bench/.runs (the same seeded run every time)."""
    path = CACHE / f"kronfluence_{name}_theta.pt"
    if path.exists():
        problem.set_theta(torch.load(path))
    else:
        train(problem, config)
        CACHE.mkdir(exist_ok=True)
        torch.save(problem.theta, path)
    return problem


def concrete_task(data_dir):
    x, y, x_test, y_test = load_concrete(data_dir)
    problem = pbrf_fast.Problem(mlp(8, (128, 128), 1, seed=0), "mse", x, y, batch_size=1024)
    _trained(problem, "concrete", TrainConfig(epochs=200, lr=0.03, batch_size=128))
    return problem, x_test[:20], y_test[:20]


def mnist_task(data_dir, n_train=5000, n_test=100):
    x, y, x_test, y_test = load_mnist(data_dir)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:n_train]
    problem = pbrf_fast.Problem(mlp(784, (64,), 10, seed=0), "cross_entropy", x[idx], y[idx], batch_size=1024)
    _trained(problem, "mnist", TrainConfig(epochs=20, lr=0.1, batch_size=128))
    return problem, x_test[:n_test], y_test[:n_test]


def exact_scores(problem, x_test, y_test):
    """The damped-GNH scores of the Concrete task in float64 by the output-space solver."""
    p64 = pbrf_fast.Problem(problem.model.double(), problem.loss, problem.inputs.double(), problem.targets.double(),
                            batch_size=1024)
    start = time.perf_counter()
    scores = pbrf_fast.Influence(p64, DAMPING, solver="kernel").scores(x_test.double(), y_test.double())
    seconds = time.perf_counter() - start
    problem.model.float()
    return scores.float(), seconds


# ------------------------------------------------------------------------------ kronfluence
def kronfluence_scores(problem, x_test, y_test, strategy, out_dir, damping=DAMPING):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    regression = problem.loss.name == "mse"

    class TrainTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            out = model(x)
            if regression:  # 1/2 ||y - t||^2 (output Hessian I), sampled targets y + N(0, I)
                target = t if not sample else (out.detach() + torch.randn_like(out))
                return 0.5 * (out - target).pow(2).sum()
            if sample:
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(out.detach(), -1), 1).flatten()
            return F.cross_entropy(out, t, reduction="sum")

        def compute_measurement(self, batch, model):
            x, t = batch
            out = model(x)
            if regression:
                return 0.5 * (out - t).pow(2).sum()
            return F.cross_entropy(out, t, reduction="sum")

    x_test, y_test = problem.check_data(x_test, y_test)  # targets shaped as in training ((n, 1) for mse)
    model = prepare_model(problem.model, TrainTask())
    train_set = torch.utils.data.TensorDataset(problem.inputs, problem.targets)
    query_set = torch.utils.data.TensorDataset(x_test, y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer(f"bench_{strategy}", model, TrainTask(), cpu=True, disable_tqdm=True,
                            output_dir=str(out_dir), disable_model_save=True)
        start = time.perf_counter()
        with _single_threaded_eigh():
            analyzer.fit_all_factors("factors", train_set, per_device_batch_size=1024,
                                     factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("scores", "factors", query_set, train_set, per_device_query_batch_size=len(x_test),
                                         per_device_train_batch_size=1024,
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        seconds = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].T  # (n_train, n_test)
    # kronfluence's hooks stay on the modules; the model is reused, so remove its wrappers
    return scores / problem.n, seconds, model


@contextlib.contextmanager
def _single_threaded_eigh():
    """Give kronfluence the same eigendecomposition treatment as pbrf_fast: on this busy
    2-core box LAPACK's threaded eigh takes 23 s for a 785 x 785 factor that one thread
    decomposes in 0.23 s; without this the comparison would measure that pathology."""
    original = torch.linalg.eigh

    def eigh(M, *args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return original(M, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    torch.linalg.eigh = eigh
    try:
        yield
    finally:
        torch.linalg.eigh = original


# ------------------------------------------------------------------------------- pbrf_fast
def ours(problem, x_test, y_test, kind, pseudo_gradients):
    start = time.perf_counter()
    influence = pbrf_fast.Influence(problem, DAMPING, curvature=kind,
                                    curvature_options={"pseudo_gradients": pseudo_gradients, "seed": 0})
    scores = influence.scores(x_test, y_test)
    return scores, time.perf_counter() - start, influence.operator.factors.seconds


def pearson(a, b):
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def spearman_mean(a, b):
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.mean([spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]))


def run_task(task, data_dir, with_pcg, pcg_columns, exact_columns, pcg_full):
    problem, x_test, y_test = concrete_task(data_dir) if task == "concrete" else mnist_task(data_dir)
    rows, numbers = [], {"task": task, "n_train": problem.n, "n_test": len(x_test), "parameters": problem.dim}
    columns = slice(None)
    if task == "concrete":
        exact, numbers["exact_seconds"] = exact_scores(problem, x_test, y_test)
        numbers["exact"] = "output-space solver, float64"
    elif with_pcg:  # CG / PCG on the first test points (iterations are per column): the exact reference
        numbers["pcg"], exact = pcg_versus_cg(problem, x_test[:pcg_columns], y_test[:pcg_columns])
        columns = slice(0, pcg_columns)
        numbers["exact"] = f"CG to relative residual {numbers['pcg']['cg_max_residual']:.1e}, first {pcg_columns} test points"
    elif exact_columns:
        start = time.perf_counter()
        influence = pbrf_fast.Influence(problem, DAMPING, solver="cg", solver_options={"tol": 1e-4, "max_iter": 3000})
        exact = influence.scores(x_test[:exact_columns], y_test[:exact_columns])
        numbers["exact_seconds"] = time.perf_counter() - start
        columns = slice(0, exact_columns)
        numbers["exact"] = (f"CG to relative residual {float(influence.last_solve.residual_norms.max()):.1e} "
                            f"({int(influence.last_solve.iterations.max())} iterations), first {exact_columns} test points")
    else:
        exact = None

    def versus_exact(scores):
        return "" if exact is None else pearson(scores[:, columns], exact)

    with tempfile.TemporaryDirectory() as tmp:
        import copy

        for strategy in ("ekfac", "kfac"):
            runs = []
            for seed in (0, 1):  # kronfluence samples labels from torch's global generator
                torch.manual_seed(seed)
                twin = copy.deepcopy(problem)  # kronfluence wraps the model's modules in place
                runs.append(kronfluence_scores(twin, x_test, y_test, strategy, Path(tmp))[:2])
            (theirs, seconds), (again, _) = runs
            floor = pearson(theirs, again)  # its own sampling noise: the best any other run can agree
            numbers[f"kronfluence_{strategy}"] = {"seconds": seconds, "pearson_exact": versus_exact(theirs),
                                                  "pearson_own_rerun": floor}
            rows.append((f"kronfluence {strategy}", seconds, f"{floor:.4f} (its rerun, other seed)",
                         versus_exact(theirs), ""))
            for mode in ("sampled", "exact"):
                mine, mine_seconds, parts = ours(problem, x_test, y_test, strategy, mode)
                entry = {"seconds": mine_seconds, "factor_seconds": parts,
                         "pearson_kronfluence": pearson(mine, theirs),
                         "spearman_kronfluence": spearman_mean(mine, theirs),
                         "pearson_exact": versus_exact(mine), "time_ratio_vs_kronfluence": mine_seconds / seconds}
                numbers[f"pbrf_fast_{strategy}_{mode}"] = entry
                rows.append((f"pbrf_fast {strategy} ({mode} pseudo-gradients)", mine_seconds,
                             entry["pearson_kronfluence"], entry["pearson_exact"], entry["time_ratio_vs_kronfluence"]))
    if with_pcg and pcg_full:
        numbers["pcg_full"] = pcg_all_test_points(problem, x_test, y_test, numbers["pcg"]["cg_max_residual"],
                                                  numbers["pbrf_fast_ekfac_sampled"]["seconds"])
    print(f"\n## {task}: {problem.n} train x {len(x_test)} test, d = {problem.dim}, damping {DAMPING}")
    print(f"exact reference: {numbers.get('exact')}\n")
    print("| method | time (s) | Pearson vs kronfluence | Pearson vs exact | time / kronfluence |")
    print("|---|---|---|---|---|")
    for name, seconds, pk, pe, ratio in rows:
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else v)
        print(f"| {name} | {seconds:.2f} | {fmt(pk)} | {fmt(pe)} | {fmt(ratio)} |")
    if with_pcg:
        print(json.dumps({"pcg": numbers["pcg"], "pcg_full": numbers.get("pcg_full")}, indent=1))
    return numbers


def pcg_versus_cg(problem, x_test, y_test, cg_tol=1e-4):
    """Plain CG to tol, then EK-FAC-preconditioned CG to the residual CG reached, on the
    same columns in one run. Returns the numbers and CG's scores (the exact reference)."""
    influence = pbrf_fast.Influence(problem, DAMPING, solver="cg", solver_options={"tol": cg_tol, "max_iter": 3000})
    cg_scores = influence.scores(x_test, y_test)
    cg = influence.last_solve
    reached = float(cg.residual_norms.max())
    pcg_influence = pbrf_fast.Influence(problem, DAMPING, solver="pcg", solver_options={"tol": reached})
    pcg_scores = pcg_influence.scores(x_test, y_test)
    pcg = pcg_influence.last_solve
    numbers = {"columns": len(x_test), "cg_tol": cg_tol, "cg_iterations_max": int(cg.iterations.max()),
               "cg_seconds": cg.time, "cg_max_residual": reached, "pcg_iterations_max": int(pcg.iterations.max()),
               "pcg_max_residual": float(pcg.residual_norms.max()), "pcg_solve_seconds": pcg.time,
               "pcg_preconditioner_seconds": pcg.info["preconditioner_seconds"],
               "iteration_ratio": int(pcg.iterations.max()) / max(1, int(cg.iterations.max())),
               "pearson_pcg_vs_cg": pearson(pcg_scores, cg_scores)}
    print(json.dumps(numbers), flush=True)
    return numbers, cg_scores


def pcg_all_test_points(problem, x_test, y_test, tol, ekfac_seconds, max_iter=400):
    """Exact scores for every test point by PCG end to end (test gradients, factors,
    solve, layer-by-layer scores), timed against EK-FAC alone."""
    start = time.perf_counter()
    influence = pbrf_fast.Influence(problem, DAMPING, solver="pcg", solver_options={"tol": tol, "max_iter": max_iter})
    influence.scores(x_test, y_test)
    seconds = time.perf_counter() - start
    result = influence.last_solve
    return {"columns": len(x_test), "tol": tol, "seconds": seconds, "iterations_max": int(result.iterations.max()),
            "converged": int(result.converged.sum()), "time_over_ekfac": seconds / ekfac_seconds}


def preconditioned_spectrum(dampings=(1e-3, 1e-2)):
    """Why EK-FAC preconditions an MLP's GNH poorly: condition numbers of (G + lambda I) and of
    M^{-1/2} (G + lambda I) M^{-1/2} with M the EK-FAC / K-FAC operator, dense in float64 on
    scikit-learn's digits (MLP 64-32-10, 1,797 examples, d = 2,410)."""
    from pbrf_fast.paper.data.builtin import load_digits

    x, y, _, _ = load_digits(dtype=torch.float64)
    problem = pbrf_fast.Problem(mlp(64, (32,), 10, seed=0, dtype=torch.float64), "cross_entropy", x, y,
                                batch_size=2048)
    train(problem, TrainConfig(epochs=30, lr=0.1, batch_size=128))
    out = []
    for damping in dampings:
        A = pbrf_fast.GaussNewton(problem, damping).dense()
        plain = torch.linalg.eigvalsh(A)
        for kind in ("ekfac", "kfac"):
            L_inv = torch.linalg.inv(torch.linalg.cholesky(pbrf_fast.KroneckerCurvature(problem, damping, kind).dense()))
            pre = torch.linalg.eigvalsh(L_inv @ A @ L_inv.T)
            row = {"damping": damping, "kind": kind, "kappa": float(plain.max() / plain.min()),
                   "kappa_preconditioned": float(pre.max() / pre.min()),
                   "preconditioned_range": [float(pre.min()), float(pre.max())]}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=["concrete", "mnist"], default=["concrete", "mnist"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pcg", action="store_true", help="also CG versus EK-FAC-preconditioned CG (mnist)")
    parser.add_argument("--pcg-columns", type=int, default=10,
                        help="test points of the CG / PCG iteration comparison (iterations are per column)")
    parser.add_argument("--pcg-full", action="store_true",
                        help="with --pcg: also exact scores for every test point by PCG (long on a busy box)")
    parser.add_argument("--exact-columns", type=int, default=0,
                        help="without --pcg (mnist): plain CG scores of the first N test points as exact reference")
    parser.add_argument("--spectrum", action="store_true",
                        help="only the dense preconditioned-spectrum diagnosis on digits (float64)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or shared_data_dir()
    if args.spectrum:
        preconditioned_spectrum()
        return
    results = [run_task(task, data_dir, args.pcg and task == "mnist", args.pcg_columns, args.exact_columns,
                        args.pcg_full) for task in args.task]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
