"""MNIST and FashionMNIST from the standard IDX files (gzipped or not).

Looks for ``<data_dir>/<name>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
Images are scaled to [0, 1] and flattened unless ``flatten=False``.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from .uci import resolve_data_dir
from ...errors import DataNotFoundError

__all__ = ["read_idx", "load_mnist", "load_fashion_mnist", "subset", "corrupt_labels"]

_FOLDERS = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: magic (0, 0, dtype code, ndim), big-endian dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(f"missing {stem}(.gz) in {folder}: expected the standard IDX files "
                            f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] in <data dir>/{folder.name}/ "
                            "(as torchvision's raw folder); pass --data-dir DIR or set $PBRF_DATA")


def _load(name: str, data_dir, flatten: bool, dtype):
    folder = resolve_data_dir(data_dir) / _FOLDERS[name]
    out = []
    for split in ("train", "t10k"):
        images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
        x = torch.as_tensor(images.astype(np.float32) / 255.0, dtype=dtype)
        x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
        out += [x, torch.as_tensor(labels.astype(np.int64))]
    return tuple(out)


def load_mnist(data_dir=None, flatten: bool = True, dtype=torch.float32):
    """(x_train, y_train, x_test, y_test): 60k/10k images, 784 features or 1x28x28."""
    return _load("mnist", data_dir, flatten, dtype)


def load_fashion_mnist(data_dir=None, flatten: bool = True, dtype=torch.float32):
    return _load("fashion_mnist", data_dir, flatten, dtype)


def subset(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0):
    """A seeded random fraction of a data set (e.g. the paper's "10% of MNIST")."""
    k = max(1, int(round(fraction * len(x))))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]
    return x[idx], y[idx]


def corrupt_labels(y: torch.Tensor, fraction: float, num_classes: int, seed: int = 0):
    """Replace a seeded fraction of labels by a different random class; returns (labels, corrupted mask)."""
    g = torch.Generator().manual_seed(seed)
    k = int(round(fraction * len(y)))
    idx = torch.randperm(len(y), generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % num_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    return noisy, mask
