"""Tables and figures from per-point records: Markdown, CSV, JSON, PNG."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from .decomposition import GAPS, correlation
from ..atomic_io import atomic_write_json, atomic_write_text

__all__ = ["gap_table", "correlation_table", "write_tables", "figure_gap_bars", "figure_scatter",
           "figure_detection", "figure_sweep", "markdown_table"]

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


def _gap_rows(name: str, gaps: dict) -> list[str]:
    return [name] + [f"{gaps[g]['mean']:.4f} ± {gaps[g]['std']:.4f}" if g in gaps else "-" for g, _, _ in GAPS]


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def figure_gap_bars(path: Path, gaps_by_experiment: dict[str, dict]) -> Path:
    """Figure 4: the five terms per experiment as grouped bars (log scale)."""
    plt = _pyplot()
    names = list(gaps_by_experiment)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.2))
    width = 0.16
    for k, (gap, _, _) in enumerate(GAPS):
        values = [max(gaps_by_experiment[n].get(gap, {}).get("mean", 0.0), 1e-8) for n in names]
        ax.bar(np.arange(len(names)) + (k - 2) * width, values, width, label=gap.replace("_", " "))
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("mean output distance")
    ax.legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def figure_scatter(path: Path, records: list[dict], title: str) -> Path:
    """Figure 1: IF-predicted vs actual test-loss change, one panel per response."""
    plt = _pyplot()
    predicted = np.array([r["predicted_test_loss_change"] for r in records]).ravel()
    fig, axes = plt.subplots(1, len(CORRELATED), figsize=(3.2 * len(CORRELATED), 3.0))
    for ax, name in zip(axes, CORRELATED):
        if all(name in r["test_loss_change"] for r in records):
            actual = np.array([r["test_loss_change"][name] for r in records]).ravel()
            ax.scatter(actual, predicted, s=8)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("actual change")
    axes[0].set_ylabel("influence estimate")
    fig.suptitle(title)
    out = _save(fig, path)
    plt.close(fig)
    return out


def figure_detection(path: Path, fractions, curves: dict[str, list[float]], title: str) -> Path:
    """Figure 6: share of corrupted labels found vs share of data inspected."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 3.2))
    for name, curve in curves.items():
        ax.plot(fractions, curve, marker="o", ms=3, label=name)
    ax.plot(fractions, fractions, "k--", lw=1, label="random")
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of corrupted labels found")
    ax.set_title(title)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def figure_sweep(path: Path, parameter: str, values: list, gaps_per_value: list[dict]) -> Path:
    """Figure 5: each term against the swept parameter."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for gap, _, _ in GAPS:
        ax.plot(values, [max(g.get(gap, {}).get("mean", 0.0), 1e-8) for g in gaps_per_value], marker="o", ms=3,
                label=gap.replace("_", " "))
    ax.set_xscale("log" if all(v > 0 for v in values) and max(values) / min(values) > 20 else "linear")
    ax.set_yscale("log")
    ax.set_xlabel(parameter)
    ax.legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out
