"""pbrf_fast.evaluation (LDS, LOO correlation, brittleness, mislabel detection) and the
ground truths it is computed against (subset retraining, PBRF of a group)."""
import dataclasses
import json

import numpy as np
import pytest
import scipy.stats
import torch

import pbrf_fast
from pbrf_fast import cli
from pbrf_fast.errors import InputError, InputTypeError
from pbrf_fast.evaluation import (brittleness, detection_auc, detection_curve, linear_datamodeling_score,
                                  loo_correlation, random_subsets, subset_predictions)
from pbrf_fast.paper.ground_truth import pbrf_ground_truth, retraining_ground_truth, train_on_subsets
from pbrf_fast.paper.responses import ResponseSettings, ResponseSolver
from pbrf_fast.paper.training import TrainConfig, train
from pbrf_fast.results_folder import ResultsFolder


# ------------------------------------------------------------------------------------ LDS
@pytest.mark.parametrize("integer_truth", [False, True])
def test_lds_matches_scipy_spearman(integer_truth):
    rng = np.random.default_rng(0)
    n, m, k = 37, 9, 23
    scores = rng.normal(size=(n, m))
    masks = rng.random((k, n)) < 0.5
    truth = rng.integers(0, 4, size=(k, m)).astype(float) if integer_truth else rng.normal(size=(k, m))
    result = linear_datamodeling_score(scores, masks, truth)
    predicted = -(masks.astype(float) @ scores)
    expected = np.array([scipy.stats.spearmanr(predicted[:, j], truth[:, j]).statistic for j in range(m)])
    np.testing.assert_allclose(result.per_test, expected, rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(expected.mean(), abs=1e-12)
    assert result.n_finite == m and result.n_undefined == 0
    # torch inputs and 0/1 masks give the same numbers
    again = linear_datamodeling_score(torch.tensor(scores), torch.tensor(masks.astype(np.int64)), torch.tensor(truth))
    np.testing.assert_allclose(again.per_test, result.per_test, rtol=0, atol=0)
    np.testing.assert_allclose(subset_predictions(scores, masks), predicted, atol=1e-12)


def test_lds_reports_constant_truth_as_undefined():
    rng = np.random.default_rng(1)
    scores, masks, truth = rng.normal(size=(20, 3)), rng.random((10, 20)) < 0.5, rng.normal(size=(10, 3))
    truth[:, 1] = 2.5
    result = linear_datamodeling_score(scores, masks, truth)
    assert np.isnan(result.per_test[1]) and result.n_undefined == 1 and result.n_finite == 2
    assert result.mean == pytest.approx(np.mean(result.per_test[[0, 2]]))
    assert result.as_dict()["per_test"][1] is None
    assert "1 undefined" in str(result)


@pytest.mark.parametrize("call, message", [
    (lambda s, m, t: linear_datamodeling_score(s, m * 2, t), "only 0 and 1"),
    (lambda s, m, t: linear_datamodeling_score(s, m[:, :-1], t), "training points"),
    (lambda s, m, t: linear_datamodeling_score(s, m, t[:, :-1]), "truth must be"),
    (lambda s, m, t: linear_datamodeling_score(s[0], m, t), "dimensions"),
    (lambda s, m, t: linear_datamodeling_score(s, m[:2], t[:2]), "at least 3"),
    (lambda s, m, t: linear_datamodeling_score(s * np.nan, m, t), "NaN"),
    (lambda s, m, t: loo_correlation(s, s[:-1]), "same shape"),
    (lambda s, m, t: loo_correlation(s, s, method="kendall"), "spearman"),
])
def test_bad_inputs_are_named(call, message):
    rng = np.random.default_rng(2)
    scores, masks, truth = rng.normal(size=(12, 4)), (rng.random((6, 12)) < 0.5).astype(int), rng.normal(size=(6, 4))
    with pytest.raises(InputError, match=message):
        call(scores, masks, truth)


def test_non_numeric_input_is_a_type_error():
    with pytest.raises(InputTypeError, match="scores"):
        linear_datamodeling_score("scores", np.ones((3, 2)), np.ones((3, 1)))


def test_random_subsets_are_seeded_and_exact():
    a, b = random_subsets(50, 8, 0.3, seed=4), random_subsets(50, 8, 0.3, seed=4)
    assert a.dtype == bool and a.shape == (8, 50) and (a.sum(1) == 15).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_subsets(50, 8, 0.3, seed=5))
    with pytest.raises(InputError, match="alpha"):
        random_subsets(50, 8, 1.0)


# ---------------------------------------------------------------------------- LOO, others
def test_loo_correlation_matches_scipy():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(15, 4))
    changes = scores + 0.5 * rng.normal(size=(15, 4))
    pearson, spearman = loo_correlation(scores, changes), loo_correlation(scores, changes, "spearman")
    for j in range(4):
        assert pearson.per_test[j] == pytest.approx(scipy.stats.pearsonr(scores[:, j], changes[:, j]).statistic, abs=1e-12)
        assert spearman.per_test[j] == pytest.approx(
            scipy.stats.spearmanr(scores[:, j], changes[:, j]).statistic, abs=1e-12)
    assert pearson.pooled == pytest.approx(scipy.stats.pearsonr(scores.ravel(), changes.ravel()).statistic, abs=1e-12)
    one = loo_correlation(scores[:, 0], changes[:, 0])
    assert one.mean == pytest.approx(pearson.per_test[0])


def test_brittleness_finds_the_first_flipping_k():
    scores = np.array([[5.0, 0.1], [4.0, 0.2], [3.0, 0.3], [2.0, 0.4], [1.0, 0.5]])
    seen = []

    def flips(j, removal_sets):
        seen.append((j, [r.tolist() for r in removal_sets]))
        # test 0 flips once training point 2 (its third proponent) is gone; test 1 never
        return [j == 0 and 2 in r for r in removal_sets]

    result = brittleness(scores, flips, ks=[3, 1, 2])
    assert result.ks == (1, 2, 3)
    assert seen[0] == (0, [[0], [0, 1], [0, 1, 2]]) and seen[1] == (1, [[4], [4, 3], [4, 3, 2]])
    assert result.smallest_k[0] == 3 and np.isnan(result.smallest_k[1])
    assert result.flipped_fraction == {1: 0.0, 2: 0.0, 3: 0.5} and result.n_flipped == 1
    with pytest.raises(InputError, match="ks"):
        brittleness(scores, flips, ks=[6])


def test_detection_curve_and_auc():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.05])
    flagged = np.array([1, 0, 1, 0, 0, 0])
    assert detection_curve(scores, flagged, [0.0, 1 / 3, 0.5, 1.0]) == [0.0, 1.0, 1.0, 1.0]
    # perfect ranking: found = 1/2, 1, 1, 1, 1, 1 after each inspected point
    assert detection_auc(scores, flagged) == pytest.approx((0.25 + 0.75 + 4 * 1.0) / 6)
    assert detection_auc(-scores, flagged) < 0.5
    rng = np.random.default_rng(0)
    assert detection_auc(rng.random(4000), rng.random(4000) < 0.1) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(InputError, match="flagged"):
        detection_auc(scores, np.zeros(6))


# ------------------------------------------------------------------------ ground truths
def _logistic_problem(n=160, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 40, features, generator=g, dtype=torch.float64)
    w = torch.randn(features, classes, generator=g, dtype=torch.float64)
    y = (x @ w + 0.7 * torch.randn(n + 40, classes, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(seed)
    problem = pbrf_fast.Problem(torch.nn.Linear(features, classes).double(), "cross_entropy", x[:n], y[:n],
                                weight_decay=1e-2)
    return problem, x[n:], y[n:]


def test_sign_convention_exact_influence_predicts_subset_retraining():
    problem, xt, yt = _logistic_problem()
    config = TrainConfig(optimizer="lbfgs", epochs=0)
    train(problem, config)
    masks = random_subsets(problem.n, 16, 0.5, seed=1)
    start = lambda seed: problem.theta.clone()  # noqa: E731 -- convex: the optimum does not depend on the start
    truth = retraining_ground_truth(problem, config, masks, start, xt, yt, chunk=16, progress=False)["truth"]
    scores = pbrf_fast.Influence(problem, damping=0.0, solver="direct").scores(xt, yt)
    lds = linear_datamodeling_score(scores, masks, truth)
    assert lds.mean > 0.5, lds
    assert linear_datamodeling_score(-scores, masks, truth).mean < -0.5


def test_subset_training_is_vectorised_and_uses_only_the_subset():
    torch.manual_seed(0)
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    problem = pbrf_fast.Problem(model, "cross_entropy", x, y, weight_decay=1e-3)
    config = TrainConfig(epochs=3, lr=0.1, batch_size=4, optimizer="momentum")
    masks = torch.as_tensor(random_subsets(30, 3, 0.5, seed=2))
    theta0 = problem.theta.unsqueeze(0) + 0.1 * torch.randn(3, problem.dim, dtype=torch.float64)
    stacked = train_on_subsets(problem, config, masks, theta0, [5, 6, 7])
    for p in range(3):
        alone = train_on_subsets(problem, config, masks[p : p + 1], theta0[p : p + 1], [5 + p])
        torch.testing.assert_close(stacked[p], alone[0], rtol=0, atol=1e-12)
    # points outside the subset never matter
    other = pbrf_fast.Problem(model, "cross_entropy", torch.where(masks[0][:, None], x, 100.0 * x),
                              torch.where(masks[0], y, (y + 1) % 3), weight_decay=1e-3)
    torch.testing.assert_close(train_on_subsets(other, config, masks[:1], theta0[:1], [5])[0], stacked[0],
                               rtol=0, atol=1e-12)
    assert not torch.allclose(stacked[0], theta0[0])


def _mlp_base(batch_size):
    torch.manual_seed(1)
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 2, (24,))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    problem = pbrf_fast.Problem(model, "cross_entropy", x, y, weight_decay=1e-3)
    base = train(problem, TrainConfig(epochs=4, lr=0.2, batch_size=batch_size))
    return problem, base


def test_pbrf_mask_full_batch_equals_group_pbrf():
    # With one batch the estimated removal term is exact: the mask form must equal Eq. 8 for the group.
    problem, base = _mlp_base(batch_size=24)
    solver = ResponseSolver(problem, base, ResponseSettings(damping=1e-2))
    removed = torch.zeros(2, 24, dtype=torch.bool)
    removed[0, [1, 5, 7]] = True
    removed[1, [0, 2, 3, 4, 20]] = True
    by_mask = solver.pbrf_mask(removed)
    by_group = solver.pbrf([[1, 5, 7], [0, 2, 3, 4, 20]])
    torch.testing.assert_close(by_mask, by_group, rtol=0, atol=1e-10)


def test_pbrf_mask_lbfgs_equals_group_pbrf():
    problem, xt, yt = _logistic_problem(n=60)
    base = train(problem, TrainConfig(optimizer="lbfgs", epochs=0))
    solver = ResponseSolver(problem, base, ResponseSettings(damping=1e-2))
    removed = torch.as_tensor(~random_subsets(60, 2, 0.5, seed=3))
    by_group = solver.pbrf([torch.nonzero(r).squeeze(1).tolist() for r in removed])
    torch.testing.assert_close(solver.pbrf_mask(removed), by_group, rtol=0, atol=1e-6)


def test_ground_truths_resume_subset_by_subset(tmp_path):
    problem, base = _mlp_base(batch_size=8)
    config, masks = base.config, random_subsets(24, 4, 0.5, seed=0)
    make = lambda seed: problem.theta + 0.01 * torch.randn(problem.dim, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                                           dtype=torch.float64)
    x_test, y_test = problem.inputs[:5], problem.targets[:5]
    folder = ResultsFolder(tmp_path, {"a": 1})
    first = retraining_ground_truth(problem, config, masks, make, x_test, y_test, repeats=2, chunk=3, folder=folder,
                                    progress=False)
    solver = ResponseSolver(problem, base, ResponseSettings(damping=1e-2))
    pbrf_first = pbrf_ground_truth(solver, masks, x_test, y_test, chunk=3, folder=folder, progress=False)
    (tmp_path / "points" / "retrain" / "0000002.json").unlink()
    (tmp_path / "points" / "pbrf" / "0000000.json").unlink()
    again = retraining_ground_truth(problem, config, masks, make, x_test, y_test, repeats=2, chunk=3, folder=folder,
                                    progress=False)
    pbrf_again = pbrf_ground_truth(solver, masks, x_test, y_test, chunk=3, folder=folder, progress=False)
    assert again["computed"] == 1 and pbrf_again["computed"] == 1
    np.testing.assert_allclose(again["truth"], first["truth"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pbrf_again["truth"], pbrf_first["truth"], rtol=0, atol=1e-12)
    record = json.loads((tmp_path / "points" / "retrain" / "0000002.json").read_text())
    assert len(record["repeats"]) == 2 and record["repeats"][0] != record["repeats"][1]


def test_a_resumed_ground_truth_reports_the_time_of_every_stored_subset(tmp_path):
    # A killed job's finished subsets cost time too: after a resume that computes nothing,
    # "seconds" is still the whole ground truth's time (each row stores its share).
    problem, base = _mlp_base(batch_size=8)
    config, masks = base.config, random_subsets(24, 4, 0.5, seed=0)
    make = lambda seed: problem.theta.clone()  # noqa: E731
    x_test, y_test = problem.inputs[:5], problem.targets[:5]
    folder = ResultsFolder(tmp_path, {"a": 1})
    solver = ResponseSolver(problem, base, ResponseSettings(damping=1e-2))
    for kind, run in (("retrain", lambda: retraining_ground_truth(problem, config, masks, make, x_test, y_test, chunk=3,
                                                                  folder=folder, progress=False)),
                      ("pbrf", lambda: pbrf_ground_truth(solver, masks, x_test, y_test, chunk=3, folder=folder,
                                                         progress=False))):
        first = run()
        stored = [json.loads(f.read_text())["seconds"] for f in sorted((tmp_path / "points" / kind).glob("*.json"))]
        assert len(stored) == 4 and min(stored) > 0
        assert first["seconds"] == pytest.approx(sum(stored)) and first["seconds"] <= first["call_seconds"]
        again = run()
        assert again["computed"] == 0 and again["untimed"] == 0
        assert again["seconds"] == pytest.approx(first["seconds"]) and again["call_seconds"] < first["seconds"]
        # rows written before rows carried a time are counted, not guessed
        path = tmp_path / "points" / kind / "0000001.json"
        row = json.loads(path.read_text())
        del row["seconds"]
        path.write_text(json.dumps(row))
        assert run()["untimed"] == 1


# -------------------------------------------------------------------------------- command
def test_evaluate_command_writes_table_results_and_figure(tmp_path):
    args = ["evaluate", "--dataset", "digits", "--model", "logreg", "--train-points", "150", "--test-points", "12",
            "--subsets", "5", "--solvers", "direct,kernel", "--checkpoints", "1,2", "--loo", "4",
            "--brittleness", "1", "--brittleness-ks", "3,60", "--lbfgs-iters", "60", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "lds.png").exists()
    table = (tmp_path / "table.md").read_text()
    assert "LDS vs PBRF" in table and "kernel" in table
    # one damping, "auto" by default: its value recorded on each row
    assert set(results["methods"]["direct"]) == {"auto"}
    direct = results["methods"]["direct"]["auto"]
    assert set(direct) == {"1", "2"} and "lds_pbrf" in direct["1"] and "lds_pbrf" not in direct["2"]
    assert len(direct["1"]["damping"]) == 1 and direct["1"]["damping"][0] > 0 and len(direct["2"]["damping"]) == 2
    # the two exact solvers agree
    assert direct["1"]["lds_retraining"]["mean"] == pytest.approx(
        results["methods"]["kernel"]["auto"]["1"]["lds_retraining"]["mean"], abs=1e-6)
    fragile = results["brittleness"]["direct"]
    assert len(fragile["test_points"]) == 1 and set(fragile["flipped_fraction"]) == {"3", "60"}
    assert fragile["flipped_fraction"]["3"] <= fragile["flipped_fraction"]["60"]
    assert "Brittleness" in table and "random" in results["brittleness"]
    # a rerun with --resume recomputes nothing, whichever solvers it reports
    assert cli.main(args[:-2] + ["--solvers", "direct", "--out", str(tmp_path), "--resume"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["ground_truth_computed_subsets"] == {"retraining": 0, "pbrf": 0}
    assert again["methods"]["direct"]["auto"]["1"]["lds_retraining"] == direct["1"]["lds_retraining"]
    assert set(again["methods"]) == {"direct"}
    # more LOO points add to the run (each stored by its removed point); the old ones are reused
    assert cli.main(args[:-2] + ["--solvers", "direct", "--loo", "6", "--out", str(tmp_path), "--resume"]) == 0
    stored = sorted(int(f.stem) for f in (tmp_path / "points" / "loo").glob("*.json"))
    for count in (4, 6):
        points = np.random.default_rng(211).choice(150, size=count, replace=False)
        assert set(points.tolist()) <= set(stored)
    assert len(json.loads((tmp_path / "results.json").read_text())["methods"]["direct"]["auto"]["1"]["loo_pearson"]
               ["per_test"]) == 12


def test_evaluate_damping_grid_one_ground_truth(tmp_path):
    """--damping a,b,auto: each solver at each damping against one retraining ground truth,
    a PBRF per damping, a table row each and the LDS-vs-damping figure."""
    args = ["evaluate", "--dataset", "digits", "--model", "logreg", "--train-points", "120", "--test-points", "8",
            "--subsets", "4", "--solvers", "direct,identity", "--damping", "1e-3,1,auto", "--lbfgs-iters", "60",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]["direct"]) == {"0.001", "1", "auto"}
    rows = results["methods"]["direct"]
    assert rows["0.001"]["1"]["damping"] == pytest.approx([1e-3]) and rows["1"]["1"]["damping"] == pytest.approx([1.0])
    assert rows["auto"]["1"]["damping"][0] > 0
    # a different damping gives a different exact answer, against the same retraining
    assert rows["0.001"]["1"]["lds_retraining"]["mean"] != rows["1"]["1"]["lds_retraining"]["mean"]
    # the gradient dot product ignores the damping
    ident = results["methods"]["identity"]
    assert ident["0.001"]["1"]["lds_retraining"]["mean"] == pytest.approx(ident["1"]["1"]["lds_retraining"]["mean"])
    assert results["ground_truth_computed_subsets"]["retraining"] == 4
    assert (tmp_path / "lds_damping.png").exists()
    table = (tmp_path / "table.md").read_text()
    assert table.count("| direct |") == 3


@pytest.mark.parametrize("argv", [["--solvers", "cg,bogus"], ["--damping", "1e-3,fast"], ["--damping", "-1"], ["--alpha", "1.5"], ["--checkpoints", "0"],
                                  ["--dataset", "mnist", "--model", "resnet20"]])
def test_evaluate_bad_input_exits_2(argv, tmp_path, capsys):
    try:
        code = cli.main(["evaluate", "--out", str(tmp_path)] + argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code == 2


def test_a_diverging_recipe_is_a_named_error_not_a_traceback(tmp_path, capsys):
    argv = ["evaluate", "--dataset", "digits", "--model", "mlp", "--lr", "1e30", "--train-points", "50",
            "--test-points", "5", "--subsets", "3", "--epochs", "2", "--solvers", "identity", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "training diverged at epoch" in capsys.readouterr().err


def test_solver_scores_match_a_dense_float64_reference():
    from pbrf_fast.paper.config import EvaluateConfig
    from pbrf_fast.paper.evaluate_job import solver_scores

    problem, xt, yt = _logistic_problem(n=80, features=4, classes=3)
    train(problem, TrainConfig(optimizer="lbfgs", epochs=0))
    config = EvaluateConfig(damping=1e-2, rank=problem.dim, cg_iters=500, tol=1e-12)
    train_grads = problem.per_example_gradients(problem.inputs, problem.targets)
    test_grads = problem.per_example_gradients(xt, yt)
    A = pbrf_fast.GaussNewton(problem, 1e-2).dense()
    exact = train_grads @ torch.linalg.solve(A, test_grads.T) / problem.n
    for solver, atol in (("direct", 1e-10), ("kernel", 1e-9), ("cg", 1e-8), ("lowrank", 1e-8)):
        scores, info = solver_scores(problem, solver, config, xt, yt)
        np.testing.assert_allclose(scores, exact.numpy(), rtol=0, atol=atol * float(exact.abs().max()), err_msg=solver)
        assert info["seconds"] >= 0
    for kind in ("kfac", "ekfac"):  # the approximation's own inverse, densely
        K = pbrf_fast.KroneckerCurvature(problem, 1e-2, kind, seed=config.seed).dense()
        approx = train_grads @ torch.linalg.solve(K, test_grads.T) / problem.n
        scores, _ = solver_scores(problem, kind, config, xt, yt)
        np.testing.assert_allclose(scores, approx.numpy(), rtol=0, atol=1e-9 * float(approx.abs().max()), err_msg=kind)
        assert np.corrcoef(scores.ravel(), exact.numpy().ravel())[0, 1] > 0.5  # an approximation of the same thing
    for preconditioner in ("nystrom", "ekfac"):  # pcg: exact whatever preconditions it
        pcg = dataclasses.replace(config, preconditioner=preconditioner, preconditioner_rank=5)
        scores, info = solver_scores(problem, "pcg", pcg, xt, yt)
        np.testing.assert_allclose(scores, exact.numpy(), rtol=0, atol=1e-8 * float(exact.abs().max()),
                                   err_msg=preconditioner)
    identity, _ = solver_scores(problem, "identity", config, xt, yt)
    np.testing.assert_allclose(identity, (train_grads @ test_grads.T / problem.n).numpy(), rtol=1e-12, atol=1e-14)


def test_subset_training_of_the_whole_set_equals_the_base_recipe():
    # One replica on every point walks the same batches as train(): the vectorised
    # path (per-tensor gradients, weight decay added in place) must reproduce it.
    torch.manual_seed(3)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    problem = pbrf_fast.Problem(model, "cross_entropy", x, y, weight_decay=1e-2)
    for optimizer in ("sgd", "momentum", "adam"):
        config = TrainConfig(epochs=3, lr=0.05, batch_size=6, optimizer=optimizer, seed=4)
        theta0 = problem.theta.clone()
        reference = train(problem, config, theta0=theta0).theta
        problem.set_theta(theta0)
        stacked = train_on_subsets(problem, config, torch.ones(2, 20, dtype=torch.bool), theta0.repeat(2, 1), [4, 4])
        torch.testing.assert_close(stacked[0], reference, rtol=0, atol=1e-12)
        torch.testing.assert_close(stacked[1], reference, rtol=0, atol=1e-12)
        assert not torch.allclose(reference, theta0)


USER_MODEL = '''
from torch import nn


def make_model():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
'''


def _user_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 3, generator=g)
    x, xt = torch.randn(120, 6, generator=g), torch.randn(10, 6, generator=g)
    (tmp_path / "net.py").write_text(USER_MODEL)
    torch.save({"x_train": x, "y_train": (x @ teacher).argmax(1), "x_test": xt, "y_test": (xt @ teacher).argmax(1)},
               tmp_path / "data.pt")
    return ["evaluate", "--model", f"{tmp_path / 'net.py'}:make_model", "--data", str(tmp_path / "data.pt")]


def test_evaluate_on_your_own_model_and_data(tmp_path):
    """--model file.py:fn --data data.pt with the training recipe as flags: the same job, the
    user's network retrained on every subset, every solver at every damping."""
    args = _user_files(tmp_path) + ["--epochs", "30", "--lr", "0.2", "--batch-size", "32", "--subsets", "6",
                                    "--solvers", "direct,identity", "--damping", "1e-2,auto", "--no-pbrf",
                                    "--out", str(tmp_path / "run")]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    arguments = json.loads((tmp_path / "run" / "arguments.json").read_text())
    assert arguments["setting"] == f"{tmp_path / 'net.py'}:make_model on data.pt (120 train, 10 test)"
    assert set(results["methods"]["direct"]) == {"0.01", "auto"}
    for label in ("0.01", "auto"):
        lds = results["methods"]["direct"][label]["1"]["lds_retraining"]["mean"]
        assert np.isfinite(lds) and lds > 0.2, (label, lds)  # influence predicts this model's retraining
    # the base model is the user's network, trained by the recipe given
    theta = torch.load(tmp_path / "run" / "base" / "0.pt")["theta"]
    assert theta.numel() == 6 * 8 + 8 + 8 * 3 + 3


@pytest.mark.parametrize("extra, words", [([], "--epochs and --lr"), (["--epochs", "2", "--lr", "0.1", "--dataset",
                                                                        "mnist"], "--dataset"),
                                          (["--epochs", "2", "--lr", "0.1", "--data", "/nonexistent.pt"],
                                           "does not exist")])
def test_evaluate_your_own_model_needs_its_data_and_recipe(tmp_path, capsys, extra, words):
    args = _user_files(tmp_path)
    if "--data" in extra:
        args = args[:-2]
    assert cli.main(args + extra + ["--out", str(tmp_path / "run")]) == 2
    assert words in capsys.readouterr().err
