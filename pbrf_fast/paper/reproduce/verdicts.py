"""Judging and printing one row: ours beside the paper's value, a verdict on the paper's
claim (not its digits), durations, and why a row has no result yet."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..report import format_number
from .costs import expected_paper_seconds, expected_seconds_from_step
from .paper_values import FIGURE5, GAP_NAMES
from .rows import Row, job_folder

__all__ = ["VERDICTS", "rounding_steps", "gap_verdict", "corr_verdict", "trend_verdict"]

# loss than this, and were subtracted in float32 (run before the float64 evaluation), are flagged.
ROUNDING_STEPS_FLAGGED = 100.0


def rounding_steps(results: dict) -> float | None:
    """How many float32 rounding steps of the test loss separate the removed points' PBRF test-loss
    changes (their std across removed points, mean over test points), or None without PBRF records."""
    records = results.get("records") or []
    if not records or "pbrf" not in records[0].get("test_loss_change", {}) or "base_objective" not in results:
        return None
    changes = np.asarray([r["test_loss_change"]["pbrf"] for r in records], dtype=np.float64)
    if len(changes) < 2:
        return None
    step = abs(results["base_objective"]) * 2.0 ** -23
    return float(changes.std(0).mean() / step) if step > 0 else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.0f} years"


def gap_verdict(gaps: dict, paper: dict) -> str:
    ours = {g: gaps[g]["mean"] for g in GAP_NAMES if g in gaps}
    first = sum(ours.get(g, 0.0) for g in GAP_NAMES[:3])
    last = sum(ours.get(g, 0.0) for g in GAP_NAMES[3:])
    if max(v[0] for v in paper.values()) == 0.0:
        return ("reproduces: every term ≈ 0" if max(ours.values()) < 1e-3
                else f"differs: largest term {max(ours.values()):.1e}, paper 0")
    if first >= 10 * last:
        return f"reproduces the claim: terms 1–3 ({format_number(first)}) dominate 4–5 ({format_number(last)})"
    if first > last:
        return f"partly: terms 1–3 ({format_number(first)}) exceed 4–5 ({format_number(last)}) by less than 10×"
    return f"differs: terms 4–5 ({format_number(last)}) are not below 1–3 ({format_number(first)})"


def corr_verdict(corr: dict, measure: str) -> str:
    pbrf = corr.get("pbrf", {}).get("pearson", float("nan"))
    if measure == "two_stage":
        two, warm = corr.get("two_stage", {}).get("pearson", float("nan")), corr["warm_start"]["pearson"]
        if pbrf >= two >= warm:
            return f"reproduces: warm {warm:.2f} ≤ two-stage {two:.2f} ≤ PBRF {pbrf:.2f}"
        return f"differs: warm {warm:.2f}, two-stage {two:.2f}, PBRF {pbrf:.2f} (paper: warm < two-stage < PBRF)"
    cold, warm = corr["cold_start"]["pearson"], corr["warm_start"]["pearson"]
    high, low = pbrf >= 0.8, max(cold, warm) < 0.6
    if high and low:
        return f"reproduces: IF vs PBRF high ({pbrf:.2f}), vs retraining low (cold {cold:.2f}, warm {warm:.2f})"
    if high:
        return f"partly: IF vs PBRF high ({pbrf:.2f}), but vs retraining high too (cold {cold:.2f}, warm {warm:.2f})"
    return f"differs: IF vs PBRF {pbrf:.2f} (paper ≥ 0.8)"


def format_pair(pair) -> str:
    return f"{format_number(pair[0])} ± {format_number(pair[1])}"


def ours_gaps(gaps: dict) -> list[str]:
    return [f"{format_number(gaps[g]['mean'])} ± {format_number(gaps[g]['std'])}" if g in gaps else "-" for g in GAP_NAMES]


def ours_corr(corr: dict, responses) -> list[str]:
    return [f"{corr[r]['pearson']:.2f} / {corr[r]['spearman']:.2f}" if r in corr else "-" for r in responses]


def not_run_note(row: Row, out, preset: str) -> str:
    command = f"`{row.job(preset).command(row.target, row.name, preset)}`"
    failed = job_folder(out, row, preset) / "failed.json"
    if failed.exists():
        return f"failed here ({json.loads(failed.read_text())['error']}): {command}"
    seconds = expected_seconds_from_step(row, out, preset)
    expected = f", expected ~{format_duration(seconds)} here (from the measured per-step cost)" if seconds else ""
    return f"not run here: {command}{expected}"


def paper_time_note(row: Row, measured: dict | None, out) -> str:
    if row.paper_job is None:
        return "-"
    if measured:
        seconds = expected_paper_seconds(row, Path(measured["folder"]), measured["seconds"])
        basis = "from the quick run's seconds per unit of work"
    else:
        seconds = expected_seconds_from_step(row, out, "paper")
        basis = "from the measured per-step cost"
    command = row.paper_job.command(row.target, row.name, "paper")
    if seconds is None:
        return f"paper preset not run here: `{command}`"
    return f"paper preset not run here: `{command}`, expected ~{format_duration(seconds)} on this box ({basis})"



def trend_verdict(parameter: str, values, tables: list[dict]) -> str:
    trends = FIGURE5[parameter][3]
    if not trends:
        spread = {g: (min(t[g]["mean"] for t in tables), max(t[g]["mean"] for t in tables)) for g in tables[0]}
        return "no trend claimed; ours: " + ", ".join(f"{g.replace('_', ' ')} {format_number(a)}–{format_number(b)}"
                                                      for g, (a, b) in spread.items())
    first, last = tables[0], tables[-1]
    checks = []
    for gap, direction in trends:
        if gap == "all":
            a, b = sum(v["mean"] for v in first.values()), sum(v["mean"] for v in last.values())
            name = "sum of the terms"
        else:
            a, b = first[gap]["mean"], last[gap]["mean"]
            name = gap.replace("_", " ")
        # a change within 10% is no trend (the quick sweeps remove 5 points; their noise is about that)
        ok = b < 0.9 * a if direction == "down" else b > 1.1 * a
        checks.append((ok, f"{name} {a:.3g} → {b:.3g}"))
    verdict = "reproduces" if all(ok for ok, _ in checks) else ("partly" if any(ok for ok, _ in checks) else "differs")
    return f"{verdict}: " + "; ".join(text for _, text in checks) + f" (from {values[0]:g} to {values[-1]:g})"


VERDICTS = ("reproduces", "partly", "differs", "no trend claimed", "failed here", "not run here")

