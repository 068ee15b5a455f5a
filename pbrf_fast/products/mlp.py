"""The MLP paths of the exact GNH product, on torch's BLAS, and which models they serve.

An MLP here is an ``nn.Sequential`` of Linear layers (bias optional) with ReLU / Tanh /
Sigmoid (or nothing) between them, the last module a Linear; a leading ``nn.Flatten`` and
``nn.Identity`` / eval-mode ``nn.Dropout`` anywhere are accepted. :func:`parse_mlp`
recognises such a model and returns its :class:`~pbrf_fast.kernels.mlp_gnh.MlpSpec`;
:func:`mlp_unsupported_reason` says why another is not.

The recipe (forward, tangent, output Hessian, backward) and its torch reference are the
compiled op's, in :mod:`pbrf_fast.kernels.mlp_gnh`; here it is laid out for torch's BLAS:
:func:`mlp_gnh_product_blas` for many columns, :func:`mlp_gnh_product_matmul` for few.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.mlp_gnh import MlpSpec, layer_parameters, mlp_forward_reference
from ..kernels.output_hessian import output_hessian_product_reference
from ..layers import adapter_for

__all__ = ["BLAS_MIN_COLUMNS", "forward_state_bytes", "mlp_gnh_product_blas", "mlp_gnh_product_matmul", "mlp_unsupported_reason",
           "parse_mlp"]

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def _flatten_sequential(module: nn.Module, out: list) -> None:
    for child in module.children():
        if type(child) is nn.Sequential:
            _flatten_sequential(child, out)
        else:
            out.append(child)


def _parse(model: nn.Module) -> tuple[MlpSpec | None, str]:
    if not isinstance(model, nn.Sequential):
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential"
    modules: list[nn.Module] = []
    _flatten_sequential(model, modules)
    for m in [model, *model.modules()]:
        if m._forward_hooks or m._forward_pre_hooks:
            return None, f"{type(m).__name__} has forward hooks"
    dims: list[int] = []
    activations: list[str] = []
    has_bias: list[bool] = []
    pending: str | None = None  # activation seen since the last Linear
    for position, m in enumerate(modules):
        kind = type(m)
        if kind is nn.Identity:
            continue
        if kind is nn.Dropout:
            if m.training:
                return None, "nn.Dropout in training mode is random"
            continue
        if kind is nn.Flatten:
            if dims or m.start_dim != 1 or m.end_dim != -1:
                return None, "nn.Flatten is supported only before the first Linear, as Flatten(1, -1)"
            continue
        adapter, _ = adapter_for(m)
        if adapter is not None and adapter.kind == "linear":
            n_in, n_out = adapter.in_features, adapter.out_features
            if dims and dims[-1] != n_in:
                return None, f"Linear {position} expects {n_in} inputs, gets {dims[-1]}"
            if dims:
                activations.append(pending or "identity")
            elif pending is not None:
                return None, "an activation before the first Linear is not supported"
            pending = None
            if not dims:
                dims.append(n_in)
            dims.append(n_out)
            has_bias.append(adapter.has("bias"))
            for name, p in m.named_parameters():
                if not p.requires_grad:
                    return None, f"Linear {position} has a frozen {name}"
            continue
        if kind in _ACTIVATION_MODULES:
            if not dims:
                return None, "an activation before the first Linear is not supported"
            if pending is not None:
                return None, "two activations in a row are not supported"
            pending = _ACTIVATION_MODULES[kind]
            continue
        return None, (f"{kind.__name__} (module {position}) is not supported: only Linear, "
                      f"ReLU, Tanh, Sigmoid, Identity, eval-mode Dropout and a leading Flatten")
    if not dims:
        return None, "the model has no Linear layer"
    if pending is not None:
        return None, "the last module must be a Linear (an output activation belongs in the loss)"
    return MlpSpec(tuple(dims), tuple(activations), tuple(has_bias)), ""


def parse_mlp(model: nn.Module) -> MlpSpec | None:
    """The model's :class:`MlpSpec`, or None if it is not a supported MLP
    (:func:`mlp_unsupported_reason` says why)."""
    return _parse(model)[0]


def mlp_unsupported_reason(model: nn.Module) -> str:
    """Why :func:`parse_mlp` refuses the model ('' if it accepts it)."""
    return _parse(model)[1]


# From this many columns on, mlp_gnh_product_blas (a few large GEMMs on torch's BLAS)
# beats both the fused kernel and per-column matmuls (8-128-128-1 at m = 16: 2.6 ms
# vs 3.8 fused, 3.2 per-column; 784-1024-1024-10 at m = 8: 110 ms vs 109 and 149).
BLAS_MIN_COLUMNS = 12
BLAS_BATCH_CHUNK = 128


def mlp_gnh_product_blas(spec: MlpSpec, loss_kind: str, theta: torch.Tensor, x: torch.Tensor,
                         V: torch.Tensor, forward=None) -> torch.Tensor:
    """The same product as :func:`mlp_gnh_product_reference`, laid out for BLAS.

    Tangents and back-propagated vectors are kept as (width, batch, m), so every
    step is one large GEMM or a GEMM batched over a layer's output units that
    reads the (out, in, m) block of V -- a row slice of the (d, m) matrix -- in
    place, and writes the weight gradient straight into the (d, m) result. The
    reference instead runs m small GEMMs per layer on transposed copies. The
    batch is taken :data:`BLAS_BATCH_CHUNK` rows at a time so the (width, rows, m)
    intermediates stay cache-sized (3x faster than one pass at batch 1024, m = 100).
    This is what ``GaussNewton(backend="auto")`` uses for MLP products with many
    columns (:data:`BLAS_MIN_COLUMNS`); on CUDA it runs on cuBLAS.
    ``forward``: this batch's :func:`mlp_forward_reference`, if already known.
    """
    V2 = (V.unsqueeze(1) if V.dim() == 1 else V).contiguous()
    chunk = len(x) if x.is_cuda else BLAS_BATCH_CHUNK
    forward = forward or mlp_forward_reference(spec, theta, x)
    out = None
    for c0 in range(0, len(x), chunk):
        part = _blas_product(spec, loss_kind, theta, _forward_rows(forward, c0, c0 + chunk), V2)
        out = part if out is None else out.add_(part)
    if out is None:
        out = torch.zeros_like(V2)
    return out.reshape(V.shape)


def _forward_rows(forward, start, stop):
    """Rows [start, stop) of a forward state (views)."""
    inputs, slopes, y = forward
    return [a[start:stop] for a in inputs], [s[start:stop] for s in slopes], y[start:stop]


def _blas_product(spec, loss_kind, theta, forward, V2):
    m = V2.shape[1]
    inputs, slopes, y = forward
    batch = len(inputs[0])
    params = list(layer_parameters(spec, theta))
    offsets = spec.offsets()
    t = None                                                          # (width, batch, m)
    for l, (W, _) in enumerate(params):
        w, b = offsets[l]
        n_in, n_out = spec.dims[l], spec.dims[l + 1]
        term = torch.matmul(inputs[l], V2[w : w + n_out * n_in].view(n_out, n_in, m))  # (out, batch, m)
        if t is not None:
            t.mul_(slopes[l - 1].T.unsqueeze(-1))
            term.view(n_out, batch * m).addmm_(W, t.view(n_in, batch * m))
        if b is not None:
            term.add_(V2[b : b + n_out].unsqueeze(1))
        t = term
    # the loss's output Hessian works on (..., batch, C): (m, batch, C) is a view of t
    g = output_hessian_product_reference(loss_kind, y, t.permute(2, 1, 0)).permute(2, 1, 0)
    out = torch.empty_like(V2)
    for l in range(spec.layers - 1, -1, -1):
        W = params[l][0]
        w, b = offsets[l]
        n_in, n_out = spec.dims[l], spec.dims[l + 1]
        torch.matmul(inputs[l].T, g, out=out[w : w + n_out * n_in].view(n_out, n_in, m))
        if b is not None:
            torch.sum(g, 1, out=out[b : b + n_out])
        if l > 0:
            g = (W.T @ g.reshape(n_out, batch * m)).view(n_in, batch, m).mul_(slopes[l - 1].T.unsqueeze(-1))
    return out


def mlp_gnh_product_matmul(spec: MlpSpec, loss_kind: str, theta: torch.Tensor, x: torch.Tensor,
                           V: torch.Tensor, forward=None) -> torch.Tensor:
    """The same product for few columns: one column at a time in the (batch, width)
    layout, sharing one forward pass, each weight gradient written by its GEMM
    straight into its column (the reference concatenates and transposes copies of
    the d-vectors, which for a 1.9M-parameter MLP cost as much as a layer's GEMM).
    ``forward``: this batch's :func:`mlp_forward_reference`, if already known.
    """
    V2 = V.unsqueeze(1) if V.dim() == 1 else V
    m = V2.shape[1]
    inputs, slopes, y = forward or mlp_forward_reference(spec, theta, x)
    params = list(layer_parameters(spec, theta))
    offsets = spec.offsets()
    result = torch.empty_like(V2)
    for k in range(m):
        # one contiguous column at a time: its weight blocks are plain matrices (a
        # column copy is 10x cheaper than transposing the whole (d, m) block)
        v = V2[:, k].contiguous()
        o = result[:, 0] if m == 1 else torch.empty_like(v)
        t = None
        for l, (W, _) in enumerate(params):
            w, b = offsets[l]
            n_in, n_out = spec.dims[l], spec.dims[l + 1]
            term = inputs[l] @ v[w : w + n_out * n_in].view(n_out, n_in).T   # (batch, out)
            if t is not None:
                term.addmm_(t.mul_(slopes[l - 1]), W.T)
            if b is not None:
                term.add_(v[b : b + n_out])
            t = term
        g = output_hessian_product_reference(loss_kind, y, t)
        for l in range(spec.layers - 1, -1, -1):
            W = params[l][0]
            w, b = offsets[l]
            n_in, n_out = spec.dims[l], spec.dims[l + 1]
            torch.mm(g.T, inputs[l], out=o[w : w + n_out * n_in].view(n_out, n_in))
            if b is not None:
                torch.sum(g, 0, out=o[b : b + n_out])
            if l > 0:
                g = (g @ W).mul_(slopes[l - 1])
        if m > 1:
            result[:, k] = o
    return result.reshape(V.shape)


def forward_state_bytes(state) -> int:
    """Memory a kept :func:`~pbrf_fast.kernels.mlp_gnh.mlp_forward_reference` state holds (the
    first layer's input is a view of the data, not counted)."""
    inputs, slopes, y = state
    return sum(a.numel() * a.element_size() for a in [*inputs[1:], *slopes, y])
