"""pbrf-fast reproduce: the registry of the paper's rows, running and resuming a row, the report,
and cold start with a fresh batch order."""
import json

import pytest
import torch

from pbrf_fast import cli
from pbrf_fast.paper import reproduce as rp
from pbrf_fast.paper.reproduce import paper_values, report, rows as registry, runner, verdicts
from pbrf_fast.paper.config import ExperimentConfig
from pbrf_fast.paper.responses import ResponseSettings, ResponseSolver
from pbrf_fast.paper.training import batch_order, train, TrainConfig

from factories import make_problem, rel_err

TARGETS = {"table2", "table4", "table5", "table6", "table7", "table8", "figure1", "figure4", "figure5", "figure6"}


def test_registry_covers_every_target_with_both_presets_and_a_paper_value():
    assert set(rp.TARGETS) == TARGETS
    rows = {r.id: r for r in rp.ROWS}
    assert len(rows) == len(rp.ROWS)                          # no row twice
    for row in rp.ROWS:
        assert row.paper, row.id
        if row.measure == "bars":                               # Figure 4 draws Table 5's runs
            assert set(row.sources) == {f"table5/{n}" for n in paper_values.TABLE5}
            continue
        quick, paper = row.job("quick"), row.job("paper")
        assert quick is not None and paper is not None, row.id
        assert dict(paper.config).get("removed") is None, row.id   # the paper preset's own 20 points
        ExperimentConfig(**dict(quick.config), preset="quick")   # both describe a valid experiment
        ExperimentConfig(**dict(paper.config), preset="paper")
    # Table 5 has all 16 rows of the paper, Tables 4/6/7/8 the four MLP data sets, Table 2 five MNIST models
    table5 = {r.name for r in rp.select_rows("table5")}
    assert table5 == set(paper_values.TABLE5) | {f"{n}-fresh-order" for n in registry.FRESH_ORDER_ROWS}
    assert len(paper_values.TABLE5) == 16 and len(rp.select_rows("table2")) == 5
    assert dict(rows["table5/concrete-fresh-order"].job("paper").config)["cold_start_order"] == "fresh"
    assert all(len(rp.select_rows(t)) == 4 for t in ("table4", "table6", "table7", "table8"))
    assert {r.name for r in rp.select_rows("figure5")} == {"width", "depth", "epochs", "weight_decay", "damping",
                                                         "fraction_removed"}
    for name, gaps in paper_values.TABLE5.items():
        assert set(gaps) == set(paper_values.GAP_NAMES), name
    assert paper_values.TABLE5["resnet20-cifar10"]["warm_start_gap"] == (5.827, 0.152)   # read from the paper
    assert paper_values.TABLE8["energy"]["two_stage"] == {"pearson": 0.92, "spearman": 0.75}
    # every row of `all` is in priority order and runnable; shared runs live in their first row's folder
    assert {r.id for r in rp.select_rows("all")} == set(rows)
    assert rp.job_folder("D", rows["table6/concrete"], "quick") == rp.job_folder("D", rows["table5/concrete"], "quick")
    assert rp.job_folder("D", rows["table8/energy"], "paper").as_posix() == "D/table4/energy"   # the Hessian run


def test_list_exits_0_and_names_every_row(capsys):
    assert cli.main(["reproduce", "all", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(row.id in listed for row in rp.ROWS)
    assert cli.main(["reproduce", "--list"]) == 0  # --list alone: every row
    assert capsys.readouterr().out == listed
    assert cli.main(["reproduce"]) == 2  # no target, no --list: a named error
    assert "give a target" in capsys.readouterr().err
    assert cli.main(["reproduce", "table5", "--row", "resnet20-cifar10", "--preset", "paper", "--list"]) == 0
    assert "cifar10 resnet20" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "table9"], "unknown target 'table9'"),
    (["reproduce", "table5", "--row", "lenet-svhn"], "table5 has no row 'lenet-svhn'"),
    (["reproduce", "all", "--row", "cancer"], "--row goes with one target"),
])
def test_bad_target_or_row_exits_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def one_thread():
    # the command sets torch's thread count; on a shared box one thread avoids waiting on the scheduler
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_row_runs_end_to_end_and_a_rerun_skips_or_resumes_it(tmp_path, capsys, one_thread):
    argv = ["reproduce", "table5", "--row", "cancer", "--out", str(tmp_path), "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    folder = tmp_path / "table5" / "cancer"
    marker = json.loads((folder / "row.json").read_text())
    first = json.loads((folder / "results.json").read_text())
    assert marker["row"] == "table5/cancer" and marker["seconds"] > 0 and not marker["resumed"]
    assert set(first["gaps"]) == set(paper_values.GAP_NAMES)
    capsys.readouterr()
    assert cli.main(argv) == 0                                  # finished: skipped, nothing rewritten
    assert "finished earlier" in capsys.readouterr().out
    assert json.loads((folder / "row.json").read_text()) == marker
    # a killed run (no row.json, one removed point missing) resumes and redoes only that point
    (folder / "row.json").unlink()
    points = sorted((folder / "points" / "removed").iterdir())
    kept = {p.name: p.stat().st_mtime_ns for p in points[1:]}
    points[0].unlink()
    assert cli.main(argv) == 0
    assert json.loads((folder / "row.json").read_text())["resumed"]
    assert {p.name: p.stat().st_mtime_ns for p in sorted((folder / "points" / "removed").iterdir())[1:]} == kept
    again = json.loads((folder / "results.json").read_text())
    for gap in paper_values.GAP_NAMES:
        assert again["gaps"][gap]["mean"] == pytest.approx(first["gaps"][gap]["mean"], rel=1e-6, abs=1e-12)
    # the report reads the row back: paper and ours side by side, the shared Figure 1 panel too
    md = rp.write_report(tmp_path, tmp_path / "R.md", tmp_path / "fig").read_text()
    assert "`cancer`" in md and "reproduces: every term ≈ 0" in md
    assert (tmp_path / "fig" / "figure1.png").exists() and (tmp_path / "fig" / "figure4.png").exists()


def _fake_decomposition(out, row, gaps, corr, seconds=120.0):
    """A finished row's folder as the runner leaves it, with chosen numbers."""
    folder = rp.job_folder(out, row, "quick")
    folder.mkdir(parents=True)
    records = [{"predicted_test_loss_change": [0.1 * k, -0.1 * k], "gaps": {},
                "test_loss_change": {r: [0.1 * k + 0.01 * (k % 3), 0.05 * k] for r in paper_values.TWO_STAGE + ("cold_start",)}}
               for k in range(6)]
    (folder / "results.json").write_text(json.dumps({"gaps": gaps, "correlations": corr, "records": records}))
    (folder / "arguments.json").write_text(json.dumps({"experiment": {
        "n_train": 930, "dim": 17793, "n_removed": 10, "train": {"epochs": 200},
        "responses": {"influence_options": {"depth": 1000, "repeats": 1, "batch_size": 128}}}}))
    (folder / "row.json").write_text(json.dumps({"job": row.job("quick").key("quick"), "seconds": seconds}))
    return folder


def test_report_from_a_fake_results_folder(tmp_path):
    rows = {r.id: r for r in rp.ROWS}
    gaps = {g: {"mean": m, "std": 0.001} for g, m in zip(paper_values.GAP_NAMES, (0.05, 0.002, 0.08, 0.0001, 0.0002))}
    corr = {"cold_start": {"pearson": 0.12, "spearman": 0.2}, "warm_start": {"pearson": 0.3, "spearman": 0.25},
            "pbrf": {"pearson": 0.97, "spearman": 0.93}, "two_stage": {"pearson": 0.55, "spearman": 0.5}}
    _fake_decomposition(tmp_path, rows["table5/concrete"], gaps, corr)
    bad = dict(gaps, linearization_error={"mean": 0.5, "std": 0.0})
    _fake_decomposition(tmp_path, rows["table4/energy"], bad, dict(corr, pbrf={"pearson": 0.4, "spearman": 0.3}))
    md_path = rp.write_report(tmp_path, tmp_path / "REPRODUCTION.md", tmp_path / "figures")
    md = md_path.read_text()
    # the paper's value and ours side by side, with the verdict
    assert "0.079 ± 0.008" in md and "0.050 ± 0.001" in md
    assert "reproduces the claim: terms 1–3 (0.132) dominate 4–5 (3.0e-04)" in md
    assert "differs: terms 4–5" in md                                            # the fake Hessian Energy row
    assert "reproduces: IF vs PBRF high (0.97), vs retraining low (cold 0.12, warm 0.30)" in md   # Table 6
    assert "differs: IF vs PBRF 0.40" in md                                     # Table 7 Energy
    assert "differs: warm 0.30, two-stage 0.55, PBRF 0.40" in md                 # Table 8 Energy
    # Table 8 Concrete: no Hessian run, but the GNH run (Table 5/6's) measured two-stage LOO too
    assert "| ours, GNH run (table6) | 0.55 / 0.50 | 0.30 / 0.25 | 0.97 / 0.93 | 2 min | reproduces: warm 0.30 ≤ two-stage 0.55 ≤ PBRF 0.97 |" in md
    # shared runs feed the other tables; the rest say how to run them, none blank
    assert md.count("(the run of table5/concrete)") >= 1
    for row in rp.ROWS:
        if row.measure in ("gaps", "correlations", "two_stage"):
            assert f"`{row.name}`" in md
    assert "not run here: `pbrf-fast reproduce table5 --row resnet20-cifar10 --preset quick`" in md
    assert "paper preset not run here: `pbrf-fast reproduce table5 --row concrete --preset paper`, expected ~" in md
    assert "![Figure 1, ours](figures/figure1.png)" in md and (tmp_path / "figures" / "figure4.png").exists()
    # the summary counts each table's verdicts
    assert "| table5 | 1 | 0 | 0 | 0 | 0 | 17 |" in md and "| table4 | 0 | 0 | 1 | 0 | 0 | 3 |" in md
    assert "| table8 | 0 | 0 | 1 | 0 | 0 | 3 |" in md and "| figure1 | 2 | 0 | 0 | 0 | 0 | 1 |" in md
    # the paper preset's time: the quick run's seconds per unit of work times the paper's work
    row = rows["table5/concrete"]
    expected = rp.expected_paper_seconds(row, rp.job_folder(tmp_path, row, "quick"), 120.0)
    # same n and network: base + 5K epochs per removed point, and 3 passes per LiSSA example, step and point
    quick = 930 * 200 * 51 + 3 * 10 * 1000 * 128
    paper = 930 * 1000 * 101 + 3 * 20 * 25000 * 128
    assert expected == pytest.approx(120.0 * paper / quick)


def test_a_failed_row_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    calls = []

    def execute(job, folder, preset, data_dir, progress, device="cpu"):
        calls.append(folder.name)
        if folder.name == "cancer":
            raise FloatingPointError("diverged")
        (folder / "results.json").write_text("{}")

    monkeypatch.setattr(runner, "_execute", execute)
    rows = rp.select_rows("table5")[:2]
    markers, failures = rp.run_rows(rows, tmp_path, log=lambda *_: None, keep_going=True)
    assert calls == ["cancer", "diabetes"] and failures == ["table5/cancer"] and len(markers) == 1
    assert "diverged" in (tmp_path / "table5" / "cancer" / "failed.json").read_text()
    assert "failed here (FloatingPointError: diverged)" in verdicts.not_run_note(rows[0], tmp_path, "quick")


def _trained():
    problem = make_problem("mse", 0.01, n=24, hidden=(6,))
    return problem, train(problem, TrainConfig(epochs=4, lr=0.05, batch_size=8, optimizer="momentum", seed=3))


def test_cold_start_with_a_fresh_batch_order():
    problem, base = _trained()
    replay = ResponseSolver(problem, base, ResponseSettings(epsilon=0.0, response_epochs=0))
    fresh = ResponseSolver(problem, base, ResponseSettings(epsilon=0.0, response_epochs=0, cold_start_order="fresh"))
    # the replayed order is the base run's; the fresh one is another permutation in every epoch
    assert replay.cold_start_config() == base.config
    config = fresh.cold_start_config()
    assert dataclasses_without_seed(config) == dataclasses_without_seed(base.config) and config.seed != base.config.seed
    for epoch in range(base.config.epochs):
        assert not torch.equal(batch_order(problem.n, config.seed, epoch), batch_order(problem.n, base.config.seed, epoch))
    # removing nothing: replaying the base run gives theta^s back exactly, a fresh order does not
    assert rel_err(replay.cold_start([0])[0], base.theta) < 1e-12
    assert rel_err(fresh.cold_start([0])[0], base.theta) > 1e-4
    # and the fresh run is itself the training run with that order (same start, same steps)
    again = train(problem, config, theta0=base.theta0).theta
    problem.set_theta(base.theta)
    assert rel_err(fresh.cold_start([0])[0], again) < 1e-12
    with pytest.raises(ValueError, match="cold_start_order"):
        ResponseSolver(problem, base, ResponseSettings(cold_start_order="shuffled")).cold_start([0])


def dataclasses_without_seed(config):
    import dataclasses

    return dataclasses.replace(config, seed=0)


def test_the_fresh_order_flag_reaches_the_responses_through_the_config():
    from pbrf_fast.paper.jobs import build_experiment

    exp = build_experiment(ExperimentConfig(dataset="cancer", cold_start_order="fresh"))
    assert exp.responses.cold_start_order == "fresh"
    assert build_experiment(ExperimentConfig(dataset="cancer")).responses.cold_start_order == "replay"
    with pytest.raises(ValueError, match="cold_start_order"):
        ExperimentConfig(cold_start_order="random")
    args = cli.build_parser().parse_args(["decompose", "--cold-start-order", "fresh"])
    assert cli._experiment_config(args).cold_start_order == "fresh"


@pytest.mark.parametrize("argv", [
    ["reproduce", "table5", "--row", "cancer"],
    ["decompose", "--dataset", "cancer"],
])
@pytest.mark.parametrize("device, message", [
    ("tpu:0", "--device must be"),
    ("not a device", "--device must be a torch device"),
    pytest.param("cuda", "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_device_exits_2_before_any_work(argv, device, message, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path), "--device", device, "--no-progress"]
                    if argv[0] == "reproduce" else argv + ["--out", str(tmp_path), "--device", device]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.rglob("base.pt"))


def test_the_device_option_moves_the_experiment_and_leaves_cpu_runs_as_they_were():
    from pbrf_fast.paper.experiments import to_device
    from pbrf_fast.paper.jobs import build_experiment, resolve_device

    config = ExperimentConfig(dataset="cancer")
    exp = build_experiment(config, device="cpu")
    assert to_device(exp, resolve_device("cpu")) is exp          # nothing copied on the CPU
    assert exp.problem.device == torch.device("cpu")


@pytest.mark.gpu
def test_a_row_on_cuda_matches_the_cpu_and_resumes_on_the_cpu(tmp_path, one_thread):
    # the same row on both devices: the same question, so the same gaps up to rounding
    args = ["reproduce", "table5", "--row", "cancer", "--no-progress", "--threads", "1"]
    assert cli.main(args + ["--out", str(tmp_path / "cpu")]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    cpu = json.loads((tmp_path / "cpu" / "table5" / "cancer" / "results.json").read_text())
    gpu = json.loads((tmp_path / "gpu" / "table5" / "cancer" / "results.json").read_text())
    for gap in paper_values.GAP_NAMES:
        assert gpu["gaps"][gap]["mean"] == pytest.approx(cpu["gaps"][gap]["mean"], rel=1e-4, abs=1e-10)
    assert json.loads((tmp_path / "gpu" / "table5" / "cancer" / "row.json").read_text())["device"] == "cuda"
    # base.pt is device-neutral: the GPU run's folder resumes on the CPU (a removed point redone there)
    folder = tmp_path / "gpu" / "table5" / "cancer"
    (folder / "row.json").unlink()
    sorted((folder / "points" / "removed").iterdir())[0].unlink()
    assert cli.main(args + ["--out", str(tmp_path / "gpu")]) == 0


def test_rows_subtracted_in_float32_with_a_small_spread_are_flagged_in_the_report():
    # spread between removed points of 1e-7 on a loss of 2.5: under one float32 rounding step (3e-7)
    records = [{"test_loss_change": {"pbrf": [1e-6 + 1e-7 * (k % 2), 2e-6]}} for k in range(4)]
    steps = verdicts.rounding_steps({"records": records, "base_objective": 2.5})
    assert steps == pytest.approx((0.5e-7 + 0) / 2 / (2.5 * 2.0 ** -23), rel=1e-9)   # mean over the 2 tests
    assert verdicts.rounding_steps({"records": records}) is None            # no base objective: no judgement
    row = rp.select_rows("table5", "cancer")[0]
    measured = {"settings": "s", "command": "c", "seconds": 1.0, "folder": "/nonexistent",
                "results": {"records": records, "base_objective": 2.5}}
    assert "rounding-limited" in report._detail(row, measured, "/nonexistent", "quick")
    assert "rounding-limited" not in report._detail(row, dict(measured, float64_losses=True), "/nonexistent", "quick")
