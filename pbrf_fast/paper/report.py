"""Tables and figures from per-point records: Markdown, CSV, JSON, PNG."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from . import plotting
from .decomposition import GAPS, correlation
from ..atomic_io import atomic_write_json, atomic_write_text

__all__ = ["gap_table", "correlation_table", "write_tables", "figure_gap_bars", "figure_scatter",
           "figure_detection", "figure_sweep", "markdown_table", "format_number"]

CORRELATED = ("cold_start", "warm_start", "pbrf", "two_stage")


def gap_table(records: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std over removed points of each of the five terms (Table 5 layout)."""
    out = {}
    for name, _, _ in GAPS:
        values = np.array([r["gaps"][name] for r in records if name in r["gaps"]])
        if len(values):
            out[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def correlation_table(records: list[dict], responses=CORRELATED) -> dict[str, dict[str, float]]:
    """IF-predicted vs actual test-loss change for each response (Tables 2, 6-8)."""
    predicted = torch.tensor([r["predicted_test_loss_change"] for r in records])
    out = {}
    for name in responses:
        if all(name in r["test_loss_change"] for r in records):
            actual = torch.tensor([r["test_loss_change"][name] for r in records])
            out[name] = correlation(predicted, actual)
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_number(x: float) -> str:
    """A table's number as the text beside it writes it: three decimals from 1e-3 up,
    scientific notation below (a gap of 1.1e-04 must not print as 0.0000), so 0.000 is
    only ever an exact zero."""
    if x != x:
        return "nan"
    # an exact zero keeps three decimals: the paper's values beside ours are rounded to them
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _gap_rows(name: str, gaps: dict) -> list[str]:
    return [name] + [f"{format_number(gaps[g]['mean'])} ± {format_number(gaps[g]['std'])}" if g in gaps else "-"
                     for g, _, _ in GAPS]


def _corr_rows(name: str, corr: dict) -> list[str]:
    row = [name]
    for response in CORRELATED:
        c = corr.get(response)
        row += [f"{c['pearson']:.2f}", f"{c['spearman']:.2f}"] if c else ["-", "-"]
    return row


def write_tables(out: Path, name: str, gaps: dict, corr: dict, payload: dict) -> str:
    """results.json (everything), table.csv and table.md; returns the Markdown."""
    gap_header = ["experiment", "warm-start", "proximity", "non-convergence", "linearization", "solver"]
    corr_header = ["experiment"] + [f"{r} {k}" for r in CORRELATED for k in ("P", "S")]
    md = ("**Decomposition** (mean ± std over removed points of the mean L2 output distance)\n\n"
          + markdown_table(gap_header, [_gap_rows(name, gaps)])
          + "\n**IF-predicted vs actual test-loss change** (Pearson P, Spearman S)\n\n"
          + markdown_table(corr_header, [_corr_rows(name, corr)]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["experiment", "quantity", "mean", "std"])
    for g, v in gaps.items():
        writer.writerow([name, g, v["mean"], v["std"]])
    for r, v in corr.items():
        writer.writerow([name, f"pearson_{r}", v["pearson"], v["pearson_std"]])
        writer.writerow([name, f"spearman_{r}", v["spearman"], v["spearman_std"]])
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", buffer.getvalue())
    atomic_write_json(out / "results.json", payload | {"gaps": gaps, "correlations": corr})
    return md


GAP_FLOOR = 1e-8  # a term at or below it is drawn at it: a log axis has no zero


def _gap_label(gap: str) -> str:
    return gap.replace("_", " ")


def figure_gap_bars(path: Path, gaps_by_experiment: dict[str, dict], title: str = "") -> Path:
    """Figure 4: the five terms per experiment as grouped bars (log scale); ``title``
    says which run(s). The legend sits below the axes, never over a bar."""
    names = list(gaps_by_experiment)
    with plotting.styled() as plt:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 0.9 * len(names)), 3.6))
        width = 0.8 / len(GAPS)
        for k, (gap, _, _) in enumerate(GAPS):
            values = [max(gaps_by_experiment[n].get(gap, {}).get("mean", 0.0), GAP_FLOOR) for n in names]
            ax.bar(np.arange(len(names)) + (k - (len(GAPS) - 1) / 2) * width, values, width, label=_gap_label(gap),
                   color=plotting.COLOURS[k])
        many = len(names) > 4  # long names side by side would run together: slant them
        ax.set_xticks(np.arange(len(names)), names, rotation=35 if many else 0, ha="right" if many else "center",
                      rotation_mode="anchor")
        ax.set_yscale("log")
        ax.set_ylim(bottom=GAP_FLOOR / 2)
        ax.grid(axis="x", visible=False)
        ax.set_ylabel(f"mean L2 output distance\n(log scale; <= {GAP_FLOOR:g} drawn at {GAP_FLOOR:g})")
        ax.set_title(title or "Five-term decomposition: influence vs leave-one-out retraining")
        plotting.legend_below(fig, ncols=min(len(GAPS), 3 if len(names) < 3 else 5))
        return plotting.save(fig, path)


def figure_scatter(path: Path, records: list[dict], title: str) -> Path:
    """Figure 1: IF-predicted against actual test-loss change, one panel per response,
    each with the y = x line and the mean per-test-point Pearson that table.md reports."""
    predicted = np.array([r["predicted_test_loss_change"] for r in records]).ravel()
    corr = correlation_table(records)
    panels = [name for name in CORRELATED if name in corr]
    with plotting.styled() as plt:
        fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.1 * max(len(panels), 1), 3.3), squeeze=False)
        for ax, name in zip(axes[0], panels):
            actual = np.array([r["test_loss_change"][name] for r in records]).ravel()
            plotting.estimate_vs_truth(ax, actual, predicted, title=_gap_label(name), xlabel="actual change",
                                       ylabel="influence estimate",
                                       correlation=corr[name]["pearson"], correlation_name="Pearson")
        fig.suptitle(f"{title}: test-loss change after removing a training point, influence estimate vs "
                     f"retraining ({len(records)} removed points; Pearson: mean over test points)", wrap=True)
        return plotting.save(fig, path)


def figure_detection(path: Path, fractions, curves: dict[str, list[float]], title: str) -> Path:
    """Figure 6: share of corrupted labels found vs share of data inspected."""
    with plotting.styled() as plt:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for k, (name, curve) in enumerate(curves.items()):
            ax.plot(fractions, curve, label=name, **plotting.line_style(k))  # influence and PBRF often coincide
        ax.plot(fractions, fractions, color=plotting.REFERENCE, linestyle=":", linewidth=1, marker="",
                label="random order")
        ax.set_xlabel("fraction of training data inspected\n(highest self-influence first)")
        ax.set_ylabel("fraction of corrupted\nlabels found")
        ax.set_title(f"Mislabel detection, {title}")
        plotting.tidy_ticks(ax)
        plotting.legend_beside(ax)
        return plotting.save(fig, path)


def figure_sweep(path: Path, parameter: str, values: list, gaps_per_value: list[dict], title: str = "") -> Path:
    """Figure 5: each term against the swept parameter."""
    from matplotlib.ticker import NullLocator

    with plotting.styled() as plt:
        fig, ax = plt.subplots(figsize=(5.6, 3.4))
        for k, (gap, _, _) in enumerate(GAPS):
            ax.plot(values, [max(g.get(gap, {}).get("mean", 0.0), GAP_FLOOR) for g in gaps_per_value],
                    label=_gap_label(gap), **plotting.line_style(k))
        ax.set_xscale("log" if all(v > 0 for v in values) and max(values) / min(values) > 20 else "linear")
        ax.set_yscale("log")
        ax.set_xlabel(_gap_label(parameter))
        ax.set_ylabel("mean L2 output distance\n(log scale)")
        ax.set_title(title or f"Each term of the decomposition against {_gap_label(parameter)}")
        plotting.tidy_ticks(ax)
        if len(values) <= 6:  # a few swept values: tick exactly those
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.xaxis.set_minor_locator(NullLocator())
        plotting.legend_beside(ax)
        return plotting.save(fig, path)
