"""Exact train x test scores on the paper's Concrete MLP (issue: output-space solver).

930 training points x 20 test points, MLP 8-128-128-1 trained with SGD for 200
epochs (batch 128), GNH with damping 1e-3, float32. Compares, in one session:
the output-space ("kernel") solver end to end (Gram matrix, factorisation and
Jacobian products included), CG on all 20 test points as one block, and CG one
test point at a time (the way many influence codes run it), each at 200 iterations.

Run: .venv/bin/pytest bench/bench_output_space.py --benchmark-only
Needs the Concrete CSV under $PBRF_DATA or ../shared/data.
"""
import sys
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
