"""damping="auto": the rule of pbrf_fast.damping (lambda = factor x tr(C^2)/tr(C) of the
curvature's data term) against its formula on dense float64 spectra, the Hutchinson estimate
against the exact traces, a Kronecker curvature's eigenvalues against its dense matrix, and the
choice recorded where a user finds it (Influence.damping_choice, damping.json, summary.json)."""
import json

import numpy as np
import pytest
import torch

import pbrf_fast
from pbrf_fast.curvatures import KroneckerCurvature
from pbrf_fast.damping import (AUTO_DAMPING_FACTORS, AUTO_EXACT_DIM, auto_damping, check_damping,
                               spectrum_scale)
from pbrf_fast.errors import InputError, InputTypeError
from pbrf_fast.scale import compute_scores

from factories import dense_gnh, make_problem


def _formula(eigenvalues: torch.Tensor, factor: float) -> float:
    eigenvalues = eigenvalues.double()
    return factor * float((eigenvalues ** 2).sum() / eigenvalues.sum())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_auto_is_its_formula_on_the_dense_spectrum(loss):
    problem = make_problem(loss, weight_decay=1e-2, n=40, hidden=(6,), outputs=3)
    assert problem.dim <= AUTO_EXACT_DIM
    data_term = dense_gnh(problem) - problem.weight_decay * torch.eye(problem.dim, dtype=torch.float64)
    expected = _formula(torch.linalg.eigvalsh(data_term), AUTO_DAMPING_FACTORS["gnh"])
    influence = pbrf_fast.Influence(problem)  # damping="auto" is the default
    choice = influence.damping_choice
    assert choice.value == pytest.approx(expected, rel=1e-10)
    assert choice.mean_eigenvalue == pytest.approx(float(torch.trace(data_term)) / problem.dim, rel=1e-10)
    assert choice.method.startswith("exact") and "energy-weighted" in choice.reason
    # the operator carries it: weight decay + the chosen damping
    assert influence.operator.shift == pytest.approx(problem.weight_decay + choice.value, rel=1e-12)
    # an explicit number is taken as given, and nothing is chosen
    assert pbrf_fast.Influence(problem, damping=0.25).damping_choice is None


def test_hutchinson_estimate_approaches_the_exact_traces():
    problem = make_problem("cross_entropy", n=60, d_in=10, hidden=(40,), outputs=3)
    assert problem.dim > AUTO_EXACT_DIM  # the stochastic path
    eigenvalues = torch.linalg.eigvalsh(dense_gnh(problem))
    exact = float((eigenvalues ** 2).sum() / eigenvalues.sum())
    op = pbrf_fast.GaussNewton(problem, 0.0)
    few, _, how = spectrum_scale(op)  # the default 16 probes
    many, mean, _ = spectrum_scale(op, probes=4000)
    assert how.startswith("Hutchinson, 16 probes over all 60 examples")
    assert few == pytest.approx(exact, rel=0.3)
    assert many == pytest.approx(exact, rel=0.05)
    assert mean == pytest.approx(float(eigenvalues.sum()) / problem.dim, rel=0.05)
    # seeded: the same problem gives the same damping
    assert auto_damping(op).value == auto_damping(op).value


def test_hutchinson_over_a_sample_of_examples():
    problem = make_problem("mse", n=80, d_in=10, hidden=(40,), outputs=3)
    op = pbrf_fast.GaussNewton(problem, 0.0)
    eigenvalues = torch.linalg.eigvalsh(dense_gnh(problem))
    exact = float((eigenvalues ** 2).sum() / eigenvalues.sum())
    scale, _, how = spectrum_scale(op, probes=2000, examples=40)
    assert "over 40 of 80 examples" in how
    assert scale == pytest.approx(exact, rel=0.25)  # a half sample of examples, not the full sum


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_eigenvalues_are_its_dense_spectrum(kind):
    problem = make_problem("cross_entropy", n=30, hidden=(5,), outputs=3)
    op = KroneckerCurvature(problem, 0.0, kind)
    dense = op.data_matvec(torch.eye(problem.dim, dtype=torch.float64))
    dense = 0.5 * (dense + dense.T)
    got = torch.sort(op.eigenvalues().double()).values
    np.testing.assert_allclose(got.numpy(), torch.linalg.eigvalsh(dense).numpy(), rtol=1e-9,
                               atol=1e-12 * float(got.abs().max()))
    choice = pbrf_fast.Influence(problem, curvature=kind).damping_choice
    assert choice.method == "its eigenvalues, exactly"
    assert choice.value == pytest.approx(_formula(got, AUTO_DAMPING_FACTORS[kind]), rel=1e-10)


@pytest.mark.parametrize("value, error", [(-1.0, InputError), ("fast", InputError), (float("nan"), InputError),
                                          (True, InputTypeError), ([1e-3], InputTypeError)])
def test_a_bad_damping_is_a_named_error(value, error):
    with pytest.raises(error, match="damping"):
        check_damping(value)
    with pytest.raises(error, match="damping"):
        pbrf_fast.Influence(make_problem("mse"), damping=value)
    assert check_damping(" AUTO ") == "auto" and check_damping("0.1") == 0.1


def test_a_curvature_without_a_positive_eigenvalue_is_refused_by_name():
    op = pbrf_fast.GaussNewton(make_problem("mse", n=10), 0.0)
    op.data_matvec = lambda V, idx=None: torch.zeros_like(V)  # C = 0: no scale to set a damping by
    with pytest.raises(InputError, match="give a damping"):
        auto_damping(op)


def test_the_score_pipeline_records_and_reuses_its_choice(tmp_path):
    problem = make_problem("cross_entropy", n=24, hidden=(5,), outputs=3)
    x, t = problem.inputs, problem.targets
    summary = compute_scores(problem.model, "cross_entropy", x, t, x[:3], t[:3], tmp_path, solver="direct",
                             progress=False)
    stored = json.loads((tmp_path / "damping.json").read_text())
    recorded = summary["damping"]["0"]
    assert recorded["value"] == pytest.approx(pbrf_fast.Influence(problem).damping_choice.value, rel=1e-10)
    assert stored == recorded and "energy-weighted" in stored["reason"]
    expected = pbrf_fast.Influence(problem, damping=recorded["value"], solver="direct").scores(x[:3], t[:3])
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected.numpy(), rtol=1e-4,
                               atol=1e-6 * float(expected.abs().max()))
    assert json.loads((tmp_path / "arguments.json").read_text())["damping"] == "auto"
    # a resume reads the stored choice instead of measuring again
    stored["value"] *= 2
    (tmp_path / "damping.json").write_text(json.dumps(stored))
    (tmp_path / "summary.json").unlink()
    again = compute_scores(problem.model, "cross_entropy", x, t, x[:3], t[:3], tmp_path, solver="direct",
                           progress=False)
    assert again["damping"]["0"]["value"] == stored["value"]


@pytest.mark.parametrize("curvature, solver", [("gnh", "direct"), ("gnh", "kernel"), ("ekfac", "auto")])
def test_with_damping_equals_a_fresh_influence_and_shares_the_work(curvature, solver):
    """Influence.with_damping: the same answer as an Influence built at that damping (float64,
    1e-10), from the operator's cached factorisation / factors instead of new ones."""
    problem = make_problem("cross_entropy", weight_decay=1e-3, n=30, hidden=(6,), outputs=3)
    x, t = problem.inputs[:4], problem.targets[:4]
    first = pbrf_fast.Influence(problem, 1e-3, curvature=curvature, solver=solver)
    first.scores(x, t)
    cached = dict(first.operator._cache)
    for damping in (0.3, "auto"):
        other = first.with_damping(damping)
        fresh = pbrf_fast.Influence(problem, damping, curvature=curvature, solver=solver)
        np.testing.assert_allclose(other.scores(x, t).numpy(), fresh.scores(x, t).numpy(), rtol=1e-10, atol=1e-14)
        assert other.damping == pytest.approx(fresh.damping, rel=1e-12)
        assert (other.damping_choice is None) == (damping != "auto")
        for key, entry in cached.items():  # the first operator's work, reused rather than rebuilt
            assert other.operator._cache.get(key) is entry, key
    assert first.damping == pytest.approx(1e-3)  # the original is unchanged
