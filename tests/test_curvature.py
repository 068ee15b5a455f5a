import pytest
import torch

import pbrf_fast

from factories import LOSSES, dense_gnh, dense_hessian, make_problem, rel_err


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_gnh_products_match_explicit_jacobians(loss, weight_decay):
    problem = make_problem(loss, weight_decay)
    op = pbrf_fast.GaussNewton(problem, damping=0.01)
    G = dense_gnh(problem, damping=0.01)
    V = torch.randn(problem.dim, 4, dtype=torch.float64)
    assert rel_err(op.matvec(V), G @ V) < 1e-10
    assert rel_err(op.matvec(V[:, 0]), G @ V[:, 0]) < 1e-10
    assert rel_err(op.dense(), G) < 1e-10


@pytest.mark.parametrize("loss", LOSSES)
def test_gnh_batch_product_is_mean_over_the_batch(loss):
    problem = make_problem(loss, weight_decay=0.05)
    op = pbrf_fast.GaussNewton(problem, damping=0.0)
    idx = [0, 3, 4, 9, 12, 7, 2]  # more than one internal chunk (batch_size=5)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    assert rel_err(op.matvec(V, idx), dense_gnh(problem, 0.0, idx) @ V) < 1e-10


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_hessian_products_match_autograd_hessian(loss, weight_decay):
    problem = make_problem(loss, weight_decay)
    op = pbrf_fast.Hessian(problem, damping=0.02)
    H = dense_hessian(problem, damping=0.02)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    assert rel_err(op.matvec(V), H @ V) < 1e-10


def test_gnh_equals_hessian_for_linear_model_with_convex_loss():
    problem = make_problem("cross_entropy", 0.01, hidden=())
    gnh = pbrf_fast.GaussNewton(problem, 1e-3).dense()
    hess = pbrf_fast.Hessian(problem, 1e-3).dense()
    assert rel_err(gnh, hess) < 1e-10


def test_with_damping_shares_the_cached_factorisation():
    problem = make_problem("mse")
    op = pbrf_fast.GaussNewton(problem, 0.1)
    evals, _ = op.eigh_data()
    other = op.with_damping(1.0)
    assert other.eigh_data()[0] is evals
    assert rel_err(other.dense() - op.dense(), 0.9 * torch.eye(problem.dim, dtype=torch.float64)) < 1e-12
    problem.set_theta(problem.theta * 1.1)  # new parameters invalidate the cache
    assert other.eigh_data()[0] is not evals


def test_to_scipy_matches_matvec():
    problem = make_problem("bce")
    op = pbrf_fast.GaussNewton(problem, 0.1)
    v = torch.randn(problem.dim, dtype=torch.float64)
    assert rel_err(torch.from_numpy(op.to_scipy() @ v.numpy()), op.matvec(v)) < 1e-12


def test_bad_vectors_are_refused_with_a_clear_message():
    problem = make_problem("mse")
    op = pbrf_fast.GaussNewton(problem, 0.1)
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(problem.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        op.matvec(torch.zeros(problem.dim, dtype=torch.float32))
    with pytest.raises(ValueError, match="damping"):
        pbrf_fast.GaussNewton(problem, -1.0)
    with pytest.raises(ValueError, match="curvature"):
        pbrf_fast.make_curvature(problem, "fisher")


def test_problem_refuses_nan_inputs_and_mismatched_targets():
    from factories import make_mlp

    model = make_mlp(2, (3,), 1)
    x = torch.randn(4, 2).double()
    with pytest.raises(ValueError, match="NaN"):
        pbrf_fast.Problem(model, "mse", x.masked_fill(x > 0, float("nan")), torch.randn(4))
    with pytest.raises(ValueError, match="rows"):
        pbrf_fast.Problem(model, "mse", x, torch.randn(5))


def test_problem_objective_and_gradient_agree_with_autograd():
    problem = make_problem("cross_entropy", weight_decay=0.1)
    theta = problem.theta.clone().requires_grad_(True)
    x, t = problem.batch(None)
    value = problem.loss.value(problem.forward(theta, x), t).mean() + 0.05 * theta.pow(2).sum()
    expected = torch.autograd.grad(value, theta)[0]
    assert rel_err(problem.gradient(), expected) < 1e-12
    assert abs(float(problem.objective()) - float(value)) < 1e-12
