"""Plain CG against preconditioned CG on the exact damped GNH: iterations, operator
column products (the preconditioner's build included) and wall time, in one run.

A script (timings are never asserted in tests). Run, one process, serialised with the
other timing runs on the shared box:

    flock /tmp/pbrf-bench.lock env PYTHONPATH=$PWD .venv/bin/python bench/bench_pcg.py --part iterations
    flock /tmp/pbrf-bench.lock env PYTHONPATH=$PWD .venv/bin/python bench/bench_pcg.py --part scores
    PYTHONPATH=$PWD .venv/bin/python bench/bench_pcg.py --part spectrum      # dense, float64, no timing
    PYTHONPATH=$PWD .venv/bin/python bench/bench_pcg.py --part resnet-spectral --images 500 --columns 20 \
        --ranks 100 250 500 1000 2000 4000 --time-products 2                 # iterations; one product timed

Task: the MNIST MLP 784-64-10 of bench_kronfluence.py (5,000 train, seeded SGD, damping 1e-3,
float32, d = 50,890).

* ``iterations``: the first ``--columns`` test gradients as one block. Plain CG to relative
  residual ``--tol``; then every preconditioner to the largest residual CG reached. Columns
  are independent CG runs, so iterations per column do not depend on the block's width.
* ``scores``: all ``--test-points`` test points end to end (test gradients, preconditioner,
  solve, train x test scores) with ``Influence(solver="pcg")`` at several tolerances, Pearson
  against the tightest, timed against EK-FAC alone (``Influence(curvature="ekfac")``).
* ``resnet``: ResNet-20 on ``--images`` seeded random CIFAR-10 training images (trained briefly,
  eval-mode batch norm), ``--columns`` test gradients: the exact output-space solve, plain CG
  and Nystrom PCG (ranks ``--ranks``) to the same residual, each solution's relative error
  against the output-space one and the Pearson of its scores.
* ``resnet-spectral``: the same comparison over many more images (the issue's 500), on the exact
  reduction of the damped GNH to the row space of the Jacobian (``spectral_reduction``: N*C
  dimensions, the output-space solver's Gram matrix, in which CG and a Gaussian Nystrom sketch
  behave as in d dimensions), with one d-dimensional product timed (``--time-products``) to turn
  the counts into wall time; ``--check`` (float64, small ``--images``) runs the d-dimensional
  solvers too, to show the counts agree.
* ``spectrum``: condition numbers of the preconditioned operator P^{-1/2}(G + mu I)P^{-1/2},
  dense in float64, on scikit-learn's digits with an MLP 64-32-10 (d = 2,410): how r was chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pbrf_fast
from pbrf_fast.inverses import PRECONDITIONERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_kronfluence import DAMPING, mnist_task  # noqa: E402
from factories import shared_data_dir  # noqa: E402

# (label, preconditioner, its options): the variants of the iteration table
VARIANTS = (
    ("ekfac", "ekfac", {}),
    ("nystrom r=100", "nystrom", {"rank": 100}),
    ("nystrom r=200", "nystrom", {"rank": 200}),
    ("nystrom r=500", "nystrom", {"rank": 500}),
    ("nystrom+ekfac r=500", "nystrom+ekfac", {"rank": 500}),
)


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def _row(label, result, scores, reference, wall):
    its = result.iterations
    build = result.info.get("preconditioner_products", 0)
    return {"method": label, "iterations_max": int(its.max()), "iterations_mean": float(its.float().mean()),
            "solve_products": result.info["operator_products"], "build_products": build,
            "total_products": result.info["operator_products"] + build,
            "build_seconds": result.info.get("preconditioner_seconds", 0.0), "seconds": wall,
            "max_residual": float(result.residual_norms.max()), "converged": int(result.converged.sum()),
            "pearson_vs_cg": None if reference is None else pearson(scores, reference)}


def iterations_part(problem, x_test, y_test, args):
    influence = pbrf_fast.Influence(problem, DAMPING, solver="cg")
    B = influence.test_gradients(x_test[:args.columns], y_test[:args.columns])
    op = influence.operator
    start = time.perf_counter()
    cg = pbrf_fast.solve(op, B, "cg", tol=args.tol, max_iter=args.max_iter)
    wall = time.perf_counter() - start
    reference = influence.scores_from_s_test(cg.solution)
    rows = [_row("cg", cg, reference, None, wall)]
    reached = float(cg.residual_norms.max())
    print(json.dumps(rows[-1]), flush=True)
    for label, name, options in VARIANTS:
        if label not in args.variants:
            continue
        start = time.perf_counter()
        result = pbrf_fast.solve(op, B, "pcg", preconditioner=name, preconditioner_options=options, tol=reached,
                                 max_iter=args.max_iter)
        wall = time.perf_counter() - start
        rows.append(_row(label, result, influence.scores_from_s_test(result.solution), reference, wall))
        print(json.dumps(rows[-1]), flush=True)
    cg_its, cg_products = rows[0]["iterations_max"], rows[0]["total_products"]
    print(f"\nMNIST MLP, {problem.n} train, {args.columns} test columns, damping {DAMPING}, d = {problem.dim}; "
          f"every method to CG's residual {reached:.2e}\n")
    print("| method | iterations (max / mean) | / CG | products: solve + build = total | / CG | build (s) | "
          "total (s) | max residual | Pearson vs CG |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pe = "" if r["pearson_vs_cg"] is None else f"{r['pearson_vs_cg']:.8f}"
        print(f"| {r['method']} | {r['iterations_max']} / {r['iterations_mean']:.1f} | "
              f"{r['iterations_max'] / cg_its:.3f} | {r['solve_products']} + {r['build_products']} = "
              f"{r['total_products']} | {r['total_products'] / cg_products:.3f} | {r['build_seconds']:.1f} | "
              f"{r['seconds']:.1f} | {r['max_residual']:.2e} | {pe} |")
    return rows


def scores_part(problem, x_test, y_test, args):
    """End-to-end exact scores by Nystrom PCG at several tolerances against EK-FAC alone."""
    out = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pbrf_fast.Influence(problem, DAMPING, curvature="ekfac").scores(x_test, y_test)
    out["ekfac_seconds"] = time.perf_counter() - start
    out["ekfac_test_points"] = len(x_test)
    print(json.dumps(out), flush=True)
    m = min(len(x_test), args.pcg_test_points or len(x_test))  # a loaded box may not afford all of them
    x_test, y_test = x_test[:m], y_test[:m]
    rows, scores = [], {}
    op = pbrf_fast.GaussNewton(problem, DAMPING)  # one operator: the sketch is built once, in the first row
    for tol in sorted(args.score_tols, reverse=True):
        influence = pbrf_fast.Influence(problem, DAMPING, solver="pcg", solver_options={
            "preconditioner": "nystrom", "preconditioner_options": {"rank": args.rank}, "tol": tol,
            "max_iter": args.max_iter})
        influence.operator = op
        start = time.perf_counter()
        scores[tol] = influence.scores(x_test, y_test)
        seconds = time.perf_counter() - start
        result = influence.last_solve
        rows.append({"tol": tol, "seconds": seconds, "iterations_max": int(result.iterations.max()),
                     "build_products": result.info["preconditioner_products"],
                     "build_seconds": result.info["preconditioner_seconds"],
                     "solve_products": result.info["operator_products"],
                     "max_residual": float(result.residual_norms.max()),
                     })
        print(json.dumps(rows[-1]), flush=True)
    tightest = scores[min(scores)]
    for r in rows:
        r["pearson_vs_tightest"] = pearson(scores[r["tol"]], tightest)
    # the first row paid for the sketch; a later row, as a fresh run, would pay it too
    sketch = rows[0]["build_seconds"]
    for r in rows:
        r["fresh_seconds"] = r["seconds"] + (0.0 if r["build_products"] else sketch)
        r["time_over_ekfac"] = r["fresh_seconds"] / out["ekfac_seconds"]
    print(f"\nexact scores, {problem.n} train x {len(x_test)} test, Nystrom r = {args.rank} PCG; EK-FAC alone "
          f"{out['ekfac_seconds']:.1f} s for {out['ekfac_test_points']} test points\n")
    print("| tol | iterations (max) | products (solve + sketch) | seconds (sketch included) | / EK-FAC | "
          "max residual | Pearson vs tightest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tol']:.0e} | {r['iterations_max']} | {r['solve_products']} + {args.rank} | "
              f"{r['fresh_seconds']:.1f} | {r['time_over_ekfac']:.2f} | {r['max_residual']:.1e} | "
              f"{r['pearson_vs_tightest']:.6f} |")
    out.update({"rows": rows, "rank": args.rank, "sketch_seconds": sketch})
    return out


def _calibrate_batchnorm(model, x):
    """Running statistics = the batch statistics of x (one pass, cumulative average): without
    this, eval-mode batch norm of a fresh ResNet-20 passes activations through unnormalised
    and its logits saturate (measured: zero test gradients after brief training)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _resnet_task(args, dtype):
    """ResNet-20 on ``--images`` seeded random CIFAR-10 training images, batch norm calibrated on
    them and frozen (eval mode), trained briefly; ``--columns`` held-out test points."""
    from pbrf_fast.paper.data.cifar import load_cifar10
    from pbrf_fast.paper.resnet import resnet20
    from pbrf_fast.paper.training import TrainConfig, train

    x, y, x_test, y_test = load_cifar10(args.data_dir or shared_data_dir())
    # the JPEG copy is stored class by class: a seeded random subset, not the first images
    g = torch.Generator().manual_seed(0)
    train_idx, test_idx = torch.randperm(len(x), generator=g)[:args.images], torch.randperm(len(x_test), generator=g)
    x, y, x_test, y_test = x[train_idx], y[train_idx], x_test[test_idx[:args.columns]], y_test[test_idx[:args.columns]]
    x, x_test = x.to(dtype), x_test.to(dtype)
    problem = pbrf_fast.Problem(resnet20(seed=0).to(dtype), "cross_entropy", x, y, batch_size=min(args.images, 256))
    start = time.perf_counter()
    saved = Path(args.model_file) if getattr(args, "model_file", None) else None
    if saved is not None and saved.exists():  # a model trained by an earlier run of the same settings
        problem.model.load_state_dict(torch.load(saved))
        problem.set_theta(torch.cat([p.detach().reshape(-1) for p in problem.model.parameters() if p.requires_grad]))
    else:
        _calibrate_batchnorm(problem.model, x)  # eval-mode statistics of these images, not the init's 0 / 1
        train(problem, TrainConfig(epochs=args.epochs, lr=0.003, batch_size=32, optimizer="momentum"))
        if saved is not None:
            torch.save(problem.model.state_dict(), saved)
    print(json.dumps({"images": args.images, "parameters": problem.dim, "dtype": str(dtype),
                      "train_seconds": time.perf_counter() - start}), flush=True)
    return problem, x_test, y_test


def _solver_runs(args):
    """(label, method, options): plain CG first (its residual is every PCG's target), then each
    Nystrom rank, then the Kronecker preconditioners asked for."""
    runs = [("cg", "cg", {})]
    runs += [(f"nystrom r={r}", "pcg", {"preconditioner": "nystrom", "preconditioner_options": {"rank": r}})
             for r in args.ranks]
    runs += [(kind, "pcg", {"preconditioner": kind}) for kind in args.kronecker]
    return runs


def _compare_solvers(op, B, exact, scores_of, args) -> list[dict]:
    """Every run of :func:`_solver_runs` on (op, B): iterations, products, error against ``exact``."""
    rows, tol = [], args.tol
    exact_scores = None if scores_of is None else scores_of(exact)
    for label, method, options in _solver_runs(args):
        if method == "pcg" and options["preconditioner"] == "nystrom" and options["preconditioner_options"]["rank"] > op.dim:
            continue
        start = time.perf_counter()
        result = pbrf_fast.solve(op, B, method, tol=tol, max_iter=args.max_iter, **options)
        seconds = time.perf_counter() - start
        if method == "cg":
            tol = float(result.residual_norms.max())  # every PCG to the residual CG reached
        error = float((result.solution.double() - exact.double()).norm() / exact.double().norm())
        build = result.info.get("preconditioner_products", 0)
        rows.append({"method": label, "iterations_max": int(result.iterations.max()),
                     "iterations_mean": float(result.iterations.double().mean()),
                     "solve_products": result.info["operator_products"], "build_products": build,
                     "total_products": result.info["operator_products"] + build, "seconds": seconds,
                     "max_residual": float(result.residual_norms.max()), "error_vs_exact": error,
                     "pearson_vs_exact": (None if scores_of is None
                                          else pearson(scores_of(result.solution), exact_scores))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _print_solver_table(title, rows):
    print(f"\n{title}\n")
    cg_its = next(r["iterations_max"] for r in rows if r["method"] == "cg")
    print("| method | iterations (max) | / CG | products (incl. build) | seconds | max residual | "
          "rel. error vs exact | Pearson vs exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pe = "" if r.get("pearson_vs_exact") is None else f"{r['pearson_vs_exact']:.8f}"
        ratio = "" if r["method"].startswith("output space") else f"{r['iterations_max'] / cg_its:.3f}"
        print(f"| {r['method']} | {r['iterations_max']} | {ratio} | {r['total_products']} | {r['seconds']:.1f} | "
              f"{r['max_residual']:.1e} | {r['error_vs_exact']:.1e} | {pe} |")


def resnet_part(args):
    # float64: at damping 1e-3 the damped GNH's condition number is ~1e7 here, and float32 products
    # leave a relative residual of ~0.5 even for the exact answer (measured), far above CG's tol
    problem, x_test, y_test = _resnet_task(args, torch.float64)
    influence = pbrf_fast.Influence(problem, DAMPING, solver="cg")
    B = influence.test_gradients(x_test, y_test)
    op = influence.operator
    start = time.perf_counter()
    exact = pbrf_fast.solve(op, B, "kernel")
    rows = [{"method": "output space (exact)", "iterations_max": 0, "total_products": 0,
             "seconds": time.perf_counter() - start, "max_residual": float(exact.residual_norms.max()),
             "error_vs_exact": 0.0, "pearson_vs_exact": 1.0}]
    print(json.dumps(rows[-1]), flush=True)
    rows += _compare_solvers(op, B, exact.solution, influence.scores_from_s_test, args)
    _print_solver_table(f"ResNet-20, {args.images} CIFAR-10 images, {args.columns} test points, damping {DAMPING}, "
                        f"d = {problem.dim}", rows)
    return rows


# ------------------------------------------------------------------ the spectral reduction
def spectral_reduction(op, B, memory_bytes=None, zero_level=1e-9):
    """The damped GNH solve of (op, B), reduced exactly to the row space of K (N*C rows).

    With K K^T = W diag(sigma) W^T (the output-space solver's Gram matrix) and G = K^T K / N,
    the unit vectors u_i = K^T w_i / sqrt(sigma_i) are G's eigenvectors with eigenvalues
    sigma_i / N, and every other direction has eigenvalue 0. In the orthonormal basis
    [u_1 .. u_r, b_perp_1 / |b_perp_1|, ...] (b_perp_j: column j's part outside the row space)
    G + mu I is diagonal, and B has coordinates U^T B = diag(sigma)^{-1/2} W^T (K B) and
    |b_perp_j|. CG's iterates, residual norms and errors depend only on the operator and the
    right-hand side up to such an orthogonal change of basis; a Gaussian Nystrom sketch maps
    to a Gaussian sketch (U^T Omega is Gaussian). So CG and Nystrom-PCG on the reduced
    (r + m)-dimensional problem take the iterations they take on the d-dimensional one, at
    a product cost of r + m instead of d. Eigenvalues below ``zero_level`` x mu count as 0.

    Returns (eigenvalues of G in the reduced basis (r + m,), reduced B (r + m, m), info).
    """
    from pbrf_fast.inverses.output_space import OutputSpaceSolver

    solver = OutputSpaceSolver(op, memory_bytes=memory_bytes)
    state, JV = solver._state_and_products(B)
    n, c, m = JV.shape
    KB = torch.einsum("ikc,ikm->icm", state["L"], JV).reshape(n * c, m)
    sigma, W = torch.linalg.eigh(state["gram"])
    lam = sigma / n
    keep = lam > zero_level * op.shift
    A = (W[:, keep].T @ KB) / sigma[keep].sqrt().unsqueeze(1)
    norms2 = B.double().reshape(op.dim, m).pow(2).sum(0)
    perp = (norms2 - A.pow(2).sum(0)).clamp_min(0).sqrt()
    r = int(keep.sum())
    B_red = torch.zeros(r + m, m, dtype=torch.float64)
    B_red[:r] = A
    B_red[r + torch.arange(m), torch.arange(m)] = perp
    eigenvalues = torch.cat([lam[keep], torch.zeros(m, dtype=torch.float64)])
    info = {"rank_kept": r, "outputs": n * c, "lambda_max": float(lam.max()),
            "perp_share": (perp.pow(2) / norms2).tolist()}
    return eigenvalues, B_red, info


class _DiagonalGaussNewton(pbrf_fast.GaussNewton):
    """The library's GNH of :func:`diagonal_gnh`'s problem, its data term applied in closed form
    (diag(eigenvalues) V: r + m flops per column instead of the dense (r x (r + m)) inputs' GEMMs);
    everything else -- checks, damping, caches, the Nystrom sketch, CG -- is the library's."""

    eigenvalues: torch.Tensor

    def data_matvec(self, V, idx=None):
        if idx is not None:
            raise ValueError("the reduced operator is used over all data only")
        V2 = self.check_vectors(V)
        out = V2 * self.eigenvalues.unsqueeze(1)
        return out if V.dim() == 2 else out.reshape(V.shape)


def diagonal_gnh(eigenvalues, damping, weight_decay=0.0):
    """A GaussNewton operator whose data term is diag(eigenvalues): the GNH of a bias-free
    linear model with MSE loss on inputs sqrt(scale * eigenvalues) e_i (one example per
    nonzero eigenvalue), scale calibrated from the operator itself. The library's own product
    of that problem is checked to be diag(eigenvalues); the returned operator then applies it
    in closed form."""
    eig = eigenvalues.double()
    nonzero = (eig > 0).nonzero().reshape(-1)
    d = len(eig)

    def problem_for(values):
        X = torch.zeros(len(nonzero), d, dtype=torch.float64)
        X[torch.arange(len(nonzero)), nonzero] = values.sqrt()
        model = torch.nn.Linear(d, 1, bias=False).double()
        return pbrf_fast.Problem(model, "mse", X, torch.zeros(len(nonzero), 1, dtype=torch.float64),
                                 weight_decay=weight_decay, batch_size=len(nonzero))

    probe = pbrf_fast.make_curvature(problem_for(torch.ones(len(nonzero), dtype=torch.float64)), "gnh", damping)
    e = torch.zeros(d, 1, dtype=torch.float64)
    e[nonzero[0]] = 1.0
    scale = float(probe.data_matvec(e)[nonzero[0]])  # the loss's normalisation of one unit row
    problem = problem_for(eig[nonzero] / scale)
    library = pbrf_fast.make_curvature(problem, "gnh", damping)
    V = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if not torch.allclose(library.data_matvec(V), eig.unsqueeze(1) * V, rtol=1e-10, atol=1e-12 * float(eig.max())):
        raise RuntimeError("diagonal_gnh: the library's GNH of the problem is not diag(eigenvalues)")
    op = _DiagonalGaussNewton(problem, damping)
    op.eigenvalues = eig
    return op


def resnet_spectral_part(args):
    """CG and Nystrom PCG on ResNet-20's damped GNH over --images CIFAR-10 images through the
    exact spectral reduction (:func:`spectral_reduction`), with the exact answer's error;
    ``--check`` runs the d-dimensional solvers too (small --images only) to show the counts agree."""
    dtype = torch.float64 if args.check else torch.float32
    problem, x_test, y_test = _resnet_task(args, dtype)
    influence = pbrf_fast.Influence(problem, DAMPING, solver="cg")
    B = influence.test_gradients(x_test, y_test)
    op = influence.operator
    saved = Path(args.reduction_file) if args.reduction_file else None
    if saved is not None and saved.exists():  # the reduction is the expensive part: reuse it
        eigenvalues, B_red, info = (lambda d: (d["eigenvalues"], d["B"], d["info"]))(torch.load(saved))
    else:
        start = time.perf_counter()
        eigenvalues, B_red, info = spectral_reduction(op, B, memory_bytes=args.memory_gib << 30)
        info["reduction_seconds"] = time.perf_counter() - start
        if saved is not None:
            torch.save({"eigenvalues": eigenvalues, "B": B_red, "info": info}, saved)
    print(json.dumps(info), flush=True)
    red = diagonal_gnh(eigenvalues, DAMPING, problem.weight_decay)
    exact = B_red / (eigenvalues + op.shift).unsqueeze(1)
    rows = _compare_solvers(red, B_red, exact, None, args)
    lam = eigenvalues[eigenvalues > 0]
    title = (f"ResNet-20, {args.images} CIFAR-10 images, {args.columns} test points, damping {DAMPING}, "
             f"d = {problem.dim}, reduced to {len(eigenvalues)} dimensions (G's nonzero eigenvalues "
             f"{float(lam.min()):.3g} .. {float(lam.max()):.3g}; condition of G + mu I "
             f"{(float(lam.max()) + op.shift) / op.shift:.3g})")
    _print_solver_table(title, rows)
    out = {"info": info, "reduced": rows}
    if args.time_products:
        # the d-dimensional product's cost, to turn the counts into wall time
        V = B[:, :args.time_products].contiguous()
        op.matvec(V)  # warm: kept primal forward
        start = time.perf_counter()
        op.matvec(V)
        out["seconds_per_column_product"] = (time.perf_counter() - start) / V.shape[1]
        print(json.dumps({"seconds_per_column_product": out["seconds_per_column_product"],
                          "columns": V.shape[1]}), flush=True)
    if args.check:
        full = _compare_solvers(op, B, pbrf_fast.solve(op, B, "kernel").solution, None, args)
        _print_solver_table("the same solvers on the d-dimensional operator", full)
        out["full"] = full
    return out


def spectrum_part(args):
    from pbrf_fast.paper.data.builtin import load_digits
    from pbrf_fast.paper.models import mlp
    from pbrf_fast.paper.training import TrainConfig, train

    x, y, _, _ = load_digits(dtype=torch.float64)
    problem = pbrf_fast.Problem(mlp(64, (32,), 10, seed=0, dtype=torch.float64), "cross_entropy", x, y,
                                batch_size=2048)
    train(problem, TrainConfig(epochs=30, lr=0.1, batch_size=128))
    op = pbrf_fast.GaussNewton(problem, DAMPING)
    A = op.dense()
    eye = torch.eye(op.dim, dtype=torch.float64)

    def kappa(pre) -> float:
        P_inv = pre.inverse_matvec(eye)
        L = torch.linalg.cholesky(0.5 * (P_inv + P_inv.T))
        e = torch.linalg.eigvalsh(L.T @ A @ L)
        return float(e.max() / e.min())

    plain = torch.linalg.eigvalsh(A)
    rows = [{"preconditioner": "none", "kappa": float(plain.max() / plain.min())},
            {"preconditioner": "ekfac", "kappa": kappa(PRECONDITIONERS["ekfac"](op))}]
    for r in (50, 100, 200, 400, 800):
        for name in ("nystrom", "nystrom+ekfac"):
            for q in (0, 1):
                rows.append({"preconditioner": name, "rank": r, "power_iterations": q,
                             "kappa": kappa(PRECONDITIONERS[name](op, rank=r, power_iterations=q))})
        print(json.dumps(rows[-4:]), flush=True)
    print(f"\ndigits MLP 64-32-10, d = {op.dim}, damping {DAMPING}: eigenvalues of G + mu I above 10 mu: "
          f"{int((plain > 10 * DAMPING).sum())}, above 100 mu: {int((plain > 100 * DAMPING).sum())}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["iterations", "scores", "resnet", "resnet-spectral", "spectrum"],
                        default="iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--test-points", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    parser.add_argument("--rank", type=int, default=500, help="Nystrom rank of the scores part")
    parser.add_argument("--pcg-test-points", type=int, default=None,
                        help="scores part: PCG on the first N test points only (EK-FAC on all)")
    parser.add_argument("--score-tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--images", type=int, default=500, help="resnet part: CIFAR-10 training images")
    parser.add_argument("--epochs", type=int, default=5, help="resnet part: training epochs")
    parser.add_argument("--ranks", type=int, nargs="+", default=[50], help="resnet part: Nystrom ranks")
    parser.add_argument("--kronecker", nargs="*", default=[], choices=["ekfac", "kfac"],
                        help="resnet parts: also PCG with these Kronecker preconditioners")
    parser.add_argument("--check", action="store_true",
                        help="resnet-spectral: float64, and the d-dimensional solvers too (small --images)")
    parser.add_argument("--memory-gib", type=int, default=8, help="resnet-spectral: memory for J's rows")
    parser.add_argument("--model-file", default=None,
                        help="resnet parts: store the trained model here, or load it if present")
    parser.add_argument("--reduction-file", default=None,
                        help="resnet-spectral: store the reduction here, or load it if present")
    parser.add_argument("--time-products", type=int, default=0,
                        help="resnet-spectral: time one d-dimensional product of this many columns")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}", flush=True)
    if args.part == "spectrum":
        numbers = spectrum_part(args)
    elif args.part == "resnet":
        numbers = resnet_part(args)
    elif args.part == "resnet-spectral":
        numbers = resnet_spectral_part(args)
    else:
        problem, x_test, y_test = mnist_task(args.data_dir or shared_data_dir(), n_test=args.test_points)
        part = iterations_part if args.part == "iterations" else scores_part
        numbers = part(problem, x_test, y_test, args)
    print(f"load average {os.getloadavg()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
