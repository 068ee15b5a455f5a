"""Model builders used by the examples, benchmarks and experiments."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["mlp"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int, activation: str = "relu", seed: int | None = None,
        dtype=torch.float32) -> nn.Sequential:
    """Linear layers of the given widths with one activation between them."""
    if seed is not None:
        torch.manual_seed(seed)
    layers, width = [], d_in
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers).to(dtype)
