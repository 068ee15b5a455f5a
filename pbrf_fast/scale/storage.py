"""Atomic writes for tensors and arrays, and a guard that keeps a results folder
from mixing files made with different arguments."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_json

__all__ = ["atomic_save_tensor", "atomic_save_npy", "load_tensor", "ArgumentMismatch", "guard_arguments",
           "open_memmap"]


def _atomic(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_tensor(path, obj) -> Path:
    """torch.save to a temporary file in the same folder, then rename."""
    return _atomic(path, lambda handle: torch.save(obj, handle))


def atomic_save_npy(path, array: np.ndarray) -> Path:
    return _atomic(path, lambda handle: np.save(handle, np.asarray(array)))


def load_tensor(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def open_memmap(path, shape, dtype=np.float32, create: bool = False) -> np.memmap:
    """The score matrix as an .npy memmap; created zero-filled (atomically) when asked."""
    path = Path(path)
    if create and not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
        os.replace(tmp, path)
    mm = np.lib.format.open_memmap(path, mode="r+")
    if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
        raise ValueError(f"{path} holds {mm.dtype}{mm.shape}, expected {np.dtype(dtype)}{tuple(shape)}")
    return mm


class ArgumentMismatch(RuntimeError):
    """A results folder was made with arguments that would change the results."""


def guard_arguments(out_dir, arguments: dict, result_keys, overwrite: bool = False) -> Path:
    """Write ``arguments.json`` into ``out_dir``, or check the one already there.

    Only ``result_keys`` must agree (progress bars, thread counts and the like
    may change between runs). With ``overwrite`` the folder's old contents are
    deleted instead of refusing.
    """
    out_dir = Path(out_dir)
    path = out_dir / "arguments.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = {k: (old.get(k), arguments.get(k)) for k in result_keys
                   if json.dumps(old.get(k), default=str, sort_keys=True)
                   != json.dumps(arguments.get(k), default=str, sort_keys=True)}
        if changed and not overwrite:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ArgumentMismatch(f"{out_dir} holds results made with other arguments ({detail}); "
                                   "use another --out or overwrite=True")
        if changed:
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    atomic_write_json(path, json.loads(json.dumps(arguments, default=str)))
    return path
