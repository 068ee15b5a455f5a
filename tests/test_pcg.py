"""EK-FAC / K-FAC-preconditioned block CG (solve(op, B, "pcg")) against the dense solve."""
import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.inverses.preconditioners import DEFAULT_RANK, MIN_DEFAULT_RANK, SKETCH_PER_COLUMN
from pbrf_fast.errors import IndefiniteOperatorError, InputError, NonFiniteError
from pbrf_fast.inverses import PRECONDITIONERS

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
@pytest.mark.parametrize("preconditioner", ["ekfac", "kfac", "nystrom", "nystrom+ekfac"])
def test_pcg_equals_direct_solve(loss, preconditioner):
    problem = make_problem(loss, n=20, hidden=(5,), outputs=3, weight_decay=1e-3)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    B = torch.randn(problem.dim, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    options = {"rank": 10} if preconditioner.startswith("nystrom") else None
    result = pbrf_fast.solve(op, B, "pcg", preconditioner=preconditioner, preconditioner_options=options, tol=1e-12)
    expected = torch.linalg.solve(dense_gnh(problem, 1e-3), B)
    assert result.method == "pcg" and result.info["preconditioner"] == preconditioner
    assert bool(result.converged.all()) and float(result.residual_norms.max()) <= 1e-12
    assert rel_err(result.solution, expected) < 1e-9
    # honest counts: one product per active column per iteration, r more to build a sketch
    assert result.info["operator_products"] == int(result.iterations.sum())
    assert result.info["preconditioner_products"] == (10 if options else 0)
    # the preconditioner is built once per operator and reused
    again = pbrf_fast.solve(op, B[:, 0], "pcg", preconditioner=preconditioner, preconditioner_options=options,
                            tol=1e-12)
    assert again.solution.shape == (problem.dim,) and again.info["preconditioner_products"] == 0
    assert again.info["preconditioner_seconds"] < result.info["preconditioner_seconds"]


def test_pcg_needs_fewer_iterations_than_cg_on_an_ill_conditioned_problem():
    problem = ill_conditioned_problem()
    op = pbrf_fast.GaussNewton(problem, 1e-4)
    B = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cg = pbrf_fast.solve(op, B, "cg", tol=1e-8)
    pcg = pbrf_fast.solve(op, B, "pcg", preconditioner="ekfac", tol=1e-8)
    assert bool(cg.converged.all()) and bool(pcg.converged.all())
    assert int(pcg.iterations.max()) * 3 < int(cg.iterations.min())
    expected = torch.linalg.solve(dense_gnh(problem, 1e-4), B)
    assert rel_err(pcg.solution, expected) < 1e-6


def test_the_default_preconditioner_is_a_nystrom_sketch_of_rank_min_100_d():
    """Nystrom by default (EK-FAC slows CG down on ReLU nets: bench/RESULTS.md); its rank
    never exceeds the operator's dimension, where the sketch is the whole curvature."""
    problem = make_problem("cross_entropy", n=20, d_in=2, hidden=(2,), outputs=3, weight_decay=1e-3)
    assert problem.dim < MIN_DEFAULT_RANK
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    B = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    result = pbrf_fast.solve(op, B, "pcg", tol=1e-10)
    assert result.info["preconditioner"] == "nystrom"
    assert result.info["preconditioner_products"] == problem.dim
    assert int(result.iterations.max()) <= 2  # rank d: the sketch is G itself
    assert rel_err(result.solution, torch.linalg.solve(dense_gnh(problem, 1e-3), B)) < 1e-8
    with pytest.raises(InputError, match="rank must be between 1"):
        pbrf_fast.solve(op, B, "pcg", preconditioner_options={"rank": problem.dim + 1})


def test_the_default_rank_follows_the_first_solves_columns_and_stays():
    """No rank given: SKETCH_PER_COLUMN per right-hand side (MIN_DEFAULT_RANK to DEFAULT_RANK,
    at most d), fixed by the operator's first solve so a later, smaller chunk reuses the sketch."""
    problem = make_problem("cross_entropy", n=40, d_in=10, hidden=(20,), outputs=3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(6)
    for columns, rank in ((1, MIN_DEFAULT_RANK), (12, 2 * 12), (80, DEFAULT_RANK)):
        op = pbrf_fast.GaussNewton(problem, 1e-2)
        B = torch.randn(problem.dim, columns, generator=g, dtype=torch.float64)
        first = pbrf_fast.solve(op, B, "pcg", tol=1e-10)
        assert first.info["preconditioner_products"] == rank == min(DEFAULT_RANK, max(MIN_DEFAULT_RANK,
                                                                                     SKETCH_PER_COLUMN * columns))
        assert rel_err(first.solution, torch.linalg.solve(dense_gnh(problem, 1e-2), B)) < 1e-8
        later = pbrf_fast.solve(op, B[:, :1], "pcg", tol=1e-10)
        assert later.info["preconditioner_products"] == 0  # the first solve's sketch, reused


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
    short = pbrf_fast.solve(op, B, "pcg", preconditioner="ekfac", tol=1e-12, max_iter=2)
    assert short.iterations.tolist() == [2, 2] and not bool(short.converged.any())
    resumed = pbrf_fast.solve(op, B, "pcg", preconditioner="ekfac", tol=1e-10, x0=short.solution)
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


# ------------------------------------------------------------------ Nystrom preconditioners
from pbrf_fast.inverses.preconditioners import nystrom_sketch  # noqa: E402


def _dense(apply, d):
    return apply(torch.eye(d, dtype=torch.float64))


def test_nystrom_sketch_of_full_rank_is_the_data_term_and_below_it_otherwise():
    problem = make_problem("cross_entropy", n=12, hidden=(4,), outputs=3, weight_decay=1e-2)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    C = dense_gnh(problem) - 1e-2 * torch.eye(problem.dim, dtype=torch.float64)  # data term, no weight decay
    full = nystrom_sketch(op, problem.dim, seed=1)
    assert rel_err(full.U @ torch.diag(full.eigenvalues) @ full.U.T, C) < 1e-9
    assert full.products == problem.dim
    for q in (0, 2):
        part = nystrom_sketch(op, 7, seed=3, power_iterations=q)
        assert part.products == 7 * (q + 1) and part.U.shape == (problem.dim, 7)
        assert torch.allclose(part.U.T @ part.U, torch.eye(7, dtype=torch.float64), atol=1e-10)
        approx = part.U @ torch.diag(part.eigenvalues) @ part.U.T
        assert float(torch.linalg.eigvalsh(C - approx).min()) > -1e-10  # Nystrom never overshoots C
        assert bool((part.eigenvalues[:-1] >= part.eigenvalues[1:]).all())
    # power iterations sharpen the top eigenvalue towards C's
    top = float(torch.linalg.eigvalsh(C)[-1])
    assert abs(nystrom_sketch(op, 7, seed=3, power_iterations=2).eigenvalues[0] - top) <= \
        abs(nystrom_sketch(op, 7, seed=3).eigenvalues[0] - top) + 1e-12


@pytest.mark.parametrize("kind", ["nystrom", "nystrom+ekfac", "nystrom+kfac"])
def test_nystrom_preconditioners_are_their_dense_formulas(kind):
    problem = make_problem("mse", n=15, hidden=(4,), outputs=2, weight_decay=1e-2)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    mu = 1e-2 + 1e-3  # the operator's weight decay + damping
    pre = PRECONDITIONERS[kind](op, rank=6, seed=2)
    U, lam = pre.sketch.U, pre.sketch.eigenvalues
    eye = torch.eye(problem.dim, dtype=torch.float64)
    complement = eye - U @ U.T
    if kind == "nystrom":
        expected = U @ torch.diag((lam[-1] + mu) / (lam + mu)) @ U.T + complement
    else:
        kron = pbrf_fast.KroneckerCurvature(problem, 1e-3, kind.split("+")[1])
        M_inv = torch.linalg.inv(kron.dense())
        expected = U @ torch.diag(1 / (lam + mu)) @ U.T + complement @ M_inv @ complement
    P_inv = _dense(pre.inverse_matvec, problem.dim)
    assert rel_err(P_inv, expected) < 1e-10
    assert rel_err(P_inv, P_inv.T) < 1e-10 and float(torch.linalg.eigvalsh(P_inv).min()) > 0


def test_full_rank_nystrom_pcg_takes_one_iteration_and_damping_copies_use_their_own_mu():
    """With r = d the sketch is C itself, so P^{-1} is a multiple of (C + mu I)^{-1}: one
    step. A damping copy of the operator reuses the sketch with its own mu."""
    problem = make_problem("cross_entropy", n=10, hidden=(3,), outputs=3, weight_decay=1e-2)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    B = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    options = {"rank": problem.dim}
    assert pbrf_fast.solve(op, B, "pcg", preconditioner="nystrom", preconditioner_options=options,
                           tol=1e-9).iterations.tolist() == [1, 1, 1]
    other = op.with_damping(1e-1)
    result = pbrf_fast.solve(other, B, "pcg", preconditioner="nystrom", preconditioner_options=options, tol=1e-9)
    assert result.iterations.tolist() == [1, 1, 1] and result.info["preconditioner_products"] == 0
    assert rel_err(result.solution, torch.linalg.solve(dense_gnh(problem, 1e-1), B)) < 1e-8


def test_nystrom_lowers_the_condition_number_and_the_iterations():
    problem = make_problem("cross_entropy", n=60, d_in=6, hidden=(8,), outputs=4, seed=3)
    op = pbrf_fast.GaussNewton(problem, 1e-4)
    A = dense_gnh(problem, 1e-4)
    pre = PRECONDITIONERS["nystrom"](op, rank=30, power_iterations=1)
    L = torch.linalg.cholesky(_dense(pre.inverse_matvec, problem.dim))
    kappa = torch.linalg.cond(A)
    kappa_pre = torch.linalg.cond(L.T @ A @ L)
    assert kappa_pre * 10 < kappa
    B = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cg = pbrf_fast.solve(op, B, "cg", tol=1e-8)
    pcg = pbrf_fast.solve(op, B, "pcg", preconditioner="nystrom",
                          preconditioner_options={"rank": 30, "power_iterations": 1}, tol=1e-8)
    assert bool(pcg.converged.all()) and int(pcg.iterations.max()) * 2 < int(cg.iterations.min())


def test_bad_nystrom_options_give_named_errors():
    problem = make_problem("mse", n=8, hidden=(3,), outputs=2)
    op = pbrf_fast.GaussNewton(problem, 1e-2)
    B = torch.ones(problem.dim, dtype=torch.float64)
    for options, match in (({"rank": 0}, "rank"), ({"rank": problem.dim + 1}, "rank"), ({"rank": 2.5}, "rank"),
                           ({"rank": 3, "power_iterations": -1}, "power_iterations"),
                           ({"rank": 3, "kronecker_options": {"seed": 1}}, "kronecker_options"),
                           ({"rank": 3, "sketch": 1}, "sketch")):
        with pytest.raises((InputError, TypeError), match=match):
            pbrf_fast.solve(op, B, "pcg", preconditioner="nystrom", preconditioner_options=options)
    with pytest.raises(InputError, match="damping"):
        pbrf_fast.solve(pbrf_fast.GaussNewton(problem, 0.0), B, "pcg", preconditioner="nystrom",
                        preconditioner_options={"rank": 3})
    with pytest.raises(InputError, match="preconditioner_options must be a dict"):
        pbrf_fast.solve(op, B, "pcg", preconditioner="nystrom", preconditioner_options=3)


def test_scores_command_takes_a_pcg_preconditioner(tmp_path):
    import json

    from pbrf_fast.cli import main

    base = ["scores", "--dataset", "synthetic", "--model", "mlp", "--train-points", "60", "--test-points", "2",
            "--no-progress", "--threads", "1", "--solver", "pcg", "--tol", "1e-6", "--cg-iters", "500"]
    assert main([*base, "--preconditioner", "nystrom", "--preconditioner-rank", "16",
                 "--out", str(tmp_path / "ok")]) == 0
    arguments = json.loads((tmp_path / "ok" / "arguments.json").read_text())
    assert arguments["solver_options"]["preconditioner"] == "nystrom"
    assert arguments["solver_options"]["preconditioner_rank"] == 16
    with pytest.raises(SystemExit):  # argparse names the argument and the choices
        main([*base, "--preconditioner", "nystorm", "--out", str(tmp_path / "bad")])


def _bench_pcg():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pcg

    return bench_pcg


def test_the_spectral_reduction_of_bench_pcg_is_exact():
    """bench_pcg.py measures CG / PCG iterations on ResNet-20 over 500 images through a
    reduction to K's row space (N*C dimensions instead of d): the reduced operator must have
    the GNH's nonzero spectrum, the same b^T (G + mu I)^{-1} b per column, and CG must take
    the same iterations on it as on the d-dimensional operator."""
    bench = _bench_pcg()
    problem = make_problem("cross_entropy", n=6, d_in=4, hidden=(6,), outputs=3, weight_decay=1e-3)
    op = pbrf_fast.GaussNewton(problem, 1e-2)
    B = torch.randn(problem.dim, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    eigenvalues, B_red, info = bench.spectral_reduction(op, B)
    dense = dense_gnh(problem, 0.0)  # G + weight decay
    exact = torch.linalg.eigvalsh(dense - problem.weight_decay * torch.eye(problem.dim, dtype=torch.float64))
    top = exact[exact > 1e-9 * op.shift].flip(0)
    reduced = eigenvalues[eigenvalues > 0].sort(descending=True).values
    assert info["rank_kept"] == len(top) == problem.n * 2  # softmax: rank N (C - 1)
    assert torch.allclose(reduced, top, rtol=1e-9, atol=1e-12)
    full_x = torch.linalg.solve(dense_gnh(problem, 1e-2), B)
    red_x = B_red / (eigenvalues + op.shift).unsqueeze(1)
    assert torch.allclose((B * full_x).sum(0), (B_red * red_x).sum(0), rtol=1e-10)
    assert torch.allclose(full_x.norm(dim=0), red_x.norm(dim=0), rtol=1e-10)
    red_op = bench.diagonal_gnh(eigenvalues, 1e-2, problem.weight_decay)
    assert abs(red_op.shift - op.shift) < 1e-15
    cg_full = pbrf_fast.solve(op, B, "cg", tol=1e-8)
    cg_red = pbrf_fast.solve(red_op, B_red, "cg", tol=1e-8)
    assert (cg_full.iterations - cg_red.iterations).abs().max() <= 1
