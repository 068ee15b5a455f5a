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
    model = load_model_factory(spec)()
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_data_file(path) -> dict[str, torch.Tensor]:
    """``x_train``, ``y_train``, ``x_test``, ``y_test`` from a torch-saved dict or an .npz."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as archive:
            data = {k: torch.from_numpy(archive[k]) for k in archive.files}
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise InputError(f"--data {path} holds a {type(data).__name__}, expected a dict of tensors")
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise InputError(f"--data {path} lacks {missing}; it must hold {list(DATA_KEYS)}")
    out = {k: torch.as_tensor(data[k]) for k in DATA_KEYS}
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise InputError(f"--data {path}: x_{split} has {len(out[f'x_{split}'])} rows, "
                             f"y_{split} {len(out[f'y_{split}'])}")
    return out
