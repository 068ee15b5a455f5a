"""REPRODUCTION.md: every row of every target, the paper's value beside ours with a
verdict, a summary of the verdicts, and the figures (:mod:`.figures`)."""
from __future__ import annotations

from pathlib import Path

from ...atomic_io import atomic_write_text
from .figures import figure1_section, figure4_section, figure5_section, figure6_section
from .paper_values import GAP_LABELS, GAP_NAMES, TWO_STAGE
from .rows import ROWS, Row, owner, select_rows
from .runner import collect
from ..report import markdown_table
from .verdicts import (ROUNDING_STEPS_FLAGGED, VERDICTS, corr_verdict, format_duration, format_pair, gap_verdict,
                       not_run_note, ours_corr, ours_gaps, paper_time_note, rounding_steps)

__all__ = ["write_report"]


# ---------------------------------------------------------------------------------------------- report
HEADER = """# Does pbrf_fast reproduce the paper?

Every number-bearing table row and figure panel of Bae et al. (2022), *If Influence Functions are the
Answer, Then What is the Question?* (Tables 2, 4, 5, 6, 7, 8; Figures 1, 4, 5, 6), beside ours. This file
is written by `pbrf-fast reproduce report --out DIR --markdown REPRODUCTION.md --figures docs/reproduction`
from the results folders of `pbrf-fast reproduce all --preset quick --out DIR`; the paper's values are
stored in the registry (`pbrf_fast/paper/reproduce/paper_values.py`), so rerunning refreshes it.

- **One command per row**: `pbrf-fast reproduce <target> --row <row> [--preset quick|paper] --out DIR`
  (`--list` prints the rows and their settings). `pbrf-fast reproduce all --preset quick` runs every row in
  turn and resumes after a kill (a finished row is skipped; a killed one continues from its finished
  removed points).
- **Presets.** `quick` is each experiment's reduced setting (below, per row: data fraction, epochs,
  removed points; LiSSA's scale matched to the PBRF's truncation), sized for a 2-core CPU. `paper` is
  Appendix E.3's setting (1000 epochs for the MLPs, 200 for the CNNs, 20 removed points, LiSSA depth
  5000–10000 × 5 repeats). Its expected time here is the quick run's measured seconds per unit of work
  (example passes × parameters × tokens; passes = n·K·(1 + 5·removed points) for the base run, cold
  start (1.5K epochs), four 0.5K-epoch responses and the trained linearized PBRF, plus 3 per LiSSA
  example, step and removed point) times the paper preset's work, or for rows that did not run, the
  measured per-step cost (`pbrf-fast reproduce steps`) times the paper's passes — a linear extrapolation
  on this CPU, not a GPU figure. On a GPU machine add `--device cuda`: networks and data are built on the
  CPU, moved to the GPU, and every response, solve and measurement runs there (the test losses are
  always evaluated in float64, see Table 2's note); `base.pt` is saved device-neutral, so a row started on
  one device resumes on another.
- **Test-loss changes are evaluated in float64**, whatever the network's dtype. A removed point moves a
  barely trained float32 CNN's test losses by ~1e-6 and the differences between removed points (what the
  correlations compare) by ~1e-8, while one float32 rounding step of a loss near 2.5 is 2.4e-7: subtracting
  float32 losses measured rounding. VGG13 on CIFAR-10 went from IF-vs-PBRF Pearson 0.23 to 1.00 with the
  float64 evaluation, the same trained networks and responses otherwise. Rows run before it are flagged
  below where their spread is under 100 rounding steps.
- **Run times** were measured on the project's shared 2-core box while other jobs ran; treat them as
  upper bounds.
- **Verdicts** check the paper's claims, not its digits: quick settings train for fewer epochs on less
  data, so magnitudes differ. Gaps: terms 1–3 (warm-start, proximity, non-convergence) dominate terms
  4–5 (linearization, solver) when their sum is at least 10× larger. Correlations: IF vs PBRF "high" is
  Pearson ≥ 0.8, IF vs retraining "low" is Pearson < 0.6 for both cold and warm start.
- **Cold start** replays θ⁰ and the base run's batch order (Appendix E.2); `--cold-start-order fresh`
  (`decompose`, `correlate`, ...; `ExperimentConfig.cold_start_order`) draws a fresh order instead,
  so both readings of "retraining" are available.
"""


def _target_header(target: str) -> str:
    titles = {
        "table5": "Table 5 / Figure 4 — the five-term decomposition (mean ± std of the mean output L2 distance)",
        "table4": "Table 4 — the decomposition with the Hessian instead of the GNH",
        "table2": "Table 2 — IF vs retraining and PBRF on MNIST (Pearson / Spearman)",
        "table6": "Table 6 — IF (GNH) vs retraining and PBRF (Pearson / Spearman)",
        "table7": "Table 7 — IF (Hessian) vs retraining and PBRF (Pearson / Spearman)",
        "table8": "Table 8 — IF vs two-stage LOO, warm start and PBRF (Pearson / Spearman)",
        "figure1": "Figure 1 — IF-predicted vs actual test-loss change",
        "figure4": "Figure 4 — the decomposition as bars",
        "figure5": "Figure 5 — ablations (MLP on MNIST)",
        "figure6": "Figure 6 — mislabelled-example detection",
    }
    return f"\n## {titles[target]}\n\n"


def _gap_section(rows: list[Row], out, preset: str) -> str:
    header = ["row", "", *GAP_LABELS, "run time", "verdict"]
    table, details = [], []
    for row in rows:
        measured = collect(row, out, preset)
        table.append([f"`{row.name}`", "paper", *[format_pair(row.paper[g]) for g in GAP_NAMES], "", ""])
        if measured is None:
            table.append(["", "ours", *["-"] * 5, "-", not_run_note(row, out, preset)])
        else:
            gaps = measured["results"]["gaps"]
            table.append(["", "ours", *ours_gaps(gaps), format_duration(measured["seconds"]),
                          gap_verdict(gaps, row.paper)])
        details.append(_detail(row, measured, out, preset))
    return markdown_table(header, table) + "\n" + "\n".join(details) + "\n" + _notes(rows)


def _corr_section(rows: list[Row], out, preset: str) -> str:
    responses = TWO_STAGE if rows[0].measure == "two_stage" else ("cold_start", "warm_start", "pbrf")
    header = ["row", "", *[r.replace("_", " ") + " P / S" for r in responses], "run time", "verdict"]
    table, details = [], []
    for row in rows:
        measured = collect(row, out, preset)
        table.append([f"`{row.name}`", "paper", *[f"{row.paper[r]['pearson']:.2f} / {row.paper[r]['spearman']:.2f}"
                                                  for r in responses], "", ""])
        if measured is None:
            table.append(["", "ours", *["-"] * len(responses), "-", not_run_note(row, out, preset)])
        else:
            corr = measured["results"]["correlations"]
            table.append(["", "ours", *ours_corr(corr, responses), format_duration(measured["seconds"]),
                          corr_verdict(corr, row.measure)])
        if row.measure == "two_stage":   # the GNH run of the same data set measures two-stage LOO too
            twin = collect(select_rows("table6", row.name)[0], out, preset)
            if twin is not None:
                corr = twin["results"]["correlations"]
                table.append(["", "ours, GNH run (table6)", *ours_corr(corr, responses), format_duration(twin["seconds"]),
                              corr_verdict(corr, row.measure)])
        details.append(_detail(row, measured, out, preset))
    return markdown_table(header, table) + "\n" + "\n".join(details) + "\n" + _notes(rows)


def _notes(rows: list[Row]) -> str:
    """Each distinct note of a section once, with the rows it concerns."""
    by_note = {}
    for row in rows:
        if row.note:
            by_note.setdefault(row.note, []).append(f"`{row.name}`")
    return "".join(f"\n**Note** ({', '.join(names)}): {note}\n" for note, names in by_note.items())


def _detail(row: Row, measured: dict | None, out, preset: str) -> str:
    """Per row: the settings and command of ours, the paper preset's command and expected time."""
    lines = [f"- `{row.name}`: "]
    if measured:
        shared = owner(row, preset)
        lines[0] += f"{preset} preset ({measured['settings']}), `{measured['command']}`"
        if shared is not row:
            lines[0] += f" (the run of {shared.id})"
        if "base_objective" in measured["results"]:   # how far the base network trained
            lines[0] += f"; base training objective {measured['results']['base_objective']:.4g}"
        steps = rounding_steps(measured["results"])
        if not measured.get("float64_losses") and steps is not None and steps < ROUNDING_STEPS_FLAGGED:
            lines[0] += (f"; run before test-loss changes were evaluated in float64, and its removed points' "
                         f"PBRF changes differ by only ~{steps:.2g} float32 rounding steps of the loss, so its "
                         f"correlations may be rounding-limited (rerun it to refresh)")
        lines[0] += f"; {paper_time_note(row, measured, out)}."
    else:
        lines[0] += f"{preset} preset ({row.job(preset).describe()}) not run here; {paper_time_note(row, None, out)}."
    return "\n".join(lines)



def _tally(section: str) -> dict[str, int]:
    """How many of a section's rows (table lines `| | ours |`, figure bullets) got each verdict."""
    counts = dict.fromkeys(VERDICTS, 0)
    for line in section.splitlines():
        if line.startswith("|  | ours |"):
            verdict = line.rstrip(" |").rsplit("|", 1)[-1].strip()
        elif line.startswith("- **"):
            verdict = line.split("Ours", 1)[-1].split("paper preset not run here", 1)[0]
        else:
            continue
        first = min(VERDICTS, key=lambda v: (verdict.find(v) if v in verdict else len(verdict) + 1))
        if first in verdict:
            counts[first] += 1
    return counts


def _summary(sections: dict[str, str]) -> str:
    rows = [[t, *[str(c[v]) for v in VERDICTS]] for t, c in ((t, _tally(text)) for t, text in sections.items())]
    return ("\n## Summary: the verdicts per table and figure (quick preset)\n\n"
            + markdown_table(["target", *VERDICTS], rows)
            + "\n\"partly\": some of the paper's claims for the row hold and some do not (each row says which).\n")


def write_report(out, markdown=None, figures=None, preset: str = "quick") -> Path:
    """REPRODUCTION.md from the results under ``out``: every row, paper beside ours, with verdicts."""
    out = Path(out)
    markdown = Path(markdown) if markdown else out / "REPRODUCTION.md"
    figures = Path(figures) if figures else markdown.parent / "figures"
    parts, sections = [], {}
    for target in ("table5", "figure4", "table4", "table2", "table6", "table7", "table8", "figure1", "figure5",
                   "figure6"):
        rows = [r for r in ROWS if r.target == target]
        if rows[0].measure == "gaps":
            text = _gap_section(rows, out, preset)
        elif rows[0].measure in ("correlations", "two_stage"):
            text = _corr_section(rows, out, preset)
        elif target == "figure1":
            text = figure1_section(rows, out, preset, figures, markdown)
        elif target == "figure4":
            text = figure4_section(rows[0], out, preset, figures, markdown)
        elif target == "figure5":
            text = figure5_section(rows, out, preset, figures, markdown)
        else:
            text = figure6_section(rows, out, preset, figures, markdown)
        parts.append(_target_header(target) + text)
        if target != "figure4":
            sections[target] = text
    atomic_write_text(markdown, HEADER + _summary(sections) + "".join(parts))
    return markdown


