"""Atomic result files: write to a temporary name in the same folder, then rename,
so a crash never leaves a half-written result that a resume would trust.

The one place pbrf_fast writes results: text and JSON, torch objects, and the
zero-filled ``.npy`` memmaps that long jobs fill in place chunk by chunk.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import InputError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_save_tensor", "load_tensor",
           "open_memmap"]


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb") -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync, then rename it
    to ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def atomic_save_tensor(path: str | os.PathLike, obj) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_tensor(path: str | os.PathLike):
    """What :func:`atomic_save_tensor` wrote, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def open_memmap(path: str | os.PathLike, shape, dtype=np.float32, create: bool = False) -> np.memmap:
    """An ``.npy`` memmap of ``shape``; created zero-filled (atomically) when asked and missing.

    An existing file of another shape or dtype is refused: it belongs to another run.
    """
    path = Path(path)
    if create and not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
        os.replace(tmp, path)
    mm = np.lib.format.open_memmap(path, mode="r+")
    if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
        raise InputError(f"{path} holds {mm.dtype}{mm.shape}, expected {np.dtype(dtype)}{tuple(shape)}")
    return mm
