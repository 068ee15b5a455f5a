"""The one look of every figure pbrf_fast writes (the harness's tables and runs, ``show``,
``evaluate``, the reproduction report, ``bench/track.py``).

- Colours: the Okabe-Ito palette, told apart with the common colour-vision
  deficiencies; lines also differ by marker, so two lines on top of each other
  (influence and PBRF often coincide) both stay visible.
- Layout: matplotlib's constrained layout, which keeps titles, tick labels and
  legends from running into each other, and legends placed beside or below
  the axes, never over the data.
- Scatters of an estimate against its ground truth: :func:`estimate_vs_truth`
  draws the y = x line and writes the correlation in the panel's title.
- Ticks: at most a handful per axis, and an axis of very small or large values
  divided by a power of ten that its label states (:func:`label_axes`), so tick
  labels never run together.

Nothing here is imported by the library; matplotlib loads when a figure is drawn.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

__all__ = ["COLOURS", "MARKERS", "LINESTYLES", "REFERENCE", "line_style", "styled", "save", "estimate_vs_truth",
           "tidy_ticks", "label_axes", "legend_beside", "legend_below", "pearson"]

# Okabe & Ito (2008), "Color Universal Design": blue, orange, bluish green, vermillion,
# reddish purple, sky blue, yellow; black for references (y = x, random, baselines).
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# lines of equal values (two exact solvers, influence and PBRF) lie on top of each other:
# the later one dashed with hollow markers lets the first show through
LINESTYLES = ("-", "--", "-.", ":")
REFERENCE = "black"

_STYLE = {
    "figure.dpi": 120,
    "savefig.dpi": 120,
    "figure.constrained_layout.use": True,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.formatter.useoffset": False,  # "+1.2e3" offsets read as data; label_axes scales instead
    "axes.formatter.use_mathtext": True,
    "lines.markersize": 4,
}


@contextlib.contextmanager
def styled():
    """``with styled() as plt:`` pyplot (Agg backend) with the shared style, for drawing
    and saving one figure; rcParams are restored afterwards, so a caller's own
    matplotlib settings are left alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    with plt.rc_context(_STYLE | {"axes.prop_cycle": cycler(color=COLOURS) + cycler(marker=MARKERS)}):
        yield plt


def save(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path


def line_style(i: int) -> dict:
    """The i-th line's colour, marker and dashes, for plot(**line_style(i))."""
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)], "markerfacecolor": "none" if i % 2 else None}


def tidy_ticks(ax, x: int = 4, y: int = 5) -> None:
    """At most about ``x`` / ``y`` tick labels on a linear axis (a log axis keeps its decades)."""
    from matplotlib.ticker import MaxNLocator

    steps = [1, 2, 2.5, 5, 10]  # round steps (0.1, 0.2, 0.25, 0.5), never 0.15 or 0.3
    if ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(nbins=x, steps=steps, min_n_ticks=2))
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_locator(MaxNLocator(nbins=y, steps=steps, min_n_ticks=2))


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length arrays; nan when either is constant."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def estimate_vs_truth(ax, truth, estimate, *, xlabel: str, ylabel: str, title: str, correlation=None,
                      correlation_name: str = "Pearson r") -> None:
    """One panel of an estimate (y) against its ground truth (x): the points, the y = x
    line (where the points would lie if the estimate were exact) and the correlation.

    ``correlation`` is the value to write (e.g. the mean per-test-point Pearson a
    table reports, so figure and table agree) under ``correlation_name``; unset,
    the pooled Pearson of the points. The axis limits are the data's: when the
    estimate's scale differs from the truth's, the y = x line crosses the panel
    steeply or flatly instead of squeezing the points into a corner.
    """
    truth = np.asarray(truth, dtype=np.float64).ravel()
    estimate = np.asarray(estimate, dtype=np.float64).ravel()
    ax.scatter(truth, estimate, s=10, alpha=0.7, color=COLOURS[0], edgecolors="none", marker="o")
    ax.autoscale_view()
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    lo, hi = min(xlim[0], ylim[0]), max(xlim[1], ylim[1])
    ax.plot([lo, hi], [lo, hi], color=REFERENCE, linestyle="--", linewidth=0.8, marker="")
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    value = pearson(truth, estimate) if correlation is None else correlation
    # a correlation of -0.001 reads "0.00", not "-0.00"
    shown = "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}".replace("-0.00", "0.00")
    # the correlation and the key to the dashed line go in the title, never over the points
    ax.set_title(f"{title}\n{correlation_name} = {shown}; dashed: y = x")
    tidy_ticks(ax, x=4, y=4)
    label_axes(ax, xlabel, ylabel)


def _power_of_ten(axis_limits) -> int:
    """The power of ten to divide a linear axis by so its tick labels stay short: 0 for
    values between 1e-2 and 1e4, else the exponent of the largest limit."""
    largest = max(abs(v) for v in axis_limits)
    if largest == 0 or not math.isfinite(largest) or 1e-2 <= largest < 1e4:
        return 0
    return math.floor(math.log10(largest))


def label_axes(ax, xlabel: str, ylabel: str) -> None:
    """Set the axis labels; a linear axis of very small or large values shows its ticks
    divided by a power of ten, which its label states ("actual change (x10^-3)").

    matplotlib would put that factor in an offset text at the axis' top corner, where
    it runs into a two-line panel title; in the label it cannot collide with anything.
    """
    from matplotlib.ticker import FuncFormatter

    for axis, label, limits, scale in ((ax.xaxis, xlabel, ax.get_xlim(), ax.get_xscale()),
                                       (ax.yaxis, ylabel, ax.get_ylim(), ax.get_yscale())):
        power = _power_of_ten(limits) if scale == "linear" else 0
        formatter = axis.get_major_formatter()
        if not power and hasattr(formatter, "set_scientific"):
            formatter.set_scientific(False)  # no "x10^-3" offset text: the ticks read as they are
        if power:
            axis.set_major_formatter(FuncFormatter(lambda value, _, p=power: f"{value / 10.0 ** p:g}"))
            label = f"{label} ($\\times 10^{{{power}}}$)".lstrip()
        axis.set_label_text(label)


def legend_beside(ax, **kwargs):
    """The axes' legend to their right, outside the data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def legend_below(fig, ncols: int, **kwargs):
    """One legend for the whole figure, below its axes (constrained layout makes room)."""
    return fig.legend(loc="outside lower center", ncols=ncols, **kwargs)
