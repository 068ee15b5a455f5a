"""Running rows: each row's job into its folder through the existing harness jobs
(decomposition, mislabel detection, sweeps), resuming from what the folder holds, a
``row.json`` marker for a finished row, ``failed.json`` for one that raised; and reading
a finished row's results back (:func:`collect`)."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from ...atomic_io import atomic_write_json
from ..config import RunOptions, SweepConfig
from .rows import Job, ReproduceError, Row, job_folder

__all__ = ["run_rows", "collect"]


def _execute(job: Job, folder: Path, preset: str, data_dir: str | None, progress: bool, device: str = "cpu") -> None:
    config = job.experiment_config(preset, data_dir)
    run = RunOptions(folder, resume=True, overwrite=False, progress=progress, device=device)
    if job.kind == "decompose":
        from ..jobs import build_experiment, run_decomposition

        run_decomposition(config, run, exp=build_experiment(config, device=device, **dict(job.overrides)),
                          quiet=not progress)
    elif job.kind == "mislabel":
        from ..mislabel import run_mislabel

        run_mislabel(config, run)
    elif job.kind == "sweep":
        from ..sweep import run_sweep

        run_sweep(config, SweepConfig(job.sweep[0], tuple(job.sweep[1])), run)
    else:
        raise ReproduceError(f"unknown job kind {job.kind!r}")


def _finished(folder: Path, key: str) -> dict | None:
    marker = folder / "row.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("job") == key:
            return done
    return None


def run_rows(rows: list[Row], out, preset: str = "quick", data_dir: str | None = None, progress: bool = True,
             log=print, keep_going: bool = False, device: str = "cpu") -> tuple[list[dict], list[str]]:
    """Run each row's job into ``out/<target>/<row>/`` unless it already finished.

    A killed row resumes from its results folder (finished removed points, the trained base network);
    a finished one leaves ``row.json`` and is skipped. With ``keep_going`` a row that raises is recorded
    in its ``failed.json`` and the next row runs. Returns the finished rows' markers and the failed rows.
    """
    markers, seen, failures = [], set(), []
    for row in rows:
        job = row.job(preset)
        if job is None:
            continue
        key = job.key(preset)
        folder = job_folder(out, row, preset)
        if key in seen:
            continue
        seen.add(key)
        done = _finished(folder, key)
        if done:
            log(f"{row.id}: finished earlier ({done['seconds']:.0f} s), skipped")
            markers.append(done)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        resumed = any(folder.iterdir())
        log(f"{row.id}: running {job.describe()} ({preset} preset) into {folder}")
        start = time.perf_counter()
        try:
            _execute(job, folder, preset, data_dir, progress, device)
        except Exception as exc:  # noqa: BLE001 - one failed row must not stop the others
            if not keep_going:
                raise
            atomic_write_json(folder / "failed.json", {"job": key, "error": f"{type(exc).__name__}: {exc}",
                                                       "seconds": time.perf_counter() - start})
            log(f"{row.id}: FAILED ({type(exc).__name__}: {exc}); going on with the next row")
            failures.append(row.id)
            continue
        seconds = time.perf_counter() - start
        (folder / "failed.json").unlink(missing_ok=True)
        marker = {"job": key, "row": row.id, "preset": preset, "seconds": seconds, "resumed": resumed,
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": job.command(row.target, row.name, preset), "settings": job.describe(),
                  "device": device, "test_loss_changes": "float64"}
        atomic_write_json(folder / "row.json", marker)
        log(f"{row.id}: done in {seconds:.0f} s")
        markers.append(marker)
    return markers, failures


def collect(row: Row, out, preset: str = "quick") -> dict | None:
    """What the row's run measured (None when it has not finished): the numbers its table needs,
    the run time, settings and command."""
    if row.measure == "bars":
        return None
    job = row.job(preset)
    folder = job_folder(out, row, preset)
    done = _finished(folder, job.key(preset))
    if done is None:
        return None
    results = json.loads((folder / "results.json").read_text())
    measured = {"seconds": done["seconds"], "resumed": done.get("resumed", False), "folder": str(folder),
                "settings": job.describe(), "command": job.command(row.target, row.name, preset), "results": results,
                "float64_losses": done.get("test_loss_changes") == "float64"}
    return measured


# Rows whose PBRF test-loss changes differ between removed points by fewer float32 rounding steps of the
