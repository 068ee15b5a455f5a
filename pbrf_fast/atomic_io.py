"""Atomic result files: write to a temporary name in the same folder, then rename,
so a crash never leaves a half-written result that a resume would trust.

The one place pbrf_fast writes results: text and JSON, torch objects, and the
zero-filled ``.npy`` memmaps that long jobs fill in place chunk by chunk.

A disk that fills up or refuses writes is a named error (:class:`NoSpaceError`,
:class:`ResultsWriteError`) naming the folder and the space needed, never a raw
``OSError`` about a hidden temporary file: free space is checked before a file of known
size is written, and memmaps are allocated at full size before they are renamed into
place, so a full disk fails there and not later as a SIGBUS inside a memmap write.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import InputError, NoSpaceError, ResultsWriteError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_save_tensor", "load_tensor",
           "open_memmap", "make_folder", "check_free_space"]

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _no_space(path: Path, needed: str) -> NoSpaceError:
    free = _free(path.parent)
    return NoSpaceError(f"no space left in {path.parent} for {path.name}: it needs {needed}, "
                        f"{'an unknown amount' if free is None else _bytes(free)} free; free space there (or "
                        "choose another --out) and rerun the same command to resume")


def _disk_error(exc: OSError, path: Path, needed: str, verb: str = "write") -> ResultsWriteError | None:
    """``exc`` as the named error a user can act on, or None when it is not about the disk."""
    if exc.errno in _NO_SPACE:
        return _no_space(path, needed)
    if exc.errno in _NOT_WRITABLE:
        return ResultsWriteError(f"cannot {verb} {path.name} in {path.parent}: {exc.strerror} (a read-only folder "
                                 "or one owned by someone else); make it writable or choose another --out")
    return None


def make_folder(path: str | os.PathLike) -> Path:
    """``path`` created with its parents; a folder that cannot be made is a named error."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = _disk_error(exc, path, "a folder", verb="make the folder")
        if error is None:
            raise
        raise error from exc
    return path


def check_free_space(path: str | os.PathLike, size: int) -> None:
    """Refuse, before writing, a file of ``size`` bytes that the disk under ``path`` cannot hold."""
    path = Path(path)
    free = _free(path.parent)
    if free is not None and free < size:
        raise _no_space(path, _bytes(size))


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb", size: int | None = None) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync, then rename it
    to ``path``. On any failure the temporary file is removed and ``path`` is untouched.
    ``size``: the bytes it will write, when known (checked against the free space first)."""
    path = make_folder(Path(path).parent) / Path(path).name
    if size is not None:
        check_free_space(path, size)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = os.path.getsize(tmp) if tmp is not None and os.path.exists(tmp) else 0
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        error = _disk_error(exc, path, _bytes(size) if size is not None else f"more than {_bytes(written)}") \
            if isinstance(exc, OSError) else None
        if error is None:
            raise
        raise error from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode()
    return atomic_write(path, lambda handle: handle.write(data), size=len(data))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples): what torch.save needs at least."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def atomic_save_tensor(path: str | os.PathLike, obj) -> Path:
    """``torch.save(obj)`` to ``path``, atomically (its tensors' bytes checked against the free space first)."""
    check_free_space(make_folder(Path(path).parent) / Path(path).name, _tensor_bytes(obj))
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_tensor(path: str | os.PathLike):
    """What :func:`atomic_save_tensor` wrote, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _allocate(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of real disk blocks, reading as zeros. A sparse file would
    let a full disk surface as SIGBUS at some later memmap write; allocating now makes it an
    error here, before the file has its final name."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    os.ftruncate(fd, size)  # no fallocate here (macOS, some network disks): the free-space check must do


def open_memmap(path: str | os.PathLike, shape, dtype=np.float32, create: bool = False) -> np.memmap:
    """An ``.npy`` memmap of ``shape``; created zero-filled (atomically, every block allocated,
    after checking the free space) when asked and missing.

    An existing file of another shape or dtype is refused: it belongs to another run.
    """
    path = Path(path)
    if create and not path.exists():
        make_folder(path.parent)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(int(n) for n in shape)}
        data_bytes = int(np.prod(header["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
        size = data_bytes + 128  # the .npy header of a small shape
        check_free_space(path, size)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.lib.format.write_array_header_1_0(handle, header)
                handle.flush()
                _allocate(handle.fileno(), handle.tell() + data_bytes)
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if tmp.exists():
                tmp.unlink()
            error = _disk_error(exc, path, _bytes(size))
            if error is None:
                raise
            raise error from exc
    mm = np.lib.format.open_memmap(path, mode="r+")
    if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
        raise InputError(f"{path} holds {mm.dtype}{mm.shape}, expected {np.dtype(dtype)}{tuple(shape)}")
    return mm
