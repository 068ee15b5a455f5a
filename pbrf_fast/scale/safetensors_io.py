"""The score matrix in the safetensors format, without the safetensors package.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian bytes. Arrays are
written in row blocks, so a memory-mapped matrix larger than memory is fine.
"""
from __future__ import annotations

import json

import numpy as np

from ..atomic_io import atomic_write

__all__ = ["save_safetensors", "load_safetensors"]

_DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64"}
_BLOCK_BYTES = 64 << 20


def save_safetensors(path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    header, offset = {}, 0
    for name, array in arrays.items():
        if array.dtype not in _DTYPES:
            raise ValueError(f"safetensors: no code for dtype {array.dtype} of {name!r}")
        size = array.size * array.dtype.itemsize
        header[name] = {"dtype": _DTYPES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def write(handle):
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for array in arrays.values():
            rows = max(1, _BLOCK_BYTES // max(array[:1].nbytes, 1)) if array.ndim else 1
            for start in range(0, max(len(array), 1) if array.ndim else 1, rows):
                block = array[start:start + rows] if array.ndim else array
                handle.write(np.ascontiguousarray(block, dtype=array.dtype.newbyteorder("<")).tobytes())

    return atomic_write(path, write, size=8 + len(text) + offset)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Read what :func:`save_safetensors` wrote (for tests and small files)."""
    data = open(path, "rb").read()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    base = 8 + length
    names = {v: k for k, v in _DTYPES.items()}
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        out[name] = np.frombuffer(data[base + start:base + stop], dtype=names[entry["dtype"]]).reshape(entry["shape"])
    return out
