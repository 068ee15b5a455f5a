"""The README's main job: influence end to end on built-in data, checked against retraining.

Part 1, logistic regression on breast cancer (convex, converged: influence should
match leave-one-out retraining): train with L-BFGS, score every training point
against every test point, retrain 20 times to compare, and find flipped labels
by self-influence.
Part 2, an MLP on scikit-learn's digits: s_test for many test points as one
block with CG and with LiSSA, how well they agree, and what batching buys.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .data import load_breast_cancer, load_digits
from .influence import Influence
from .problem import Problem
from .training import fit_lbfgs

__all__ = ["run_demo"]


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0, 1])


def _retrain_without(problem: Problem, index: int) -> torch.Tensor:
    weights = torch.ones(problem.n, dtype=problem.dtype)
    weights[index] = 0.0
    return fit_lbfgs(problem, weights=weights)


def logistic_regression_part(seed: int, n_removed: int = 20, log=print) -> dict:
    x_train, y_train, x_test, y_test = load_breast_cancer(seed=seed)
    model = torch.nn.Linear(x_train.shape[1], 1).double()
    problem = Problem(model, "bce", x_train, y_train, weight_decay=0.01)
    problem.set_theta(fit_lbfgs(problem))
    influence = Influence(problem, damping=0.0, solver="direct")
    start = time.perf_counter()
    scores = influence.scores(x_test, y_test)  # (n_train, n_test)
    score_time = time.perf_counter() - start
    log(f"[logistic regression] {problem.n} train x {len(x_test)} test scores in {score_time * 1e3:.1f} ms "
        f"(d = {problem.dim}, |grad J| = {float(problem.gradient().norm()):.1e})")

    rng = np.random.default_rng(seed)
    removed = rng.choice(problem.n, size=n_removed, replace=False)
    probe = [0, 1, 2, 3, 4]
    x_probe, t_probe = problem.check_data(x_test[probe], y_test[probe])
    base = problem.loss.value(problem.forward(problem.theta, x_probe), t_probe)
    actual = torch.stack([
        problem.loss.value(problem.forward(_retrain_without(problem, int(i)), x_probe), t_probe) - base
        for i in removed
    ]).detach()
    pearson = [_pearson(scores[removed, j], actual[:, j]) for j in range(len(probe))]
    log(f"[logistic regression] influence vs leave-one-out retraining, {n_removed} removed points: "
        f"Pearson per test point {np.round(pearson, 4).tolist()}")
    order = torch.argsort(scores[:, 0], descending=True)
    log(f"[logistic regression] test point 0: strongest proponents {order[:3].tolist()}, "
        f"opponents {order[-3:].flip(0).tolist()} (positive score = removal raises its loss)")
    return {"n_train": problem.n, "n_test": len(x_test), "dim": problem.dim, "score_seconds": score_time,
            "loo_pearson": pearson, "removed": removed.tolist(),
            "mislabel": _mislabel_part(x_train, y_train, seed, log)}


def _mislabel_part(x_train, y_train, seed, log, fraction: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(y_train)
    flipped = torch.randperm(n, generator=g)[: int(fraction * n)]
    noisy = y_train.clone()
    noisy[flipped] = 1.0 - noisy[flipped]
    problem = Problem(torch.nn.Linear(x_train.shape[1], 1).double(), "bce", x_train, noisy, weight_decay=0.01)
    problem.set_theta(fit_lbfgs(problem))
    self_influence = Influence(problem, damping=0.0, solver="direct").self_influence()
    ranking = torch.argsort(self_influence, descending=True)
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[flipped] = True
    found = {}
    for inspected in (0.05, 0.1, 0.2, 0.3):
        k = int(inspected * n)
        found[inspected] = float(is_flipped[ranking[:k]].sum()) / len(flipped)
    log("[logistic regression] flipped 10% of labels; share found by inspecting the top self-influence: "
        + ", ".join(f"{int(100 * a)}% -> {100 * f:.0f}% (random {100 * a:.0f}%)" for a, f in found.items()))
    return {"fraction_flipped": fraction, "found": found}


def _train_mlp(problem: Problem, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    params = [p for p in problem.model.parameters()]
    optimiser = torch.optim.Adam(params, lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(problem.n, generator=g).split(128):
            x, t = problem.batch(batch)
            loss = problem.loss.value(problem.model(x).reshape(len(x), -1), t).mean()
            loss = loss + 0.5 * problem.weight_decay * sum(p.pow(2).sum() for p in params)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    problem.set_theta(torch.cat([p.detach().reshape(-1) for p in params]))


def mlp_part(seed: int, n_test: int = 20, epochs: int = 30, lissa_depth: int = 600, log=print) -> dict:
    x_train, y_train, x_test, y_test = load_digits(seed=seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    problem = Problem(model, "cross_entropy", x_train, y_train, weight_decay=1e-3, batch_size=1500)
    _train_mlp(problem, epochs, seed)
    x_q, t_q = x_test[:n_test], y_test[:n_test]
    accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    log(f"[mlp digits] 64-64-10, d = {problem.dim}, test accuracy {accuracy:.3f}")

    out = {"dim": problem.dim, "test_accuracy": accuracy, "n_test": n_test}
    cg = Influence(problem, damping=1e-2, solver="cg", solver_options={"tol": 1e-6})
    start = time.perf_counter()
    s_cg = cg.s_test(x_q, t_q)
    out["cg_block_seconds"] = time.perf_counter() - start
    out["cg_iterations_max"] = int(cg.last_solve.iterations.max())
    start = time.perf_counter()
    for j in range(4):
        cg.s_test(x_q[j : j + 1], t_q[j : j + 1])
    out["cg_single_seconds_per_point"] = (time.perf_counter() - start) / 4
    speedup = out["cg_single_seconds_per_point"] * n_test / out["cg_block_seconds"]
    log(f"[mlp digits] s_test for {n_test} test points with CG as one block: {out['cg_block_seconds']:.2f} s "
        f"({out['cg_iterations_max']} iterations); one at a time would take {speedup:.1f}x longer")

    lissa = Influence(problem, damping=1e-2, solver="lissa",
                      solver_options={"depth": lissa_depth, "batch_size": 128, "seed": seed})
    start = time.perf_counter()
    s_lissa = lissa.s_test(x_q, t_q)
    out["lissa_seconds"] = time.perf_counter() - start
    out["lissa_scale"] = lissa.last_solve.info["scale"]
    scores_cg = cg.scores_from_s_test(s_cg)
    scores_lissa = lissa.scores_from_s_test(s_lissa)
    out["lissa_vs_cg_pearson"] = _pearson(scores_cg.flatten(), scores_lissa.flatten())
    out["lissa_relative_residual_max"] = float(lissa.last_solve.residual_norms.max())
    log(f"[mlp digits] LiSSA (depth {lissa_depth}, batch 128, auto scale {out['lissa_scale']:.3g}) in "
        f"{out['lissa_seconds']:.1f} s: train x test scores correlate {out['lissa_vs_cg_pearson']:.4f} with CG "
        f"(max relative residual {out['lissa_relative_residual_max']:.2g})")
    return out


def run_demo(seed: int = 0, log=print) -> dict:
    start = time.perf_counter()
    result = {"seed": seed, "logistic_regression": logistic_regression_part(seed, log=log),
              "mlp_digits": mlp_part(seed, log=log)}
    result["seconds"] = time.perf_counter() - start
    log(f"demo finished in {result['seconds']:.1f} s")
    return result
