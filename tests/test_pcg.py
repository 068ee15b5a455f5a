"""EK-FAC / K-FAC-preconditioned block CG (solve(op, B, "pcg")) against the dense solve."""
import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.errors import IndefiniteOperatorError, InputError, NonFiniteError

from factories import dense_gnh, make_problem, rel_err


def ill_conditioned_problem(loss="cross_entropy", seed=0, n=80):
    """A one-layer model on inputs of very different scales: the GNH's spectrum spans
    decades that the Kronecker factors (built from the input covariance) mostly remove."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 8, dtype=torch.float64)
    t = (torch.randint(4, (n,), generator=g) if loss == "cross_entropy"
         else torch.randn(n, 4, generator=g, dtype=torch.float64))
    return pbrf_fast.Problem(nn.Sequential(nn.Linear(8, 4)).double(), loss, x, t, batch_size=32)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
@pytest.mark.parametrize("preconditioner", ["ekfac", "kfac"])
def test_pcg_equals_direct_solve(loss, preconditioner):
    problem = make_problem(loss, n=20, hidden=(5,), outputs=3, weight_decay=1e-3)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    B = torch.randn(problem.dim, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = pbrf_fast.solve(op, B, "pcg", preconditioner=preconditioner, tol=1e-12)
    expected = torch.linalg.solve(dense_gnh(problem, 1e-3), B)
    assert result.method == "pcg" and result.info["preconditioner"] == preconditioner
    assert bool(result.converged.all()) and float(result.residual_norms.max()) <= 1e-12
    assert rel_err(result.solution, expected) < 1e-9
    # the preconditioner is built once per operator and reused
    again = pbrf_fast.solve(op, B[:, 0], "pcg", preconditioner=preconditioner, tol=1e-12)
    assert again.solution.shape == (problem.dim,)
    assert again.info["preconditioner_seconds"] < result.info["preconditioner_seconds"]


def test_pcg_needs_fewer_iterations_than_cg_on_an_ill_conditioned_problem():
    problem = ill_conditioned_problem()
    op = pbrf_fast.GaussNewton(problem, 1e-4)
    B = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cg = pbrf_fast.solve(op, B, "cg", tol=1e-8)
    pcg = pbrf_fast.solve(op, B, "pcg", tol=1e-8)
    assert bool(cg.converged.all()) and bool(pcg.converged.all())
    assert int(pcg.iterations.max()) * 3 < int(cg.iterations.min())
    expected = torch.linalg.solve(dense_gnh(problem, 1e-4), B)
    assert rel_err(pcg.solution, expected) < 1e-6


def test_pcg_with_an_exact_preconditioner_takes_one_iteration():
    """One linear layer with MSE: K-FAC is the GNH itself, so M = A^{-1} and PCG stops after
    one step, where plain CG needs many."""
    problem = ill_conditioned_problem("mse")
    op = pbrf_fast.GaussNewton(problem, 1e-4)
    B = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pcg = pbrf_fast.solve(op, B, "pcg", preconditioner="kfac", tol=1e-9)
    assert pcg.iterations.tolist() == [1, 1] and bool(pcg.converged.all())
    assert int(pbrf_fast.solve(op, B, "cg", tol=1e-9).iterations.min()) > 5


def test_pcg_with_a_warm_start_and_max_iter_reports_true_convergence():
    problem = make_problem("mse", n=30, hidden=(6,), outputs=3, seed=1)
    op = pbrf_fast.GaussNewton(problem, 1e-4)
    B = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    short = pbrf_fast.solve(op, B, "pcg", tol=1e-12, max_iter=2)
    assert short.iterations.tolist() == [2, 2] and not bool(short.converged.any())
    resumed = pbrf_fast.solve(op, B, "pcg", tol=1e-10, x0=short.solution)
    assert bool(resumed.converged.all())
    true = (op.matvec(resumed.solution) - B).norm(dim=0) / B.norm(dim=0)
    assert torch.allclose(resumed.residual_norms, true)


def test_influence_with_pcg_matches_direct():
    problem = make_problem("cross_entropy", n=15, hidden=(4,), outputs=3)
    x, t = problem.inputs[:4], problem.targets[:4]
    exact = pbrf_fast.Influence(problem, damping=1e-3, solver="direct").scores(x, t)
    influence = pbrf_fast.Influence(problem, damping=1e-3, solver="pcg",
                                    solver_options={"preconditioner": "kfac", "tol": 1e-12})
    assert rel_err(influence.scores(x, t), exact) < 1e-9
    assert influence.last_solve.method == "pcg"


def test_a_custom_preconditioner_object_works_and_an_indefinite_one_is_refused():
    problem = make_problem("mse", n=10, hidden=(3,), outputs=2)
    op = pbrf_fast.GaussNewton(problem, 1e-2)
    B = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class Jacobi:
        def __init__(self, diagonal):
            self.diagonal = diagonal

        def inverse_matvec(self, V):
            return V / self.diagonal.unsqueeze(1)

    diag = torch.diagonal(op.dense())
    result = pbrf_fast.solve(op, B, "pcg", preconditioner=Jacobi(diag), tol=1e-12)
    assert result.info["preconditioner"] == "Jacobi"
    assert rel_err(result.solution, torch.linalg.solve(op.dense(), B)) < 1e-9
    with pytest.raises(IndefiniteOperatorError, match="preconditioner"):
        pbrf_fast.solve(op, B, "pcg", preconditioner=Jacobi(-diag))


def test_bad_pcg_inputs_give_named_errors():
    problem = make_problem("mse", n=8, hidden=(3,), outputs=2)
    op = pbrf_fast.GaussNewton(problem, 1e-2)
    B = torch.ones(problem.dim, dtype=torch.float64)
    with pytest.raises(InputError, match="unknown preconditioner"):
        pbrf_fast.solve(op, B, "pcg", preconditioner="ekfca")
    with pytest.raises(InputError, match="preconditioner_options"):
        pbrf_fast.solve(op, B, "pcg", preconditioner=object(), preconditioner_options={"seed": 1})
    with pytest.raises(TypeError, match="inverse_matvec"):
        pbrf_fast.solve(op, B, "pcg", preconditioner=object())
    kfac = pbrf_fast.KroneckerCurvature(problem, 1e-2, "kfac")
    with pytest.raises(InputError, match="GaussNewton"):
        pbrf_fast.solve(kfac, B, "pcg")
    with pytest.raises(NonFiniteError, match="right-hand side"):
        pbrf_fast.solve(op, torch.full_like(B, float("nan")), "pcg")
