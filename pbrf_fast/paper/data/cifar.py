"""CIFAR-10 from the standard files, with a decoded-array cache.

Sources looked for in the data directory (argument, else ``$PBRF_DATA``):

1. ``cifar-10-batches-py/`` (the official python pickles; also the directory
   itself if it holds ``data_batch_1``) or the official ``cifar-10-python.tar.gz``;
2. an image-folder tree ``train/<class>/*.jpg|png`` and ``test/<class>/*``;
3. a ``.tar.gz`` of such a tree (e.g. ``cifar10-jpeg.tar.gz``), streamed once
   through ``tarfile`` without extracting anything.

Decoding a tree or tarball is slow (60,000 images), so the uint8 arrays are
cached as ``.npy`` under ``cache_dir`` (argument, else ``$PBRF_CACHE``, else
``~/.cache/pbrf_fast``), keyed by the source's name, size and mtime. Image-folder
order is (class, file name), classes sorted by name, which is the CIFAR-10
label order (airplane ... truck).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ...errors import DataNotFoundError

__all__ = ["CIFAR10_CLASSES", "load_cifar10", "load_cifar10_arrays", "cifar10_normalise", "cache_dir"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def cache_dir(path=None) -> Path:
    return Path(path or os.environ.get("PBRF_CACHE") or Path.home() / ".cache" / "pbrf_fast")


def _data_dir(path) -> Path:
    path = path or os.environ.get("PBRF_DATA")
    if not path:
        raise DataNotFoundError("CIFAR-10: no data directory given; pass data_dir= or set $PBRF_DATA")
    path = Path(path)
    if not path.is_dir():
        raise DataNotFoundError(f"CIFAR-10: data directory {path} does not exist")
    return path


def _find_source(root: Path) -> tuple[str, Path]:
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "data_batch_1").is_file():
            return "pickles", candidate
    if (root / "cifar-10-python.tar.gz").is_file():
        return "pickle-tar", root / "cifar-10-python.tar.gz"
    for candidate in (root, root / "cifar10", root / "cifar-10"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return "folder", candidate
    tars = sorted(p for p in root.glob("*.tar.gz") if "cifar" in p.name.lower() and "100" not in p.name)
    if tars:
        return "image-tar", tars[0]
    raise DataNotFoundError(
        f"CIFAR-10 not found in {root}: expected cifar-10-batches-py/data_batch_1..5 + test_batch, "
        "cifar-10-python.tar.gz, a train/<class>/*.jpg + test/<class>/*.jpg tree, or a cifar*.tar.gz of one")


def _unpickle_batches(open_member, names) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        with open_member(name) as handle:
            batch = pickle.load(handle, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _stack(items: dict, split: str, where) -> tuple[np.ndarray, np.ndarray]:
    """items: {(split, class, file): decoded image} -> arrays in (class, file) order."""
    keys = sorted(k for k in items if k[0] == split)
    if not keys:
        raise DataNotFoundError(f"CIFAR-10: no {split}/<class>/ images in {where}")
    classes = sorted({k[1] for k in keys})
    label = {c: i for i, c in enumerate(classes)}
    return np.stack([items[k] for k in keys]), np.array([label[k[1]] for k in keys], dtype=np.int64)


def _read_image_tar(path: Path) -> dict:
    items = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:  # one streaming pass
            parts = Path(member.name).parts
            if not member.isfile() or not member.name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            parts = parts[parts.index(next(p for p in parts if p in ("train", "test"))):] \
                if any(p in ("train", "test") for p in parts) else ()
            if len(parts) != 3:
                continue
            items[tuple(parts)] = _decode(tar.extractfile(member).read())
    return items


def _read_folder(root: Path) -> dict:
    items = {}
    for split in ("train", "test"):
        for file in (root / split).glob("*/*"):
            if file.suffix.lower() in _IMAGE_SUFFIXES:
                items[(split, file.parent.name, file.name)] = _decode(file.read_bytes())
    return items


def _read_source(kind: str, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    train_names = [f"data_batch_{k}" for k in range(1, 6)]
    if kind == "pickles":
        missing = [n for n in train_names + ["test_batch"] if not (path / n).is_file()]
        if missing:
            raise DataNotFoundError(f"CIFAR-10: {missing} missing in {path}")
        opener = lambda n: open(path / n, "rb")  # noqa: E731
        return {"train": _unpickle_batches(opener, train_names), "test": _unpickle_batches(opener, ["test_batch"])}
    if kind == "pickle-tar":
        with tarfile.open(path, "r:*") as tar:
            opener = lambda n: tar.extractfile(f"cifar-10-batches-py/{n}")  # noqa: E731
            return {"train": _unpickle_batches(opener, train_names),
                    "test": _unpickle_batches(opener, ["test_batch"])}
    items = _read_image_tar(path) if kind == "image-tar" else _read_folder(path)
    return {split: _stack(items, split, path) for split in ("train", "test")}


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def load_cifar10_arrays(data_dir=None, cache=None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 32, 32, 3) and int64 labels (n,) of one split, decoded once and cached."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kind, source = _find_source(_data_dir(data_dir))
    if kind == "pickles":  # already fast to read: no cache
        return _read_source(kind, source)[split]
    stat = source.stat()
    key = f"cifar10-{source.name}-{stat.st_size}-{int(stat.st_mtime)}"
    folder = cache_dir(cache)
    files = {s: (folder / f"{key}-{s}-x.npy", folder / f"{key}-{s}-y.npy") for s in ("train", "test")}
    if not all(p.is_file() for pair in files.values() for p in pair):
        arrays = _read_source(kind, source)
        for s, (px, py) in files.items():
            _atomic_save_npy(px, arrays[s][0])
            _atomic_save_npy(py, arrays[s][1])
    px, py = files[split]
    return np.load(px), np.load(py)


def cifar10_normalise(images: np.ndarray, mean=None, std=None) -> torch.Tensor:
    """uint8 (n, 32, 32, 3) -> float32 (n, 3, 32, 32), normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.as_tensor(mean if mean is not None else x.mean((0, 2, 3)), dtype=torch.float32)
    std = torch.as_tensor(std if std is not None else x.std((0, 2, 3)), dtype=torch.float32)
    return ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).contiguous()


def load_cifar10(data_dir=None, cache=None, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """Normalised CIFAR-10 tensors ``x_train, y_train, x_test, y_test`` (per-channel
    statistics of the *full* training set, applied to both splits). ``n_train`` / ``n_test``
    take seeded random subsets (in index order), never the first N: image-folder copies are
    stored class by class, so the first N would all be one class."""
    x_tr, y_tr = load_cifar10_arrays(data_dir, cache, "train")
    x_te, y_te = load_cifar10_arrays(data_dir, cache, "test")
    stats = torch.from_numpy(x_tr).float().div_(255.0)
    mean, std = stats.mean((0, 1, 2)), stats.std((0, 1, 2))
    del stats
    gen = torch.Generator().manual_seed(seed)
    if n_train is not None and n_train < len(x_tr):
        keep = torch.randperm(len(x_tr), generator=gen)[:n_train].sort().values.numpy()
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if n_test is not None:
        keep = torch.randperm(len(x_te), generator=gen)[:n_test].sort().values.numpy()
        x_te, y_te = x_te[keep], y_te[keep]
    return (cifar10_normalise(x_tr, mean, std), torch.from_numpy(y_tr),
            cifar10_normalise(x_te, mean, std), torch.from_numpy(y_te))
