"""Performance tracking across commits: run the quick suite (bench/track_suite.py),
save the run, compare its ratios with bench/baseline.json, plot the history.

    bash bench/track.sh                  # run, save, compare; exit 1 names any regression
    bash bench/track.sh --accept         # ... and make this run the baseline of this device kind
    bash bench/track.sh --accept-median  # baseline = median of the saved runs --noise reports
    bash bench/track.sh --report-only    # compare, but exit 0 on a regression (CI)
    bash bench/track.sh --quick | -k EXPR   # a subset of the suite
    bash bench/track.sh --ratios FILE    # compare a saved ratio file, run nothing
    bash bench/track.sh --noise          # spread of each ratio over saved runs of one commit

Every benchmark is one ratio, reference time / library time, both measured in the
same run (higher is better). A ratio that fell by more than THRESHOLD from its
baseline is measured once more, and is a regression when it fell in both runs;
bench/RESULTS.md ("Tracking") says how THRESHOLD was chosen from this machine's
run-to-run noise.

Storage (gitignored, default bench/.runs/): pytest-benchmark's own autosaved runs
(commit id, machine info, every timing) under ``pytest-benchmark/``, one small JSON
of ratios per run under ``ratios/``, and the history plot ``ratios.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "track_suite.py"
DEFAULT_STORAGE = REPO / "bench" / ".runs"
DEFAULT_BASELINE = REPO / "bench" / "baseline.json"
# A ratio more than this fraction below its baseline, in the run and in its rerun, fails
# the check. On the 2-core box, in 16 runs one ratio fell 23% below its median, every other
# at most 13% (bench/RESULTS.md, "Tracking"); 25% clears that and still catches a library
# side 1.33x slower.
THRESHOLD = 0.25
# Which pytest-benchmark statistic of each side enters the ratio (see RESULTS.md).
STATISTIC = "min"
# --quick: the smallest useful subset (the end-to-end test runs it).
QUICK = ("gnh_product_mlp_m1",)


# ------------------------------------------------------------------------------ running
def _pytest_command() -> list[str]:
    """pytest without the current directory on sys.path: it runs from the repository
    (pytest-benchmark reads the commit from there), whose source tree holds no compiled
    module; the installed package is the one to measure."""
    script = shutil.which("pytest", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-P", "-m", "pytest"]


def run_suite(storage: Path, select: str | None, quick: bool) -> tuple[int, dict | None, Path | None]:
    """Run the suite once with autosave; (pytest's exit code, its JSON, the autosaved file)."""
    bench_dir = storage / "pytest-benchmark"
    bench_dir.mkdir(parents=True, exist_ok=True)
    before = set(bench_dir.rglob("*.json"))
    selection = select or (" or ".join(QUICK) if quick else None)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "run.json"
        command = [*_pytest_command(), str(SUITE), "--benchmark-only", "-q", "-p", "no:cacheprovider",
                   "--benchmark-autosave", f"--benchmark-storage=file://{bench_dir}",
                   f"--benchmark-json={result_path}", "--benchmark-columns=min,median,rounds",
                   *(["-k", selection] if selection else [])]
        # --quick measures each side once instead of alternating repeats (the suite's default).
        env = dict(os.environ, PBRF_BENCH_REPEATS=os.environ.get("PBRF_BENCH_REPEATS") or "1") if quick else None
        code = subprocess.call(command, cwd=REPO, env=env)
        results = json.loads(result_path.read_text()) if result_path.exists() else None
    saved = sorted(set(bench_dir.rglob("*.json")) - before)
    return code, results, (saved[-1] if saved else None)


def ratios_from(results: dict, statistic: str = STATISTIC) -> tuple[dict, dict]:
    """{benchmark: reference / fast} for every pair with both sides, and each side's
    time: the best of its repeats (slow spells only ever add time)."""
    sides: dict[str, dict[str, float]] = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        side = sides.setdefault(info["pair"], {})
        side[info["variant"]] = min(side.get(info["variant"], float("inf")), bench["stats"][statistic])
    ratios = {name: t["reference"] / t["fast"] for name, t in sides.items() if {"fast", "reference"} <= set(t)}
    return ratios, sides


def run_record(results: dict, saved: Path | None) -> dict:
    """The small per-run summary kept next to pytest-benchmark's own file."""
    ratios, times = ratios_from(results)
    extra = [b["extra_info"] for b in results["benchmarks"]]
    machine = results["machine_info"]
    return {
        "commit": results["commit_info"]["id"],
        "dirty": results["commit_info"]["dirty"],
        "branch": results["commit_info"]["branch"],
        "date": results["datetime"],
        "device": extra[0]["device"],
        "threads": extra[0]["threads"],
        "compiled": all(e["compiled"] for e in extra),
        "machine": f"{machine['node']} {machine.get('cpu', {}).get('brand_raw', machine['machine'])}",
        "statistic": STATISTIC,
        # A run with a test-only slowdown is kept out of the history plot and --noise.
        "slowdown": {e["pair"]: e["slowdown_s"] for e in extra if e["slowdown_s"]},
        "ratios": ratios,
        "times_s": times,
        "pytest_benchmark_file": str(saved) if saved else None,
    }


def save_record(record: dict, storage: Path) -> Path:
    folder = storage / "ratios"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("-", "").split(".")[0]
    path = folder / f"{stamp}_{record['commit'][:12]}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_records(storage: Path, device: str | None = None) -> list[dict]:
    """Saved runs (of one device kind, if given), oldest first."""
    records = [json.loads(path.read_text()) for path in (storage / "ratios").glob("*.json")]
    return sorted((r for r in records if device in (None, r["device"])), key=lambda r: r["date"])


# --------------------------------------------------------------------------- comparing
def compare(record: dict, baseline: dict, threshold: float) -> tuple[list[tuple], list[str], list[str]]:
    """Rows (benchmark, now, baseline or None, change or None, verdict), the regressed
    benchmarks, and notes on what could not be compared and why."""
    device = record["device"]
    entry = baseline.get(device)
    notes = []
    if entry is None:
        notes.append(f"no baseline for device kind {device!r} in the baseline file: nothing compared; "
                     "`bash bench/track.sh --accept` records this run as its baseline")
        entry = {"ratios": {}}
    elif entry.get("threads") not in (None, record["threads"]):
        notes.append(f"the {device!r} baseline was measured with {entry['threads']} thread(s), this run "
                     f"with {record['threads']}: ratios not compared (set PBRF_BENCH_THREADS to match)")
        entry = {"ratios": {}}
    rows, regressed = [], []
    for name, now in sorted(record["ratios"].items()):
        base = entry["ratios"].get(name)
        if base is None:
            if entry["ratios"]:
                notes.append(f"{name}: no baseline entry for {device!r}; `--accept` adds it")
            rows.append((name, now, None, None, "no baseline"))
            continue
        change = now / base - 1.0
        if change < -threshold:
            verdict = "REGRESSED"
            regressed.append(name)
        elif change > threshold:
            verdict = "improved (--accept?)"
        else:
            verdict = "ok"
        rows.append((name, now, base, change, verdict))
    for name in sorted(set(entry["ratios"]) - set(record["ratios"])):
        rows.append((name, None, entry["ratios"][name], None, "not run"))
    return rows, regressed, notes


def format_table(rows: list[tuple], threshold: float) -> str:
    header = f"{'benchmark':<24} {'ratio now':>10} {'baseline':>10} {'change':>8}  verdict (fails below -{threshold:.0%})"
    lines = [header, "-" * len(header)]
    for name, now, base, change, verdict in rows:
        lines.append(f"{name:<24} {'-' if now is None else f'{now:.2f}x':>10} "
                     f"{'-' if base is None else f'{base:.2f}x':>10} "
                     f"{'-' if change is None else f'{change:+.0%}':>8}  {verdict}")
    return "\n".join(lines)


def accept(record: dict, baseline_path: Path) -> dict:
    """Make this run's ratios the baseline of its device kind. Benchmarks not run keep
    theirs, and ``accepted_from`` says which commit (and statistic) each ratio came from."""
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() else {}
    old = baseline.get(record["device"], {})
    same_threads = old.get("threads") == record["threads"]
    ratios = dict(old.get("ratios", {})) if same_threads else {}
    sources = dict(old.get("accepted_from", {})) if same_threads else {}
    for name, value in record["ratios"].items():
        ratios[name] = round(value, 4)
        sources[name] = f"{record['commit'][:12]} ({record['date'][:10]}), {record['statistic']}"
    baseline[record["device"]] = {"machine": record["machine"], "threads": record["threads"],
                                  "ratios": dict(sorted(ratios.items())),
                                  "accepted_from": dict(sorted(sources.items()))}
    baseline_path.write_text(json.dumps(dict(sorted(baseline.items())), indent=1) + "\n")
    return baseline


def confirm(record: dict, regressed: list[str], baseline: dict, args, storage: Path):
    """Measure the regressed benchmarks once more and keep each one's better ratio: a
    spell of load on this shared machine slows one run, a real regression every run."""
    print(f"\nbeyond the threshold: {', '.join(regressed)}; measuring again to confirm")
    code, results, saved = run_suite(storage, " or ".join(regressed), args.quick)
    if code != 0 or not results:
        print(f"track: the confirming run failed (pytest exit {code}); keeping the first run's ratios")
    else:
        again = run_record(results, saved)
        save_record(again, storage)
        record = dict(record, ratios=dict(record["ratios"]))
        for name, ratio in again["ratios"].items():
            record["ratios"][name] = max(record["ratios"][name], ratio)
    rows, regressed, notes = compare(record, baseline, args.threshold)
    return record, rows, regressed, notes + ["ratios beyond the threshold were measured twice; "
                                             "the table shows the better of the two runs"]


# ------------------------------------------------------------------------------ history
def _plotting():
    """pbrf_fast's shared figure style, loaded from this source tree by its path: the
    pbrf_fast this script imports is the installed one, which may predate the module
    (plotting.py imports nothing from the package, so it loads on its own)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pbrf_fast_plotting", REPO / "pbrf_fast" / "paper" / "plotting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plot_history(records: list[dict], entry: dict | None, threshold: float, path: Path) -> Path:
    """One panel per benchmark: its ratio over the saved runs, with baseline and fail line."""
    plotting = _plotting()
    names = sorted({name for r in records for name in r["ratios"]})
    cols = 2 if len(names) > 1 else 1
    rows = max(1, -(-len(names) // cols))
    labels = [r["commit"][:7] + ("+" if r["dirty"] else "") for r in records]
    with plotting.styled() as plt:
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 1.0 + 2.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            points = [(i, r["ratios"][name]) for i, r in enumerate(records) if name in r["ratios"]]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=plotting.COLOURS[0], marker="o",
                    label="this run and the saved ones")
            base = (entry or {}).get("ratios", {}).get(name)
            if base is not None:
                ax.axhline(base, color=plotting.REFERENCE, ls="--", lw=0.8, label="baseline")
                ax.axhline(base * (1 - threshold), color=plotting.COLOURS[3], ls=":", lw=1.0,
                           label=f"fail line: baseline -{threshold:.0%}")
            ax.set_title(name)
            ax.set_ylabel("speed-up (x)")
            # a commit per tick would run together past a dozen runs: label every n-th one
            step = max(1, -(-len(records) // 12))
            ax.set_xticks(range(0, len(records), step))
            ax.set_xticklabels(labels[::step], rotation=90, fontsize=6)
            ax.set_ylim(bottom=0)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        handles, texts = axes.flat[0].get_legend_handles_labels()
        if handles:
            plotting.legend_below(fig, ncols=len(handles), handles=handles, labels=texts)
        device = records[-1]["device"] if records else "no runs"
        fig.suptitle(f"Tracked speed-ups on {device}: reference time / library time, per saved run "
                     "(x axis: commit, + for uncommitted changes)")
        return plotting.save(fig, path)


def comparable_runs(storage: Path) -> list[dict]:
    """The saved runs comparable with the newest one (same device kind, commit, tree
    state and threads), oldest first; runs with a test-only slowdown left out."""
    records = [r for r in load_records(storage) if not r["slowdown"]]
    keys = ("device", "commit", "dirty", "threads")
    return [r for r in records if all(r[key] == records[-1][key] for key in keys)] if records else []


def median_record(runs: list[dict]) -> dict:
    """The newest run with each ratio replaced by its median over ``runs``: a baseline
    that a single run slowed or sped up by a spell of load cannot pull."""
    names = sorted({name for r in runs for name in r["ratios"]})
    ratios = {name: statistics.median(r["ratios"][name] for r in runs if name in r["ratios"]) for name in names}
    return dict(runs[-1], ratios=ratios, statistic=f"{runs[-1]['statistic']}, median of {len(runs)} runs")


def noise_report(records: list[dict]) -> str:
    """Spread of each ratio over the given runs: what THRESHOLD has to stay above."""
    lines = [f"{'benchmark':<24} {'runs':>4} {'min':>7} {'median':>7} {'max':>7} {'cv':>6} {'max drop':>9}"]
    for name in sorted({n for r in records for n in r["ratios"]}):
        values = [r["ratios"][name] for r in records if name in r["ratios"]]
        cv = statistics.pstdev(values) / statistics.mean(values)
        # The worst a run can fall below another: a baseline from the best run, a check on the worst.
        drop = 1 - min(values) / max(values)
        lines.append(f"{name:<24} {len(values):>4} {min(values):>7.2f} {statistics.median(values):>7.2f} "
                     f"{max(values):>7.2f} {cv:>6.1%} {drop:>9.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/track.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accept", action="store_true", help="make this run the baseline of its device kind")
    parser.add_argument("--accept-median", action="store_true",
                        help="run nothing; set the baseline to each ratio's median over the saved runs "
                             "that --noise reports (at least 3)")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even when a ratio regressed")
    parser.add_argument("--quick", action="store_true", help=f"run only {', '.join(QUICK)}, briefly")
    parser.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--ratios", type=Path, help="compare this saved ratio file instead of running")
    parser.add_argument("--noise", action="store_true",
                        help="print each ratio's spread over the saved runs of the newest run's commit and tree state")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="allowed fractional drop")
    parser.add_argument("--storage", type=Path, default=DEFAULT_STORAGE)
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument("--no-plot", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    storage = args.storage.resolve()
    if args.noise or args.accept_median:
        runs = comparable_runs(storage)
        if not runs:
            print(f"track: no saved runs in {storage / 'ratios'}")
            return 2
        newest = runs[-1]
        print(f"{len(runs)} saved runs of {newest['commit'][:12]}{'+changes' if newest['dirty'] else ''} on "
              f"{newest['device']} ({newest['threads']} thread(s)), statistic {newest['statistic']}")
        print(noise_report(runs))
        if args.accept_median:
            if len(runs) < 3:
                print("track: --accept-median needs at least 3 comparable saved runs; run bash bench/track.sh again")
                return 2
            accept(median_record(runs), args.baseline)
            print(f"baseline for {newest['device']!r} set to the median of {len(runs)} runs in {args.baseline}")
        return 0
    if args.ratios:
        record = json.loads(args.ratios.read_text())
    else:
        code, results, saved = run_suite(storage, args.select, args.quick)
        if code == 5:
            print(f"track: no benchmark selected (-k {args.select!r}); benchmarks are the keys of PAIRS in {SUITE}")
            return 2
        if code != 0 or not results or not results["benchmarks"]:
            print(f"track: the suite failed (pytest exit {code}); nothing compared")
            return 2
        record = run_record(results, saved)
        path = save_record(record, storage)
        print(f"\nrun saved: {path}" + (f" (pytest-benchmark: {saved})" if saved else ""))
    if not record["compiled"]:
        print(f"track: WARNING: no compiled {record['device']} backend in this run (pbrf_fast.backends()): "
              "the library side fell back to torch")
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else {}
    rows, regressed, notes = compare(record, baseline, args.threshold)
    if regressed and not args.ratios and not args.accept:
        record, rows, regressed, notes = confirm(record, regressed, baseline, args, storage)
    print(f"\ndevice {record['device']}, {record['threads']} thread(s), commit {record['commit'][:12]}"
          f"{' (uncommitted changes)' if record['dirty'] else ''}; ratio = reference / library "
          f"({record['statistic']} times), baseline {args.baseline}")
    print(format_table(rows, args.threshold))
    for note in notes:
        print("note:", note)
    if not args.no_plot:
        history = [r for r in load_records(storage, record["device"])
                   if not r["slowdown"] and r["threads"] == record["threads"]] or [record]
        png = plot_history(history, baseline.get(record["device"]), args.threshold, storage / "ratios.png")
        print(f"history plot: {png}")
    if args.accept:
        accept(record, args.baseline)
        print(f"baseline for {record['device']!r} updated in {args.baseline}")
        return 0
    if regressed:
        print(f"REGRESSION (ratio fell more than {args.threshold:.0%} below baseline): {', '.join(regressed)}")
        return 0 if args.report_only else 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
