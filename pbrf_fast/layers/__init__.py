"""One adapter per layer type: how a layer's parameters relate to its inputs and output gradients.

Every part of the library that works layer by layer -- Kronecker factors (K-FAC, EK-FAC),
per-example Jacobian rows (output-space solver), score contraction (scale pipeline),
the layer-wise and MLP Gauss-Newton products, ``explain`` -- asks :func:`adapter_for` for a
module's :class:`~pbrf_fast.layers.base.LayerAdapter` instead of testing module types
itself. Adding a layer type is one module here (an adapter subclass registered with
:func:`register_adapter`) plus its tests in tests/test_layers.py.

The parameter convention every adapter shares: a layer has the roles ``"weight"`` and
``"bias"`` (either may be absent or frozen); a Kronecker-factored layer's parameters read as
one (out, in') matrix whose last column is the bias, i.e. the bias is a last input
coordinate equal to one.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..autodiff import unfused_attention

from .base import LayerAdapter
from .batchnorm import BatchNormAdapter
from .conv2d import Conv2dAdapter
from .linear import LinearAdapter

__all__ = ["ADAPTERS", "LayerAdapter", "adapter_for", "parameter_slots", "forward_hooks", "register_adapter",
           "unreadable_modules"]

# module type -> adapter class; exact types, so a subclass with its own forward is not
# mistaken for the layer it extends (it is "unsupported", and callers fall back)
ADAPTERS: dict[type, type[LayerAdapter]] = {}


def register_adapter(adapter: type[LayerAdapter]) -> type[LayerAdapter]:
    for module_type in adapter.module_types:
        ADAPTERS[module_type] = adapter
    return adapter


for _adapter in (LinearAdapter, Conv2dAdapter, BatchNormAdapter):
    register_adapter(_adapter)


def adapter_for(module: nn.Module) -> tuple[LayerAdapter | None, str]:
    """(the module's adapter, "") or (None, why it has none)."""
    adapter = ADAPTERS.get(type(module))
    if adapter is None:
        return None, f"{type(module).__name__} has no layer adapter"
    why = adapter.unsupported_reason(module)
    return (None, why) if why else (adapter(module), "")


def parameter_slots(module_name: str, module: nn.Module, offsets: dict) -> dict:
    """role -> (lo, hi) of the module's own trainable parameters in the flat theta
    (``offsets``: the Problem's ``param_ranges``); frozen or absent roles are left out."""
    prefix = f"{module_name}." if module_name else ""
    return {role: offsets[prefix + role] for role in LayerAdapter.roles
            if getattr(module, role, None) is not None and prefix + role in offsets}


@contextlib.contextmanager
def forward_hooks(modules, hook):
    """``hook`` registered as a forward hook on every module while the block runs."""
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def unreadable_modules(problem, modules) -> dict:
    """id -> why, for the ``modules`` whose inputs forward hooks cannot read per example: one
    whose forward never runs (its weight used functionally, as nn.MultiheadAttention uses
    ``out_proj``), or one whose input does not have the example dimension first (a Linear on a
    sequence-first (T, b, E) tensor: its rows are positions, not examples). Probed on two copies
    of the first example. nn.MultiheadAttention reads its own layout and is not layout-checked."""
    rows = {}
    x = problem.inputs[:1]
    x = torch.cat([x, x])
    # fused attention off, as in the passes that rely on the hooks (they run with gradients,
    # where torch never takes its fused fast paths, which skip the submodules' forwards)
    with forward_hooks(modules, lambda m, i, o: rows.setdefault(id(m), []).append(i[0].shape[0] if i and
                                                                                  hasattr(i[0], "shape") else 2)), \
            torch.no_grad(), unfused_attention():
        problem.forward(problem.theta, x)
    why = {}
    for module in modules:
        if id(module) not in rows:
            why[id(module)] = ("its forward never runs (its weight is used functionally, as nn.MultiheadAttention "
                               "uses out_proj), so no hook sees its inputs")
        elif not isinstance(module, nn.MultiheadAttention) and any(r != 2 for r in rows[id(module)]):
            why[id(module)] = ("its input does not have the example dimension first (a sequence-first layout?), "
                               "so hooks cannot read it per example")
    return why
