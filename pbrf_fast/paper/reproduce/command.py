"""The ``pbrf-fast reproduce`` command: list rows, run them, measure step costs, or write the report."""
from __future__ import annotations

from .costs import measure_step_costs
from .report import write_report
from .rows import ReproduceError, list_rows, select_rows
from .runner import run_rows

__all__ = ["reproduce"]


def reproduce(target: str, row: str | None, preset: str, out, data_dir: str | None = None,
              list_only: bool = False, markdown=None, figures=None, progress: bool = True, log=print,
              device: str = "cpu") -> int:
    """The ``pbrf-fast reproduce`` command: list, run or report."""
    if preset not in ("quick", "paper"):
        raise ReproduceError(f"--preset must be quick or paper, got {preset!r}")
    if target == "report":
        log(str(write_report(out, markdown, figures, preset)))
        return 0
    if target == "steps":
        costs = measure_step_costs(select_rows("all"), out)
        log("\n".join(f"{k:32s} {v['seconds_per_step']:.3f} s per {v['batch']}-example step" for k, v in costs.items()))
        return 0
    rows = select_rows(target, row)
    if not list_only:
        from ..jobs import resolve_device

        resolve_device(device)  # a bad --device fails before any row starts, not once per row
    if list_only:
        log(list_rows(rows, preset))
        return 0
    _, failures = run_rows(rows, out, preset, data_dir, progress=progress, log=log, keep_going=len(rows) > 1,
                           device=device)
    if target == "all":
        log(str(write_report(out, markdown, figures, preset)))
    if failures:
        log(f"{len(failures)} row(s) failed: {', '.join(failures)} (see failed.json in their folders)")
        return 1
    return 0
