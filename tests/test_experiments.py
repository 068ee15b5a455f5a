"""The paper's findings on small presets, and the resumable experiment runs."""
import json

import numpy as np
import pytest
import torch

from pbrf_fast import cli
from pbrf_fast.paper.experiments import build
from pbrf_fast.paper.decomposition import GAPS
from pbrf_fast.paper.report import correlation_table, gap_table
from pbrf_fast.paper.runner import choose_removed_points, choose_test_points, run_points, train_base

from factories import shared_data_dir


def _records(exp, seed=0):
    base = train_base(exp, None, progress=False)
    removed = choose_removed_points(exp.problem.n, exp.n_removed, seed)
    return run_points(exp, base, removed, choose_test_points(len(exp.x_test), exp.n_test_points, seed), progress=False)


def test_logistic_regression_all_five_terms_vanish():
    exp = build("cancer")
    exp.n_removed = 6
    gaps = gap_table(_records(exp))
    assert all(v["mean"] < 1e-3 for v in gaps.values()), gaps


@pytest.fixture(scope="module")
def concrete_records():
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("Concrete data not found")
    exp = build("concrete", data_dir=data_dir, epochs=60)
    exp.n_removed, exp.n_test_points = 10, 10
    return _records(exp)


def test_concrete_mlp_gap_is_in_the_first_three_terms(concrete_records):
    gaps = {k: v["mean"] for k, v in gap_table(concrete_records).items()}
    first = gaps["warm_start_gap"] + gaps["proximity_gap"] + gaps["non_convergence_gap"]
    last = gaps["linearization_error"] + gaps["solver_error"]
    assert first >= 10 * last, gaps


def test_concrete_influence_matches_pbrf_not_retraining(concrete_records):
    corr = correlation_table(concrete_records)
    assert corr["pbrf"]["pearson"] >= 0.9, corr
    assert corr["cold_start"]["pearson"] <= corr["pbrf"]["pearson"] - 0.3, corr


def test_mislabelled_digits_are_found_by_self_influence(tmp_path):
    curves = cli.main(["mislabel", "--dataset", "digits", "--candidates", "200", "--chunk", "100",
                       "--out", str(tmp_path)]) or json.loads((tmp_path / "results.json").read_text())["curves"]
    at_20 = 4  # FRACTIONS[4] == 0.2
    assert curves["influence"][at_20] >= 0.5, curves
    assert curves["pbrf"][at_20] >= 0.5, curves
    assert (tmp_path / "mislabel.png").exists()


def test_decompose_cli_writes_everything_and_resumes_after_a_crash(tmp_path, monkeypatch, capsys):
    from pbrf_fast.paper.responses import ResponseSolver

    args = ["decompose", "--dataset", "cancer", "--removed", "4", "--test-points", "5", "--chunk", "1",
            "--out", str(tmp_path)]
    calls = {"n": 0}
    original = ResponseSolver.compute

    def crashing(self, name, removed):
        calls["n"] += 1
        if calls["n"] > 2 * 7:  # two chunks of seven responses finish, then the run dies
            raise KeyboardInterrupt("simulated crash")
        return original(self, name, removed)

    monkeypatch.setattr(ResponseSolver, "compute", crashing)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    finished = list((tmp_path / "points" / "removed").glob("*.json"))
    assert len(finished) == 2 and (tmp_path / "base.pt").exists()

    computed = []
    monkeypatch.setattr(ResponseSolver, "compute",
                        lambda self, name, removed: computed.append(tuple(removed)) or original(self, name, removed))
    assert cli.main(args) == 2  # a finished folder is not reused without --resume
    assert "--resume" in capsys.readouterr().err
    cli.main(args + ["--resume"])
    assert len({c for c in computed}) == 2  # only the two unfinished points were retrained
    for name in ("results.json", "table.csv", "table.md", "decomposition.png", "correlation.png"):
        assert (tmp_path / name).exists(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["records"]) == 4 and "warm_start_gap" in results["gaps"]
    assert cli.main(args[:-2] + ["--out", str(tmp_path), "--seed", "1", "--resume"]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_missing_data_file_names_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="concrete.csv"):
        build("concrete", data_dir=tmp_path)


def test_tables_show_small_numbers_as_the_text_writes_them():
    from pbrf_fast.paper.report import _gap_rows, format_number

    assert [format_number(x) for x in (1.1e-04, 0.0123, 1.8382, 0.0, float("nan"), -2.5e-7)] == \
        ["1.1e-04", "0.012", "1.838", "0.000", "nan", "-2.5e-07"]
    gaps = {g: {"mean": 1.1e-4, "std": 3e-5} for g, _, _ in GAPS}
    assert _gap_rows("LR / Cancer", gaps)[1] == "1.1e-04 ± 3.0e-05"  # not "0.0000 ± 0.0000"
