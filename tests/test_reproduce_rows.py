"""pbrf_fast.paper.reproduce.rows and its command: the registry of the paper's rows (every target,
both presets, the paper's values), listing rows, and a bad target or row."""
import pytest

from pbrf_fast import cli
from pbrf_fast.paper import reproduce as rp
from pbrf_fast.paper.config import ExperimentConfig
from pbrf_fast.paper.reproduce import paper_values, rows as registry

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

