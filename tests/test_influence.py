import pytest
import torch

import pbrf_fast

from factories import LOSSES, dense_gnh, dense_gradients, dense_hessian, make_problem, make_targets, rel_err


def _setup(loss, curvature="gnh", damping=0.05, weight_decay=0.01, solver="direct"):
    problem = make_problem(loss, weight_decay, n=11)
    g = torch.Generator().manual_seed(7)
    x_test = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t_test = make_targets(loss, 4, 3, g)
    inf = pbrf_fast.Influence(problem, damping=damping, curvature=curvature, solver=solver)
    A = dense_gnh(problem, damping) if curvature == "gnh" else dense_hessian(problem, damping)
    return problem, inf, x_test, t_test, A


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_scores_equal_the_explicit_formula(loss, solver):
    problem, inf, x_test, t_test, A = _setup(loss, solver=solver)
    if solver == "cg":
        inf.solver_options.tol = 1e-12
    x_test_c, t_test_c = problem.check_data(x_test, t_test)
    g_test = dense_gradients(problem, x_test_c, t_test_c)
    g_train = dense_gradients(problem, *problem.batch(None))
    expected = g_train @ torch.linalg.solve(A, g_test.T) / problem.n
    scores = inf.scores(x_test, t_test)
    assert scores.shape == (problem.n, 4)
    assert rel_err(scores, expected) < 1e-8


def test_hessian_influence_and_train_subset():
    problem, inf, x_test, t_test, A = _setup("cross_entropy", curvature="hessian", damping=0.5)
    x_c, t_c = problem.check_data(x_test, t_test)
    subset = [2, 5, 9]
    g_train = dense_gradients(problem, *problem.batch(subset))
    expected = g_train @ torch.linalg.solve(A, dense_gradients(problem, x_c, t_c).T) / problem.n
    assert rel_err(inf.scores(x_test, t_test, train_idx=subset), expected) < 1e-8


def test_s_test_block_equals_one_solve_per_test_point():
    problem, inf, x_test, t_test, _ = _setup("mse")
    block = inf.s_test(x_test, t_test)
    singles = torch.stack([inf.s_test(x_test[j : j + 1], t_test[j : j + 1])[:, 0] for j in range(4)], 1)
    assert rel_err(block, singles) < 1e-12


def test_param_change_for_points_and_groups():
    problem, inf, _, _, A = _setup("bce")
    g = dense_gradients(problem, *problem.batch(None))
    each = inf.param_change([1, 4, 6])
    assert each.shape == (problem.dim, 3)
    assert rel_err(each, torch.linalg.solve(A, g[[1, 4, 6]].T) / problem.n) < 1e-8
    group = inf.param_change([[1, 4, 6], [0]])
    assert rel_err(group[:, 0], each.sum(1)) < 1e-10
    assert rel_err(inf.param_change(4), each[:, 1]) < 1e-10
    assert rel_err(inf.param_change([4], epsilon=0.5), each[:, 1:2] * 0.5 * problem.n) < 1e-10


def test_self_influence_is_the_diagonal_and_nonnegative():
    problem, inf, _, _, A = _setup("cross_entropy")
    g = dense_gradients(problem, *problem.batch(None))
    expected = (g * torch.linalg.solve(A, g.T).T).sum(1) / problem.n
    got = inf.self_influence()
    assert rel_err(got, expected) < 1e-8
    assert (got >= 0).all()


def test_test_points_with_wrong_shape_are_refused():
    problem, inf, x_test, t_test, _ = _setup("mse")
    with pytest.raises(ValueError, match="per-example shape"):
        inf.scores(torch.randn(4, 5, dtype=torch.float64), t_test)
    with pytest.raises(ValueError, match="rows"):
        inf.scores(x_test, t_test[:2])
