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


def figure_scatter(path: Path, panels: list[tuple[str, list, str]]) -> Path:
    """Figure 1: one panel per (title, records, response), IF-predicted against actual change."""
    import numpy as np

    from ..report import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.1))
    for ax, (title, records, response) in zip(np.atleast_1d(axes), panels):
        predicted = np.array([r["predicted_test_loss_change"] for r in records]).ravel()
        actual = np.array([r["test_loss_change"][response] for r in records]).ravel()
        ax.scatter(actual, predicted, s=8)
        r = np.corrcoef(actual, predicted)[0, 1] if actual.std() > 0 and predicted.std() > 0 else float("nan")
        ax.set_title(f"{title}\n(pooled Pearson {r:.2f})", fontsize=9)
        ax.set_xlabel(f"actual change ({response.replace('_', ' ')})", fontsize=8)
        ax.locator_params(nbins=4)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("influence estimate")
    out = _save(fig, path)
    plt.close(fig)
    return out


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
        panels.append((title[row.name], records, response))
        lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: mean per-test-point Pearson {p:.2f} "
                     f"({response.replace('_', ' ')}; {measured['settings']}, `{measured['command']}`, "
                     f"{format_duration(measured['seconds'])}) — **{verdict}**.")
    text = "\n".join(lines) + "\n"
    if panels:
        path, rel = figure_path(figures, markdown, "figure1.png")
        figure_scatter(path, panels)
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
    figure_gap_bars(path, gaps)
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


