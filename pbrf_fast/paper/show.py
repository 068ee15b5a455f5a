"""``pbrf-fast show DIR``: what people look at first in a finished score run.

- ``self_influence.png``: a histogram of self-influence (mislabelled or atypical
  examples sit in the right tail);
- ``proponents.png`` (image data): each test image beside its top proponents and
  opponents, with their scores.

The images come from the run's data: ``--data`` file for the user's own runs, the
built-in loader otherwise (recorded in arguments.json).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..scale import load_scores

__all__ = ["show_scores"]


def _images(arguments: dict, data_dir=None):
    """(x_train, x_test) of the run, or None when they are not images or not recorded."""
    extra = arguments.get("extra", {})
    if extra.get("data"):
        from ..scale.loading import load_data_file

        data = load_data_file(extra["data"])
        x_tr, x_te = data["x_train"], data["x_test"]
    elif extra.get("dataset"):
        from .builtin_scores import load_dataset

        x_tr, _, x_te, _ = load_dataset(extra["dataset"], data_dir or extra.get("data_dir"), None,
                                        extra.get("train_points"), arguments.get("n_test"), extra.get("seed", 0))
    else:
        return None
    if x_tr.dim() != 4 or x_tr.shape[1] not in (1, 3):
        return None
    return x_tr, x_te


def _to_image(x: torch.Tensor) -> np.ndarray:
    x = x.detach().double().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x.permute(1, 2, 0).squeeze(-1).numpy()


def show_scores(out_dir, *, test_points: int = 8, k: int = 5, data_dir=None) -> list[Path]:
    """Write the figures into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    results = load_scores(out)
    written = []
    if results.self_influence is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(results.self_influence, bins=60, color="#4472c4")
        ax.set_xlabel("self-influence (own-loss increase on removal)")
        ax.set_ylabel("training examples")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "self_influence.png", dpi=120)
        plt.close(fig)
        written.append(out / "self_influence.png")
    images = _images(results.arguments, data_dir)
    if images is not None:
        x_tr, x_te = images
        rows = min(test_points, len(x_te), len(results.topk))
        k = min(k, len(results.topk["0"]["proponents"]))
        fig, axes = plt.subplots(rows, 1 + 2 * k, figsize=(1.4 * (1 + 2 * k), 1.5 * rows), squeeze=False)
        for j in range(rows):
            entry = results.topk[str(j)]
            panels = ([(x_te[j], "test", None)] + [(x_tr[i], "proponent", s) for i, s in entry["proponents"][:k]]
                      + [(x_tr[i], "opponent", s) for i, s in entry["opponents"][:k]])
            for ax, (image, kind, score) in zip(axes[j], panels):
                ax.imshow(_to_image(image), cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(kind if score is None else f"{score:.2g}", fontsize=7,
                             color={"proponent": "#2e7d32", "opponent": "#c62828"}.get(kind, "black"))
        fig.suptitle("each test image, its top proponents (green) and opponents (red)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "proponents.png", dpi=120)
        plt.close(fig)
        written.append(out / "proponents.png")
    if not written:
        raise InputError(f"{out}: nothing to show (no self-influence and no image data recorded)")
    return written
