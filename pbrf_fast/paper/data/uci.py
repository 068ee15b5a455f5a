"""UCI tabular sets the paper uses, read from CSV files in a data directory.

The directory comes from the ``data_dir`` argument, else ``$PBRF_DATA``; files
sit under ``uci/`` there (the layout of the project's offline copies).
Features and regression targets are standardised with training statistics
(Appendix E.3).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .builtin import standardise
from ...errors import DataNotFoundError

__all__ = ["resolve_data_dir", "load_concrete", "load_energy", "load_diabetes_pima", "UCI_FILES"]

UCI_FILES = {
    "concrete": "uci/concrete.csv",
    "energy": "uci/energy.csv",
    "diabetes": "uci/pima-indians-diabetes.csv",
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else $PBRF_DATA; an error says where it looked."""
    chosen = data_dir if data_dir is not None else os.environ.get("PBRF_DATA")
    if chosen is None:
        raise DataNotFoundError("no data directory: pass data_dir=... (CLI: --data-dir DIR) or set $PBRF_DATA to the "
                                "folder holding uci/, mnist/, fashion-mnist/, ptb/ and the CIFAR-10 files")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"data directory {path} does not exist")
    return path


def _read_csv(name: str, data_dir) -> np.ndarray:
    path = resolve_data_dir(data_dir) / UCI_FILES[name]
    if not path.is_file():
        raise DataNotFoundError(f"{name}: expected the CSV file {path} (with a header row); it is missing")
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)


def _split_standardise(x, y, n_test, seed, standardise_target, dtype):
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = standardise(x[train], x[test])
    y_train, y_test = y[train], y[test]
    if standardise_target:
        y_train, y_test = standardise(y_train[:, None], y_test[:, None])
        y_train, y_test = y_train[:, 0], y_test[:, 0]
    as_t = lambda a, dt=dtype: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return as_t(x_train), as_t(y_train), as_t(x_test), as_t(y_test)


def load_concrete(data_dir=None, n_test: int = 100, seed: int = 0, dtype=torch.float32):
    """Concrete compressive strength: 8 features, strength target (930 train / 100 test)."""
    table = _read_csv("concrete", data_dir)
    return _split_standardise(table[:, :8], table[:, 8], n_test, seed, True, dtype)


def load_energy(data_dir=None, n_test: int = 77, seed: int = 0, dtype=torch.float32, target: str = "heating_load"):
    """Energy efficiency: 8 features, heating (default) or cooling load target."""
    table = _read_csv("energy", data_dir)
    column = {"heating_load": 8, "cooling_load": 9}[target]
    return _split_standardise(table[:, :8], table[:, column], n_test, seed, True, dtype)


def load_diabetes_pima(data_dir=None, n_test: int = 77, seed: int = 0, dtype=torch.float32):
    """Pima Indians diabetes: 8 features, 0/1 target (the paper's "Diabetes")."""
    table = _read_csv("diabetes", data_dir)
    return _split_standardise(table[:, :8], table[:, 8], n_test, seed, False, dtype)
