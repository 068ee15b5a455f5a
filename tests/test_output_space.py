"""The output-space (Woodbury, method="kernel") solver against dense float64 solves."""
import numpy as np
import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.output_space import _gram_by_jacobians, jacobian_gram
from pbrf_fast.solvers import choose_method

from factories import LOSSES, dense_gnh, dense_gradients, make_problem, make_targets, rel_err


@pytest.mark.parametrize("loss, outputs", [("mse", 2), ("bce", 3), ("cross_entropy", 10)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_kernel_solve_equals_numpy(loss, outputs, weight_decay):
    problem = make_problem(loss, weight_decay, n=9, outputs=outputs, hidden=(6,))
    op = pbrf_fast.GaussNewton(problem, damping=0.01)
    B = torch.randn(problem.dim, 4, dtype=torch.float64)
    expected = torch.from_numpy(np.linalg.solve(dense_gnh(problem, 0.01).numpy(), B.numpy()))
    result = pbrf_fast.solve(op, B, method="kernel")
    assert rel_err(result.solution, expected) < 1e-8
    assert float(result.residual_norms.max()) < 1e-8
    assert rel_err(result.solution, pbrf_fast.solve(op, B, method="direct").solution) < 1e-8


def test_damping_sweep_reuses_one_factorisation():
    problem = make_problem("cross_entropy", 0.01, n=7, outputs=4)
    op = pbrf_fast.GaussNewton(problem, damping=0.1)
    B = torch.randn(problem.dim, 2, dtype=torch.float64)
    for damping in (0.1, 1e-3, 1.0):
        other = op.with_damping(damping)
        expected = torch.linalg.solve(dense_gnh(problem, damping), B)
        assert rel_err(pbrf_fast.solve(other, B, method="kernel").solution, expected) < 1e-8
    state = op._cache["output_space"][1]
    assert state["eigh"] is not None  # the second damping switched to one eigendecomposition


def test_layerwise_gram_equals_explicit_jacobians():
    problem = make_problem("cross_entropy", n=6, outputs=3, hidden=(5, 4))
    assert rel_err(jacobian_gram(problem), _gram_by_jacobians(problem, problem.inputs)) < 1e-12


def test_models_beyond_linear_layers_use_explicit_jacobians():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    problem = pbrf_fast.Problem(model, "mse", x, torch.randn(8, 2, dtype=torch.float64), weight_decay=0.01)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    B = torch.randn(problem.dim, 3, dtype=torch.float64)
    assert rel_err(pbrf_fast.solve(op, B, method="kernel").solution, torch.linalg.solve(dense_gnh(problem, 1e-3), B)) < 1e-8


@pytest.mark.parametrize("loss", LOSSES)
def test_output_space_scores_equal_explicit_formula(loss):
    problem = make_problem(loss, 0.01, n=10, outputs=3)
    g = torch.Generator().manual_seed(2)
    x_test = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t_test = make_targets(loss, 5, 3, g)
    influence = pbrf_fast.Influence(problem, damping=0.02, solver="kernel")
    x_c, t_c = problem.check_data(x_test, t_test)
    expected = (dense_gradients(problem, *problem.batch(None))
                @ torch.linalg.solve(dense_gnh(problem, 0.02), dense_gradients(problem, x_c, t_c).T)) / problem.n
    assert rel_err(influence.scores(x_test, t_test), expected) < 1e-8
    assert rel_err(influence.scores(x_test, t_test, train_idx=[1, 7]), expected[[1, 7]]) < 1e-8
    assert rel_err(influence.s_test(x_test, t_test),
                   torch.linalg.solve(dense_gnh(problem, 0.02), dense_gradients(problem, x_c, t_c).T)) < 1e-8


def test_float32_model_is_exact_to_float32_precision():
    problem64 = make_problem("mse", 0.0, n=30, outputs=1, hidden=(40, 40))
    model32 = make_problem("mse", 0.0, n=30, outputs=1, hidden=(40, 40)).model.float()
    problem32 = pbrf_fast.Problem(model32, "mse", problem64.inputs.float(), problem64.targets.float())
    B = torch.randn(problem64.dim, 3, dtype=torch.float64)
    exact = torch.linalg.solve(dense_gnh(problem64, 1e-3), B)
    got = pbrf_fast.solve(pbrf_fast.GaussNewton(problem32, 1e-3), B.float(), method="kernel").solution
    assert rel_err(got.double(), exact) < 1e-4


def test_auto_dispatch_picks_the_cheaper_exact_solver():
    wide = make_problem("mse", n=5, outputs=1, hidden=(30,))  # N*C = 5 << d
    assert choose_method(pbrf_fast.GaussNewton(wide, 1e-3))[0] == "kernel"
    tall = make_problem("cross_entropy", n=200, outputs=3, hidden=())  # d = 12 << N*C
    assert choose_method(pbrf_fast.GaussNewton(tall, 1e-3))[0] == "direct"
    assert choose_method(pbrf_fast.Hessian(wide, 1e-3))[0] == "direct"


def test_kernel_refuses_hessian_and_zero_shift():
    problem = make_problem("mse")
    with pytest.raises(ValueError, match="gnh"):
        pbrf_fast.solve(pbrf_fast.Hessian(problem, 0.1), torch.zeros(problem.dim, dtype=torch.float64), method="kernel")
    with pytest.raises(ValueError, match="> 0"):
        pbrf_fast.solve(pbrf_fast.GaussNewton(problem, 0.0), torch.zeros(problem.dim, dtype=torch.float64), method="kernel")
