"""pbrf_fast.paper.reproduce.runner: a row runs end to end, a rerun skips or resumes it, a failed
row is recorded and the next one runs, and a row on CUDA matches the CPU."""
import json

import pytest
import torch

from pbrf_fast import cli
from pbrf_fast.paper import reproduce as rp
from pbrf_fast.paper.reproduce import paper_values, runner, verdicts

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

