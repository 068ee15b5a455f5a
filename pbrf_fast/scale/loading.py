"""The user's model and data from the command line: ``path/to/file.py:make_model`` or
``package.module:make_model``, and a ``data.pt`` / ``data.npz`` file holding
``x_train``, ``y_train``, ``x_test``, ``y_test``."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError

__all__ = ["load_model_factory", "build_user_model", "load_data_file", "DATA_KEYS"]

DATA_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_model_factory(spec: str):
    """The callable named by ``file.py:function`` or ``module:function``."""
    if ":" not in spec:
        raise InputError(f"--model {spec!r}: expected path/to/file.py:make_model or package.module:make_model")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"--model {spec!r}: {path} does not exist")
        module_name = f"pbrf_fast_user_model_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # so pickling / dataclasses inside it work
        try:
            loader.loader.exec_module(module)
        except Exception as exc:
            raise InputError(f"--model {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise InputError(f"--model {spec!r}: cannot import {where}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(f"--model {spec!r}: {where} has no callable {name!r}")
    return factory


def build_user_model(spec: str) -> nn.Module:
    factory = load_model_factory(spec)
    try:
        model = factory()
    except Exception as exc:  # the user's own code: name it, keep its traceback as the cause
        raise InputError(f"--model {spec!r}: calling {spec.rpartition(':')[2]}() raised "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_data_file(path) -> dict[str, torch.Tensor]:
    """``x_train``, ``y_train``, ``x_test``, ``y_test`` from a torch-saved dict or an .npz."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path} does not exist")
    if path.suffix == ".npy":
        raise InputError(f"--data {path}: a .npy file holds one array; save the four as "
                         f"np.savez('data.npz', {', '.join(f'{k}={k}' for k in DATA_KEYS)})")
    if path.suffix == ".npz":
        try:
            with np.load(path) as archive:
                data = {k: torch.from_numpy(archive[k]) for k in archive.files}
        except Exception as exc:
            raise InputError(f"--data {path} is not a readable .npz ({type(exc).__name__}: {exc})") from exc
    else:
        data = _load_torch_data(path)
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise InputError(f"--data {path} lacks {missing}; it must hold {list(DATA_KEYS)}")
    out = {k: torch.as_tensor(data[k]) for k in DATA_KEYS}
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise InputError(f"--data {path}: x_{split} has {len(out[f'x_{split}'])} rows, "
                             f"y_{split} {len(out[f'y_{split}'])}")
    return out


def _load_torch_data(path: Path) -> dict:
    """A torch-saved dict of tensors; numpy arrays inside it are read too (the way many people
    write data.pt), everything else gets a message that says how to save the file."""
    how = (f"save it as torch.save({{{', '.join(f'{k!r}: torch.as_tensor({k})' for k in DATA_KEYS)}}}, "
           f"'{path.name}') or as np.savez('data.npz', ...)")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"--data {path} cannot be read as a dict of tensors ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); {how}") from exc
    if not isinstance(data, dict):
        raise InputError(f"--data {path} holds a {type(data).__name__}, expected a dict of tensors; {how}")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in data.items()}


# What a pickled numpy array refers to: allowed for torch.load(weights_only=True), nothing else.
# The reconstructor is taken from an array's own pickle recipe (its module moved in numpy 2).
_NUMPY_GLOBALS = [np.ndarray, np.dtype, np.zeros(1).__reduce__()[0],
                  *{type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32",
                                                "int64", "uint8", "bool")}]
