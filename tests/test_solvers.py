import numpy as np
import pytest
import torch

import pbrf_fast
from pbrf_fast.inverses.lissa import estimate_largest_eigenvalue

from factories import LOSSES, dense_gnh, make_problem, rel_err


def _system(loss="mse", damping=0.1, weight_decay=0.0, m=5, **kw):
    problem = make_problem(loss, weight_decay, **kw)
    op = pbrf_fast.GaussNewton(problem, damping)
    B = torch.randn(problem.dim, m, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = torch.from_numpy(np.linalg.solve(dense_gnh(problem, damping).numpy(), B.numpy()))
    return op, B, reference


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("method", ["direct", "cg"])
def test_direct_and_cg_match_numpy(loss, method):
    op, B, reference = _system(loss, weight_decay=0.01)
    result = pbrf_fast.solve(op, B, method=method, tol=1e-10)
    assert result.solution.shape == B.shape
    assert rel_err(result.solution, reference) < 1e-6
    assert bool(result.converged.all())
    assert float(result.residual_norms.max()) < 1e-6


def test_solve_accepts_a_single_vector():
    op, B, reference = _system()
    result = pbrf_fast.solve(op, B[:, 0], method="cg", tol=1e-10)
    assert result.solution.shape == (op.dim,)
    assert rel_err(result.solution, reference[:, 0]) < 1e-6


def test_cg_columns_stop_independently_and_warm_start_helps():
    op, B, reference = _system(m=3)
    B = B.clone()
    B[:, 1] *= 0  # a zero column is solved at once
    result = pbrf_fast.solve(op, B, method="cg", tol=1e-8)
    assert int(result.iterations[1]) == 0
    assert result.solution[:, 1].abs().max() == 0
    warm = pbrf_fast.solve(op, B, method="cg", tol=1e-8, x0=result.solution)
    assert int(warm.iterations.max()) <= 1


def test_cg_max_iter_reports_unconverged_columns():
    op, B, _ = _system(damping=1e-4)
    result = pbrf_fast.solve(op, B, method="cg", tol=1e-12, max_iter=2)
    assert not bool(result.converged.any())
    assert int(result.iterations.max()) == 2


def test_direct_reuses_eigendecomposition_across_dampings():
    op, B, _ = _system()
    pbrf_fast.solve(op, B, method="direct")
    other = op.with_damping(3.0)
    G = dense_gnh(op.problem, 3.0)
    result = pbrf_fast.solve(other, B, method="direct")
    assert rel_err(result.solution, torch.linalg.solve(G, B)) < 1e-10
    # dense + eigh, computed once (besides the MLP forward states of the products)
    assert sorted(k for k in op._cache if k != "mlp_forward") == ["dense", "eigh"]


@pytest.mark.parametrize("loss", LOSSES)
def test_lissa_matches_direct_on_well_conditioned_problem(loss):
    op, B, reference = _system(loss, damping=0.5, m=3)
    result = pbrf_fast.solve(op, B, method="lissa", depth=400, repeats=1, batch_size=op.problem.n)
    assert rel_err(result.solution, reference) < 1e-3
    assert result.info["scale"] > 0


def test_stochastic_lissa_averages_towards_the_solution():
    op, B, reference = _system("mse", damping=1.0, m=2, n=40, batch_size=40)
    result = pbrf_fast.solve(op, B, method="lissa", depth=150, repeats=4, batch_size=20, seed=1)
    assert rel_err(result.solution, reference) < 0.05
    again = pbrf_fast.solve(op, B, method="lissa", depth=150, repeats=4, batch_size=20, seed=1)
    assert torch.equal(result.solution, again.solution)  # seeded: reproducible


def test_lissa_raises_divergence_error_when_scale_is_too_small():
    op, B, _ = _system(damping=0.01)
    largest = estimate_largest_eigenvalue(op)
    with pytest.raises(pbrf_fast.DivergenceError, match="column"):
        pbrf_fast.solve(op, B, method="lissa", depth=500, scale=largest / 10, batch_size=op.problem.n)


def test_power_iteration_finds_the_largest_eigenvalue():
    op, _, _ = _system(weight_decay=0.05)
    exact = float(torch.linalg.eigvalsh(dense_gnh(op.problem, 0.0)).max())
    assert abs(estimate_largest_eigenvalue(op, iterations=200) - exact) < 1e-3 * exact


def test_unknown_method_and_nan_rhs_are_refused():
    op, B, _ = _system()
    with pytest.raises(ValueError, match="unknown solver"):
        pbrf_fast.solve(op, B, method="gmres")
    B[0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pbrf_fast.solve(op, B, method="cg")


def test_cg_refuses_an_indefinite_hessian():
    problem = make_problem("mse", hidden=(6, 6), seed=4)
    hess = pbrf_fast.Hessian(problem, damping=0.0)
    evals = torch.linalg.eigvalsh(hess.dense())
    if evals.min() >= 0:
        pytest.skip("random Hessian happened to be PSD")
    B = torch.linalg.eigh(hess.dense())[1][:, :1]  # most negative direction
    with pytest.raises(ValueError, match="not positive definite"):
        pbrf_fast.solve(hess, B, method="cg")
