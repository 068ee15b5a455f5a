"""pbrf_fast.paper.reproduce.report, verdicts and costs: REPRODUCTION.md from a fake results folder
(verdicts, summary, figures, the paper preset's expected time), and rows flagged as rounding-limited."""
import json

import pytest

from pbrf_fast.paper import reproduce as rp
from pbrf_fast.paper.reproduce import paper_values, report, verdicts

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

