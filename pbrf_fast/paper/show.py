"""``pbrf-fast show DIR``: what people look at first in a finished score run.

- ``self_influence.png``: a histogram of self-influence (mislabelled or atypical
  examples sit in the right tail);
- ``proponents.png`` (image data): each test image beside its top proponents and
  opponents, each labelled with its training index, class and score (or, with
  ``relative=True``, score / self-influence, which keeps examples that move every test
  point from topping every list); the title says how many test points are drawn.

The images come from the run's data: ``--data`` file for the user's own runs, the
built-in loader otherwise (recorded in arguments.json).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import plotting
from ..errors import InputError
from ..scale import load_scores

# proponent and opponent panels' title colours: Okabe-Ito blue and vermillion
PROPONENT, OPPONENT = plotting.COLOURS[0], plotting.COLOURS[3]

__all__ = ["show_scores"]


def _images(arguments: dict, data_dir=None):
    """(x_train, y_train, x_test), or a sentence saying why the run's images cannot be drawn."""
    extra = arguments.get("extra", {})
    if extra.get("data"):
        from ..scale.loading import load_data_file

        data = load_data_file(extra["data"])
        x_tr, y_tr, x_te = data["x_train"], data["y_train"], data["x_test"]
    elif extra.get("dataset"):
        from .builtin_scores import load_dataset

        x_tr, y_tr, x_te, _ = load_dataset(extra["dataset"], data_dir or extra.get("data_dir"), None,
                                           extra.get("train_points"), arguments.get("n_test"), extra.get("seed", 0))
    else:
        return ("the run recorded no data file or built-in data set (a Python-API run): its training "
                "examples cannot be drawn from here")
    if x_tr.dim() != 4 or x_tr.shape[1] not in (1, 3):
        return f"the inputs are not images (shape {tuple(x_tr.shape[1:])} per example)"
    return x_tr, y_tr, x_te


def _to_image(x: torch.Tensor) -> np.ndarray:
    x = x.detach().double().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x.permute(1, 2, 0).squeeze(-1).numpy()


def _ranked(results, j: int, k: int, relative: bool) -> tuple[list, list]:
    """The top-k proponents and opponents of test point j: (index, value) pairs, by score or
    by score / self-influence (relative influence: an example that moves every test point,
    as high-self-influence ones do, no longer tops every list)."""
    if not relative:
        entry = results.topk[str(j)]
        return entry["proponents"][:k], entry["opponents"][:k]
    column = np.asarray(results.scores[:, j], dtype=np.float64) / np.maximum(results.self_influence, 1e-30)
    order = np.argsort(column)
    return ([(int(i), float(column[i])) for i in order[::-1][:k]], [(int(i), float(column[i])) for i in order[:k]])


def _label(index: int, y_train, value: float) -> str:
    label = y_train[index]
    cls = f" class {int(label)}" if label.dim() == 0 and not torch.is_floating_point(label) else ""
    return f"#{index}{cls}\n{value:.2g}"


def _histogram(results, out: Path, plt) -> Path:
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    values = np.asarray(results.self_influence, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts, _, _ = ax.hist(values, bins=60, color=plotting.COLOURS[0])
    ax.set_title(f"Self-influence of the {len(values)} training examples of the run in {out.name}/\n"
                 f"(high: an example the model fits only by memorising it; median {np.median(values):.2g}, "
                 f"max {values.max():.2g})")
    # a long right tail (a few examples with large self-influence) needs a log count axis
    # to show both the bulk and the tail; counts are whole numbers either way
    log = counts.max() >= 100 * max(counts[counts > 0].min(), 1)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    plotting.tidy_ticks(ax, x=6)
    if not log:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    plotting.label_axes(ax, "self-influence (increase of its own loss when removed)",
                        "training examples" + (" (log scale)" if log else ""))
    return plotting.save(fig, out / "self_influence.png")


def _proponents(results, images, out: Path, plt, test_points: int, k: int, relative: bool) -> Path:
    x_tr, y_tr, x_te = images
    rows = min(test_points, len(x_te), len(results.topk))
    k = min(k, len(results.topk["0"]["proponents"]))
    fig, axes = plt.subplots(rows, 1 + 2 * k, figsize=(1.5 * (1 + 2 * k), 1.9 * rows + 0.6), squeeze=False)
    for j in range(rows):
        proponents, opponents = _ranked(results, j, k, relative)
        # "+" and "-" as well as the colour: the figure must read without telling colours apart
        panels = ([(x_te[j], f"test #{j}", plotting.REFERENCE)]
                  + [(x_tr[i], "+ " + _label(i, y_tr, v), PROPONENT) for i, v in proponents]
                  + [(x_tr[i], "- " + _label(i, y_tr, v), OPPONENT) for i, v in opponents])
        for ax, (image, title, colour) in zip(axes[j], panels):
            ax.grid(False)
            ax.imshow(_to_image(image), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=6.5, color=colour)
    what = "relative influence (score / self-influence)" if relative else "influence score"
    fig.suptitle(f"Run {out.name}: test points 0-{rows - 1} of {len(x_te)} (left), their top {k} proponents "
                 f"(+, blue) and opponents (-, vermillion) by {what}; each titled #index, class, value",
                 fontsize=8, wrap=True)
    return plotting.save(fig, out / "proponents.png")


def show_scores(out_dir, *, test_points: int = 8, k: int = 5, data_dir=None, relative: bool = False) -> list[Path]:
    """Write the figures into ``out_dir``; returns their paths. ``relative``: rank and label
    proponents by score / self-influence instead of the score."""
    out = Path(out_dir)
    results = load_scores(out)
    if relative and results.self_influence is None:
        raise InputError(f"{out}: --relative divides by self-influence, which this run did not compute "
                         "(rerun scores with --self-influence, or with --curvature ekfac)")
    written = []
    if results.self_influence is not None:
        with plotting.styled() as plt:
            written.append(_histogram(results, out, plt))
    images = _images(results.arguments, data_dir)
    if isinstance(images, str):
        warnings.warn(f"{out}: proponents.png not drawn: {images}", stacklevel=2)
    else:
        with plotting.styled() as plt:
            written.append(_proponents(results, images, out, plt, test_points, k, relative))
    if not written:
        raise InputError(f"{out}: nothing to show (no self-influence, and {images})")
    return written
