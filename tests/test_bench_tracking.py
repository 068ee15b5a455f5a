"""bench/track.py: the comparison against bench/baseline.json on synthetic ratio files,
and one end-to-end run of bench/track.sh in which a test-only slowdown
(PBRF_BENCH_SLOWDOWN, read by bench/track_suite.py) must be reported as a regression.

Nothing here depends on how fast this machine is: the synthetic files fix every
ratio, and the end-to-end slowdown is ~100x the benchmark's own time."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import track  # noqa: E402


def record(ratios, device="cpu", threads=1, **extra):
    return {"commit": "0123456789abcdef", "dirty": False, "branch": "test", "date": "2026-12-01T00:00:00",
            "device": device, "threads": threads, "compiled": True, "machine": "test box",
            "statistic": "min", "slowdown": {}, "ratios": ratios, "times_s": {},
            "pytest_benchmark_file": None, **extra}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def run_compare(tmp_path, capsys, current, baseline, *flags):
    """track's command line on a saved ratio file: (exit code, printed text)."""
    ratios = write(tmp_path / "run.json", current)
    base = tmp_path / "baseline.json"
    if baseline is not None:
        write(base, baseline)
    code = track.main(["--ratios", str(ratios), "--baseline", str(base), "--storage", str(tmp_path / "runs"),
                       "--no-plot", *flags])
    return code, capsys.readouterr().out


BASELINE = {"cpu": {"threads": 1, "ratios": {"gnh_product_mlp_m1": 4.0, "block_cg": 2.0}}}


def test_regression_beyond_threshold_fails_and_names_the_benchmark(tmp_path, capsys):
    drop = 4.0 * (1 - track.THRESHOLD) * 0.9  # 10% past the threshold
    code, out = run_compare(tmp_path, capsys, record({"gnh_product_mlp_m1": drop, "block_cg": 2.0}), BASELINE)
    assert code == 1
    regression_line = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert regression_line and "gnh_product_mlp_m1" in regression_line[0]
    assert "block_cg" not in regression_line[0]


def test_change_within_threshold_passes(tmp_path, capsys):
    near = 4.0 * (1 - track.THRESHOLD) * 1.05  # just inside the threshold
    code, out = run_compare(tmp_path, capsys, record({"gnh_product_mlp_m1": near, "block_cg": 2.6}), BASELINE)
    assert code == 0
    assert "REGRESSION" not in out
    assert "improved" in out  # block_cg: +30%, past the threshold upwards


def test_report_only_prints_the_regression_but_exits_zero(tmp_path, capsys):
    code, out = run_compare(tmp_path, capsys, record({"gnh_product_mlp_m1": 1.0, "block_cg": 2.0}), BASELINE,
                            "--report-only")
    assert code == 0
    assert "REGRESSION" in out and "gnh_product_mlp_m1" in out


def test_missing_baseline_entry_is_reported_not_failed(tmp_path, capsys):
    code, out = run_compare(tmp_path, capsys, record({"gnh_product_mlp_m1": 4.0, "lissa_native": 3.0}), BASELINE)
    assert code == 0
    assert "lissa_native: no baseline entry for 'cpu'" in out
    assert "not run" in out  # block_cg is in the baseline but not in this run


def test_missing_device_kind_or_file_is_reported_not_failed(tmp_path, capsys):
    current = record({"gnh_product_mlp_m1": 0.1}, device="cuda-nvidia-h200")
    code, out = run_compare(tmp_path, capsys, current, BASELINE)
    assert code == 0
    assert "no baseline for device kind 'cuda-nvidia-h200'" in out and "--accept" in out
    code, out = run_compare(tmp_path, capsys, current, None)  # no baseline file at all
    assert code == 0 and "no baseline for device kind" in out


def test_other_thread_count_is_not_compared(tmp_path, capsys):
    code, out = run_compare(tmp_path, capsys, record({"gnh_product_mlp_m1": 0.1}, threads=2), BASELINE)
    assert code == 0
    assert "1 thread(s), this run with 2" in out


def test_accept_records_the_run_under_its_device_kind(tmp_path, capsys):
    current = record({"gnh_product_mlp_m1": 1.0}, device="cuda-nvidia-h200")
    code, _ = run_compare(tmp_path, capsys, current, BASELINE, "--accept")
    assert code == 0
    saved = json.loads((tmp_path / "baseline.json").read_text())
    assert saved["cpu"] == BASELINE["cpu"]  # other device kinds are left alone
    assert saved["cuda-nvidia-h200"]["ratios"] == {"gnh_product_mlp_m1": 1.0}
    # Accepting a subset keeps the device's other benchmarks.
    code, _ = run_compare(tmp_path, capsys, record({"block_cg": 1.5}, commit="fedcba9876543210"), saved, "--accept")
    entry = json.loads((tmp_path / "baseline.json").read_text())["cpu"]
    assert entry["ratios"] == {"gnh_product_mlp_m1": 4.0, "block_cg": 1.5}
    assert entry["accepted_from"]["block_cg"].startswith("fedcba987654")


def test_accept_median_takes_each_ratio_over_the_saved_runs_of_the_newest_commit(tmp_path, capsys):
    folder = tmp_path / "runs" / "ratios"
    folder.mkdir(parents=True)
    ratios = [4.0, 6.0, 4.4, 4.2]  # the 6.0 run was sped up by a spell: the median ignores it
    for i, r in enumerate(ratios):
        write(folder / f"{i}.json", record({"gnh_product_mlp_m1": r}, date=f"2026-12-0{i + 2}T00:00:00"))
    write(folder / "old.json", record({"gnh_product_mlp_m1": 9.0}, commit="fedcba", date="2026-12-01T00:00:00"))
    write(folder / "slowed.json", record({"gnh_product_mlp_m1": 0.1}, slowdown={"gnh_product_mlp_m1": 0.05},
                                         date="2026-12-09T00:00:00"))
    base = tmp_path / "baseline.json"
    code = track.main(["--accept-median", "--baseline", str(base), "--storage", str(tmp_path / "runs")])
    assert code == 0, capsys.readouterr().out
    entry = json.loads(base.read_text())["cpu"]
    assert entry["ratios"] == {"gnh_product_mlp_m1": 4.3}
    assert entry["accepted_from"]["gnh_product_mlp_m1"].startswith("0123456789ab")
    assert "median of 4 runs" in entry["accepted_from"]["gnh_product_mlp_m1"]


def fake_run(ratios):
    """What track.run_suite returns for a run whose pairs have these ratios (fast side 1 ms)."""
    benchmarks = [{"extra_info": {"pair": name, "variant": variant, "repeat": 0, "device": "cpu", "threads": 1,
                                  "compiled": True, "slowdown_s": 0.0},
                   "stats": {"min": 1e-3 * (ratio if variant == "reference" else 1.0)}}
                  for name, ratio in ratios.items() for variant in ("fast", "reference")]
    results = {"commit_info": {"id": "0123456789abcdef", "dirty": False, "branch": "test"},
               "datetime": "2026-12-01T00:00:00", "machine_info": {"node": "box", "machine": "x86_64"},
               "benchmarks": benchmarks}
    return 0, results, None


def test_a_drop_that_does_not_repeat_is_not_a_regression(tmp_path, capsys, monkeypatch):
    runs = iter([fake_run({"gnh_product_mlp_m1": 1.0, "block_cg": 2.0}), fake_run({"gnh_product_mlp_m1": 4.1})])
    selections = []
    monkeypatch.setattr(track, "run_suite", lambda storage, select, quick: selections.append(select) or next(runs))
    base = write(tmp_path / "baseline.json", BASELINE)
    code = track.main(["--baseline", str(base), "--storage", str(tmp_path / "runs"), "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert selections == [None, "gnh_product_mlp_m1"]  # only the regressed benchmark is measured again
    assert "measuring again to confirm" in out and "REGRESSION" not in out


def test_history_plot_is_written(tmp_path):
    runs = [record({"gnh_product_mlp_m1": r, "block_cg": 2.0}, date=f"2026-12-0{i + 1}T00:00:00")
            for i, r in enumerate((4.0, 4.2, 3.9))]
    png = track.plot_history(runs, BASELINE["cpu"], track.THRESHOLD, tmp_path / "ratios.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_baseline_names_only_suite_benchmarks():
    baseline = json.loads(track.DEFAULT_BASELINE.read_text())
    suite_source = track.SUITE.read_text()
    for device, entry in baseline.items():
        for name in entry["ratios"]:
            assert f'"{name}":' in suite_source, f"{device}: {name} is not a benchmark of {track.SUITE.name}"


def test_slowdown_in_the_suite_is_caught_end_to_end(tmp_path):
    """A baseline from a quick run, then a quick run whose benchmark sleeps 50 ms per call
    (the call itself takes ~0.4 ms): track.sh must confirm it, exit 1 and name it."""
    def track_sh(*flags, slowdown=""):
        env = dict(os.environ, PBRF_BENCH_SLOWDOWN=slowdown)
        return subprocess.run(["bash", str(REPO / "bench" / "track.sh"), "--quick", "--storage", str(tmp_path),
                               "--baseline", str(tmp_path / "baseline.json"), "--no-plot", *flags],
                              env=env, capture_output=True, text=True, timeout=300)

    accepted = track_sh("--accept")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    baseline = json.loads((tmp_path / "baseline.json").read_text())
    assert [list(entry["ratios"]) for entry in baseline.values()] == [["gnh_product_mlp_m1"]]

    slowed = track_sh(slowdown="gnh_product_mlp_m1:0.05")
    assert slowed.returncode == 1, slowed.stdout + slowed.stderr
    regression_line = [line for line in slowed.stdout.splitlines() if line.startswith("REGRESSION")]
    assert regression_line and "gnh_product_mlp_m1" in regression_line[0], slowed.stdout
    assert "measuring again to confirm" in slowed.stdout
    # Every run (the baseline, the slowed one, its confirmation) is in pytest-benchmark's
    # own storage and in the ratio files.
    assert len(list((tmp_path / "pytest-benchmark").rglob("*.json"))) == 3
    records = [json.loads(p.read_text()) for p in (tmp_path / "ratios").glob("*.json")]
    assert sorted(bool(r["slowdown"]) for r in records) == [False, True, True]


@pytest.mark.parametrize("text", ["gnh_product_mlp_m1", "no_such_benchmark:0.1"])
def test_malformed_slowdown_is_refused(tmp_path, text):
    """The suite refuses a slowdown it cannot parse rather than silently measuring nothing."""
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                             "import track_suite", str(REPO / "bench")],
                            env=dict(os.environ, PBRF_BENCH_SLOWDOWN=text), capture_output=True, text=True)
    assert result.returncode != 0 and "PBRF_BENCH_SLOWDOWN" in result.stderr
