"""Small data sets that ship inside scikit-learn, so examples run with no files."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["standardise", "load_breast_cancer", "load_digits"]


def standardise(train: np.ndarray, *others: np.ndarray):
    """Scale features by the training mean and std (constant features left at 0)."""
    mean = train.mean(0)
    std = train.std(0)
    std = np.where(std > 0, std, 1.0)
    return tuple((a - mean) / std for a in (train, *others))


def _split(x, y, n_test, seed):
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = standardise(x[train], x[test])
    return x_train, y[train], x_test, y[test]


def load_breast_cancer(n_test: int = 169, seed: int = 0, dtype=torch.float64):
    """Wisconsin diagnostic breast cancer (569 x 30, binary): standardised train/test tensors."""
    from sklearn.datasets import load_breast_cancer as sk_load

    x, y = sk_load(return_X_y=True)
    x_train, y_train, x_test, y_test = _split(x, y.astype(np.float64), n_test, seed)
    as_t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return as_t(x_train), as_t(y_train), as_t(x_test), as_t(y_test)


def load_digits(n_test: int = 297, seed: int = 0, dtype=torch.float32):
    """scikit-learn's 8x8 digits (1797 x 64, 10 classes): standardised train/test tensors."""
    from sklearn.datasets import load_digits as sk_load

    x, y = sk_load(return_X_y=True)
    x_train, y_train, x_test, y_test = _split(x, y, n_test, seed)
    return (torch.as_tensor(x_train, dtype=dtype), torch.as_tensor(y_train, dtype=torch.long),
            torch.as_tensor(x_test, dtype=dtype), torch.as_tensor(y_test, dtype=torch.long))
