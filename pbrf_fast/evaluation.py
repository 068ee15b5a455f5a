"""How good is an attribution? The field's metrics, computed from a score matrix.

Sign convention (as in :class:`pbrf_fast.Influence`): ``scores[i, j]`` is the
predicted change of test measurement ``j`` (e.g. its loss) when training point
``i`` is **removed**. Every function here takes scores in that sign.

- :func:`linear_datamodeling_score` (LDS; Ilyas et al. 2022, Park et al. 2023):
  for random training subsets S, the additive prediction of the measurement of
  a model trained on S is ``-sum_{i in S} scores[i, j]`` (removing the
  complement changes the measurement by ``sum_{i not in S} scores[i, j]``,
  which differs from ``-sum_{i in S}`` by a constant per test point, so the two
  rank alike); LDS is the Spearman correlation, across subsets, between that
  prediction and the measured value, averaged over test points.
- :func:`loo_correlation`: scores against measured leave-one-out changes.
- :func:`brittleness`: the fewest top proponents whose removal flips a
  prediction, checked by a retraining callable the caller supplies.
- :func:`detection_curve` / :func:`detection_auc`: mislabel detection by
  ranking training points (e.g. by self-influence).

Everything is computed in float64 NumPy; inputs may be NumPy arrays or torch
tensors. A test point whose correlation is undefined (its measured values, or
its predictions, are constant) is reported as NaN and counted, never dropped
silently: means are over the finite values and say how many there were.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

from .errors import InputError, InputTypeError

__all__ = ["CorrelationResult", "BrittlenessResult", "random_subsets", "subset_predictions",
           "linear_datamodeling_score", "loo_correlation", "brittleness", "detection_curve", "detection_auc"]


# ------------------------------------------------------------------------------- results
@dataclasses.dataclass
class CorrelationResult:
    """Per-test-point correlations and their mean over the finite ones.

    ``per_test[j]`` is NaN where the correlation is undefined (a constant
    column); ``n_undefined`` counts those and ``mean`` leaves them out (NaN if
    every one is undefined). ``pooled`` (LOO only) correlates all pairs at once.
    """

    mean: float
    per_test: np.ndarray
    n_finite: int
    n_undefined: int
    method: str = "spearman"
    pooled: float | None = None

    def as_dict(self) -> dict:
        return {"mean": self.mean, "n_finite": self.n_finite, "n_undefined": self.n_undefined,
                "method": self.method, "pooled": self.pooled,
                "per_test": [None if not np.isfinite(v) else float(v) for v in self.per_test]}

    def __str__(self) -> str:
        extra = f", {self.n_undefined} undefined" if self.n_undefined else ""
        return f"{self.method} {self.mean:.4f} (mean over {self.n_finite} test points{extra})"


@dataclasses.dataclass
class BrittlenessResult:
    """``smallest_k[j]``: the smallest k tried whose removal flipped test point j (NaN: none did).

    ``flipped_fraction[k]``: share of test points flipped by removing at most k
    (among the tried ``ks``).
    """

    smallest_k: np.ndarray
    ks: tuple[int, ...]
    flipped_fraction: dict[int, float]

    @property
    def n_flipped(self) -> int:
        return int(np.isfinite(self.smallest_k).sum())

    def as_dict(self) -> dict:
        return {"ks": list(self.ks), "flipped_fraction": {str(k): v for k, v in self.flipped_fraction.items()},
                "smallest_k": [None if not np.isfinite(v) else int(v) for v in self.smallest_k],
                "n_flipped": self.n_flipped}


# ---------------------------------------------------------------------------- validation
def _array(value, name: str, ndim: tuple[int, ...], finite: bool = True) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if not isinstance(value, (np.ndarray, list, tuple)):
        raise InputTypeError(f"{name} must be an array or tensor, got {type(value).__name__}")
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputTypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    if array.ndim not in ndim:
        raise InputError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {array.shape}")
    array = array.astype(np.float64)
    if finite and not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or Inf")
    return array


def _masks(masks, n: int) -> np.ndarray:
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    array = np.asarray(masks)
    if array.ndim != 2:
        raise InputError(f"masks must be (subsets, n_train), got shape {array.shape}")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
            raise InputError("masks must be boolean or hold only 0 and 1 (1: the training point is in the subset)")
    if array.shape[1] != n:
        raise InputError(f"masks has {array.shape[1]} columns but scores has {n} training points (rows)")
    return array.astype(np.float64)


def _columns_correlation(a: np.ndarray, b: np.ndarray, method: str) -> np.ndarray:
    """Correlation of each column of ``a`` with the same column of ``b`` (NaN if either is constant)."""
    if method not in ("spearman", "pearson"):
        raise InputError(f"method must be 'spearman' or 'pearson', got {method!r}")
    if method == "spearman":
        a, b = rankdata(a, axis=0), rankdata(b, axis=0)
    a = a - a.mean(0)
    b = b - b.mean(0)
    denominator = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).sum(0) / denominator
    out[~(denominator > 0) | ~np.isfinite(out)] = np.nan
    return np.clip(out, -1.0, 1.0)


def _summary(per_test: np.ndarray, method: str, pooled=None) -> CorrelationResult:
    finite = np.isfinite(per_test)
    mean = float(per_test[finite].mean()) if finite.any() else float("nan")
    return CorrelationResult(mean, per_test, int(finite.sum()), int((~finite).sum()), method, pooled)


# ------------------------------------------------------------------------------- metrics
def random_subsets(n: int, count: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` seeded random subsets of ``range(n)``, each of exactly ``round(alpha * n)`` points.

    Returns a boolean ``(count, n)`` mask (True: the point is kept).
    """
    for name, value in (("n", n), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(f"alpha must be a fraction in (0, 1), got {alpha!r}")
    size = int(round(alpha * n))
    if not 0 < size < n:
        raise InputError(f"alpha={alpha} keeps {size} of {n} points; a subset must keep some but not all")
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, n), dtype=bool)
    for k in range(count):
        masks[k, rng.choice(n, size=size, replace=False)] = True
    return masks


def subset_predictions(scores, masks) -> np.ndarray:
    """The additive prediction ``-sum_{i in S} scores[i, j]`` for every subset: (subsets, m)."""
    scores = _array(scores, "scores", (2,))
    return -(_masks(masks, scores.shape[0]) @ scores)


def linear_datamodeling_score(scores, masks, truth) -> CorrelationResult:
    """The linear datamodeling score (LDS).

    ``scores``: (n_train, m), the predicted change of each test measurement when
    each training point is removed (this library's sign). ``masks``: (K, n_train)
    boolean or 0/1, row k the training subset S_k a model was trained on.
    ``truth``: (K, m), the measurement of test point j by the model(s) trained
    on S_k (e.g. its loss, averaged over training seeds).

    The prediction for S_k is ``-sum_{i in S_k} scores[i, j]``; per test point
    the Spearman correlation across the K subsets between prediction and truth
    is returned in ``per_test`` and their mean (over the finite ones) in
    ``mean``. A test point whose truth is constant across subsets has no
    defined correlation: it is NaN in ``per_test`` and counted in ``n_undefined``.
    """
    scores = _array(scores, "scores", (2,))
    mask = _masks(masks, scores.shape[0])
    truth = _array(truth, "truth", (2,))
    if truth.shape != (mask.shape[0], scores.shape[1]):
        raise InputError(f"truth must be (subsets, test points) = ({mask.shape[0]}, {scores.shape[1]}) to match "
                         f"masks and scores, got {truth.shape}")
    if mask.shape[0] < 3:
        raise InputError(f"LDS needs at least 3 subsets, got {mask.shape[0]}")
    return _summary(_columns_correlation(-(mask @ scores), truth, "spearman"), "spearman")


def loo_correlation(scores, loo_changes, method: str = "pearson") -> CorrelationResult:
    """Scores against measured leave-one-out changes.

    ``scores`` and ``loo_changes``: (n_removed, m) (or (n_removed,) for one test
    point); ``loo_changes[i, j]`` = measurement j of the model retrained without
    training point i minus that of the full model, the quantity ``scores``
    predicts. ``per_test`` correlates each test point's column across the removed
    points; ``pooled`` correlates all pairs at once.
    """
    scores = _array(scores, "scores", (1, 2))
    changes = _array(loo_changes, "loo_changes", (1, 2))
    if scores.shape != changes.shape:
        raise InputError(f"scores {scores.shape} and loo_changes {changes.shape} must have the same shape")
    if scores.ndim == 1:
        scores, changes = scores[:, None], changes[:, None]
    if scores.shape[0] < 3:
        raise InputError(f"a correlation needs at least 3 removed points, got {scores.shape[0]}")
    pooled = _columns_correlation(scores.reshape(-1, 1), changes.reshape(-1, 1), method)[0]
    return _summary(_columns_correlation(scores, changes, method), method, float(pooled))


def brittleness(scores, flips: Callable[[int, list[np.ndarray]], Sequence[bool]], ks: Sequence[int],
                test_points: Sequence[int] | None = None) -> BrittlenessResult:
    """The fewest top proponents whose removal flips each test prediction.

    For test point j the training points are ordered by ``scores[:, j]``,
    largest first (the proponents: removing them is predicted to raise the test
    loss most). ``flips(j, [top_k1, top_k2, ...])`` must retrain without each
    index set (one per k of ``ks``, ascending) and return, for each, whether
    test point j's prediction changed; it is called once per test point so the
    caller can retrain all k together. ``test_points``: which columns (default all).
    """
    scores = _array(scores, "scores", (2,))
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1 or ks[-1] > scores.shape[0]:
        raise InputError(f"ks must be integers in [1, {scores.shape[0]}], got {ks}")
    columns = range(scores.shape[1]) if test_points is None else [int(j) for j in test_points]
    if any(not 0 <= j < scores.shape[1] for j in columns):
        raise InputError(f"test_points must index the {scores.shape[1]} columns of scores")
    smallest = np.full(len(columns), np.nan)
    for row, j in enumerate(columns):
        order = np.argsort(-scores[:, j], kind="stable")
        outcome = list(flips(j, [order[:k] for k in ks]))
        if len(outcome) != len(ks):
            raise InputError(f"flips returned {len(outcome)} answers for {len(ks)} removal sets")
        hit = [k for k, flipped in zip(ks, outcome) if flipped]
        if hit:
            smallest[row] = hit[0]
    fraction = {k: float((smallest <= k).mean()) if len(columns) else float("nan") for k in ks}
    return BrittlenessResult(smallest, ks, fraction)


def _ranking(scores, flagged) -> tuple[np.ndarray, np.ndarray]:
    scores = _array(scores, "scores", (1,))
    flag = _array(flagged, "flagged", (1,))
    if flag.shape != scores.shape:
        raise InputError(f"flagged has {flag.shape[0]} entries but scores has {scores.shape[0]}")
    if not np.isin(flag, (0, 1)).all():
        raise InputError("flagged must be boolean or 0/1 (1: the label is corrupted)")
    return np.argsort(-scores, kind="stable"), flag


def detection_curve(scores, flagged, fractions: Sequence[float]) -> list[float]:
    """Share of the flagged points found when inspecting the top ``fraction`` by score."""
    order, flag = _ranking(scores, flagged)
    total = max(flag.sum(), 1.0)
    return [float(flag[order[: int(round(f * len(order)))]].sum() / total) for f in fractions]


def detection_auc(scores, flagged) -> float:
    """Area under the detection curve over every inspected fraction 0, 1/n, ..., 1 (trapezoids).

    A random ranking scores about 0.5; inspecting the flagged points first
    scores 1 - (flagged share) / 2.
    """
    order, flag = _ranking(scores, flagged)
    total = flag.sum()
    if total == 0:
        raise InputError("flagged marks no point: the detection curve is undefined")
    found = np.concatenate([[0.0], np.cumsum(flag[order]) / total])
    return float(((found[1:] + found[:-1]) / 2).sum() / len(order))
