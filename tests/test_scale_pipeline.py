"""compute_scores end to end on a tiny MLP: agreement with pbrf_fast.Influence,
resume after a crash (byte-identical, finished chunks not recomputed), the
argument guard, self-influence and top-k."""
import json

import numpy as np
import pytest
import torch

import pbrf_fast
from pbrf_fast.paper.models import mlp
from pbrf_fast.scale import ScoreArguments, compute_scores, load_scores
from pbrf_fast.paper.builtin_scores import load_dataset
from pbrf_fast.results_folder import ArgumentMismatch

DAMPING = 1e-2


def setup():
    x_tr, y_tr, x_te, y_te = load_dataset("synthetic", n_train=90, n_test=5, seed=1)
    x_tr, x_te = x_tr.double(), x_te.double()
    model = mlp(12, (8,), 4, seed=0, dtype=torch.float64)
    return model, x_tr, y_tr, x_te, y_te


def run(out, **kw):
    model, x_tr, y_tr, x_te, y_te = setup()
    options = dict(damping=DAMPING, weight_decay=1e-3, solver="cg", solver_options={"tol": 1e-12, "max_iter": 500},
                   query_chunk=2, batch_size=32, rank=200, progress=False, seed=0, self_influence=True)
    options.update(kw)
    return compute_scores(model, "cross_entropy", x_tr, y_tr, x_te, y_te, out, **options)


def test_scores_self_influence_topk_match_influence(tmp_path):
    summary = run(tmp_path)
    model, x_tr, y_tr, x_te, y_te = setup()
    problem = pbrf_fast.Problem(model, "cross_entropy", x_tr, y_tr, weight_decay=1e-3)
    influence = pbrf_fast.Influence(problem, damping=DAMPING, solver="direct")
    expected = influence.scores(x_te, y_te).numpy()
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-7 * np.abs(expected).max())
    # rank >= d: the low-rank self-influence is exact
    np.testing.assert_allclose(np.load(tmp_path / "self_influence.npy"), influence.self_influence().numpy(),
                               rtol=1e-6)
    top = json.loads((tmp_path / "topk.json").read_text())
    assert top["0"]["proponents"][0][0] == int(np.argmax(scores[:, 0]))
    assert top["4"]["opponents"][0][0] == int(np.argmin(scores[:, 4]))
    assert summary["chunks"] == 3 and set(summary["stage_seconds"]) >= {"s_test", "scores", "self_influence"}
    assert json.loads((tmp_path / "arguments.json").read_text())["damping"] == DAMPING


def test_resume_after_crash_is_byte_identical(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run(clean, self_influence=False)

    def crash_after_second(c):
        if c == 1:
            raise KeyboardInterrupt("simulated kill after chunk 1")

    with pytest.raises(KeyboardInterrupt):
        run(crashed, self_influence=False, on_chunk_done=crash_after_second)
    recomputed = []
    run(crashed, self_influence=False, on_chunk_done=recomputed.append)
    assert recomputed == [2]
    assert (clean / "scores.npy").read_bytes() == (crashed / "scores.npy").read_bytes()


def test_changed_arguments_are_refused_unless_overwrite(tmp_path):
    run(tmp_path, self_influence=False)
    with pytest.raises(ArgumentMismatch, match="damping"):
        run(tmp_path, self_influence=False, damping=0.5)
    run(tmp_path, self_influence=False, damping=0.5, overwrite=True, progress=False)
    assert json.loads((tmp_path / "arguments.json").read_text())["damping"] == 0.5


def test_lowrank_solver_path(tmp_path):
    run(tmp_path, solver="lowrank", solver_options={}, self_influence=False)
    model, x_tr, y_tr, x_te, y_te = setup()
    problem = pbrf_fast.Problem(model, "cross_entropy", x_tr, y_tr, weight_decay=1e-3)
    expected = pbrf_fast.Influence(problem, damping=DAMPING, solver="direct").scores(x_te, y_te).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("solver, curvature, computed", [("cg", "gnh", False), ("lowrank", "gnh", True),
                                                         ("auto", "ekfac", True)])
def test_self_influence_auto_only_where_it_is_the_scores_own_inverse(tmp_path, solver, curvature, computed):
    """self_influence="auto" (the default): on where the scores' own inverse gives it (the
    low-rank solver's eigenpairs, EK-FAC's quadratic form), off for the exact GNH solved
    iteratively -- no hidden Lanczos -- and the summary says why."""
    assert ScoreArguments().self_influence == "auto"
    options = {"cg": {"tol": 1e-10, "max_iter": 300}, "lowrank": {}, "auto": {}}[solver]
    summary = run(tmp_path, solver=solver, curvature=curvature, solver_options=options, self_influence="auto", rank=8)
    assert (tmp_path / "self_influence.npy").exists() == computed
    assert "eigenpairs" not in summary["stage_seconds"] or solver == "lowrank"
    if not computed:
        assert summary["self_influence_method"].startswith("off: with the exact GNH")
        assert load_scores(tmp_path).self_influence is None
