"""The report's figures: Figure 1's scatter panels and the sections of Figures 1, 4, 5
and 6 (ours beside the paper's claim, with the figure files they draw or copy)."""
from __future__ import annotations

import os
from pathlib import Path

from .paper_values import GAP_NAMES
from .rows import Row, select_rows
from .runner import collect
from .verdicts import format_duration, not_run_note, paper_time_note, trend_verdict

__all__ = ["figure1_section", "figure4_section", "figure5_section", "figure6_section"]


def figure_scatter(path: Path, panels: list[tuple[str, list, str, float]], title: str) -> Path:
    """Figure 1: one panel per (title, records, response, Pearson), IF-predicted against actual
    change, with the y = x line and the mean per-test-point Pearson the text beside it cites."""
    import numpy as np

    from .. import plotting

    with plotting.styled() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), squeeze=False)
        for ax, (name, records, response, pearson) in zip(axes[0], panels):
            predicted = np.array([r["predicted_test_loss_change"] for r in records]).ravel()
            actual = np.array([r["test_loss_change"][response] for r in records]).ravel()
            plotting.estimate_vs_truth(ax, actual, predicted, title=name, correlation=pearson,
                                       correlation_name="Pearson",
                                       xlabel=f"actual test-loss change ({response.replace('_', ' ')})",
                                       ylabel="influence estimate")  # each panel its own run
        fig.suptitle(title, wrap=True)
        return plotting.save(fig, path)


def figure_path(figures: Path, markdown: Path, name: str) -> tuple[Path, str]:
    path = figures / name
    return path, os.path.relpath(path, markdown.parent)


def figure1_section(rows, out, preset, figures, markdown) -> str:
    panels, lines = [], []
    for row in rows:
        measured = collect(row, out, preset)
        if measured is None:
            lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: {not_run_note(row, out, preset)}.")
            continue
        records, corr = measured["results"]["records"], measured["results"]["correlations"]
        response = "pbrf" if row.name == "pbrf" else "cold_start"
        p = corr[response]["pearson"]
        if row.name == "lr":
            verdict = "reproduces" if p >= 0.9 else "differs"
        elif row.name == "mlp":
            verdict = "reproduces" if p < 0.6 else "differs"
        else:
            verdict = "reproduces" if p >= 0.8 else "differs"
        title = {"lr": "LR / Cancer vs LOO", "mlp": "MLP / Concrete vs LOO", "pbrf": "MLP / Concrete vs PBRF"}
        panels.append((title[row.name], records, response, p))
        lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: mean per-test-point Pearson {p:.2f} "
                     f"({response.replace('_', ' ')}; {measured['settings']}, `{measured['command']}`, "
                     f"{format_duration(measured['seconds'])}) — **{verdict}**.")
    text = "\n".join(lines) + "\n"
    if panels:
        path, rel = figure_path(figures, markdown, "figure1.png")
        figure_scatter(path, panels, f"Figure 1, ours ({preset} preset): influence estimate vs actual change "
                                     "after removing each point; Pearson: mean over test points")
        text = f"![Figure 1, ours]({rel})\n\n" + text
    return text


def figure4_section(row: Row, out, preset, figures, markdown) -> str:
    from ..report import figure_gap_bars

    gaps, dominated = {}, []
    for source in row.sources:
        target, name = source.split("/")
        src = select_rows(target, name)[0]
        measured = collect(src, out, preset)
        if measured is not None:
            g = measured["results"]["gaps"]
            gaps[name] = g
            first = sum(g[k]["mean"] for k in GAP_NAMES[:3])
            last = sum(g[k]["mean"] for k in GAP_NAMES[3:])
            dominated.append(first >= 10 * last or max(v["mean"] for v in g.values()) < 1e-3)
    if not gaps:
        return f"Paper: {row.paper}. Ours: none of Table 5's rows has run yet.\n"
    path, rel = figure_path(figures, markdown, "figure4.png")
    figure_gap_bars(path, gaps, title=f"Figure 4, ours ({preset} preset): the five terms of Table 5's "
                                      f"{len(gaps)} finished rows")
    return (f"![Figure 4, ours]({rel})\n\nPaper: {row.paper}. Ours: Table 5's {len(gaps)} finished rows "
            f"(of {len(row.sources)}); terms 1–3 dominate (≥ 10×, or every term ≈ 0) in {sum(dominated)} of them "
            f"— the rows above say which.\n")


def figure5_section(rows, out, preset, figures, markdown) -> str:
    import shutil

    lines = []
    for row in rows:
        measured = collect(row, out, preset)
        if measured is None:
            lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: {not_run_note(row, out, preset)}; "
                         f"{paper_time_note(row, None, out)}.")
            continue
        res = measured["results"]
        path, rel = figure_path(figures, markdown, f"figure5-{row.name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(measured["folder"]) / "sweep.png", path)
        lines.append(f"- **{row.name}** — paper: {row.paper}. Ours ({measured['settings']}, `{measured['command']}`, "
                     f"{format_duration(measured['seconds'])}): {trend_verdict(row.name, res['values'], res['gaps'])}. "
                     f"{paper_time_note(row, measured, out)}. ![{row.name}]({rel})")
    return "\n".join(lines) + "\n"


def figure6_section(rows, out, preset, figures, markdown) -> str:
    import shutil

    lines = []
    for row in rows:
        measured = collect(row, out, preset)
        if measured is None:
            lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: {not_run_note(row, out, preset)}.")
            continue
        res = measured["results"]
        at = res["fractions"].index(0.2)
        found = {k: res["curves"][k][at] for k in ("influence", "pbrf")}
        verdict = "reproduces" if min(found.values()) > 0.2 else "differs"
        path, rel = figure_path(figures, markdown, f"figure6-{row.name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(measured["folder"]) / "mislabel.png", path)
        lines.append(f"![Figure 6, ours]({rel})\n\n- **{row.name}** — paper: {row.paper}. Ours "
                     f"({measured['settings']}, {len(res['candidates'])} points scored, "
                     f"`{measured['command']}`, {format_duration(measured['seconds'])}): inspecting the top 20% by "
                     f"self-influence finds {100 * found['influence']:.1f}% (IF) and {100 * found['pbrf']:.1f}% "
                     f"(PBRF) of the corrupted labels, against 20% at random — **{verdict}**. "
                     f"{paper_time_note(row, measured, out)}.")
    return "\n".join(lines) + "\n"


