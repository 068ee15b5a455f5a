"""Fused Gauss-Newton-vector product of an MLP: sum_i J_i^T H_i J_i V in one call.

An MLP here is an ``nn.Sequential`` of ``nn.Linear`` layers (bias optional)
with ReLU / Tanh / Sigmoid (or nothing) between them, the last module a
Linear; a leading ``nn.Flatten`` and ``nn.Identity`` / eval-mode ``nn.Dropout``
anywhere are accepted. :func:`parse_mlp` recognises such a model and returns
its :class:`MlpSpec`; :func:`mlp_unsupported_reason` says why another is not.

The product for a batch x (B, ...) and a block V (d, m), parameters flattened
in the Problem's order (per Linear: weight (out, in) row-major, then bias):

    forward   z_l = a_{l-1} W_l^T + b_l,  a_l = act(z_l),  y = z_L
    tangent   t_l = (act'(z_{l-1}) * t_{l-1}) W_l^T + a_{l-1} dW_l^T + db_l   (t_0 = 0)
    output    u = H_y t_L              (loss kinds of output_hessian.py)
    backward  dW_l = g_l^T a_{l-1},  db_l = sum_b g_l,  g_{l-1} = (g_l W_l) * act'(z_{l-1}),  g_L = u

for all m columns at once, summed (not averaged) over the batch.
:func:`mlp_gnh_product_reference` is that recipe in plain torch matmuls (the
spec); the cpu backend runs it in ``pbrf_fast._C`` (its own blocked GEMM, one
OpenMP team, no Python per layer), the cuda backend in ``pbrf_fast._C_cuda``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import threading

import torch
from torch import nn

from ..errors import InputError
from . import registry
from .output_hessian import output_hessian_product_reference

OP_NAME = "mlp_gnh_product"
# Must match enum ActivationKind in csrc/common/mlp_gnh.h.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class MlpSpec:
    """Widths (L + 1), activation names between layers (L - 1), bias flags (L)."""

    dims: tuple[int, ...]
    activations: tuple[str, ...]
    has_bias: tuple[bool, ...]

    @property
    def layers(self) -> int:
        return len(self.dims) - 1

    def offsets(self) -> list[tuple[int, int | None]]:
        """(weight offset, bias offset or None) of each layer in the flat parameters."""
        out, offset = [], 0
        for l in range(self.layers):
            w = offset
            offset += self.dims[l] * self.dims[l + 1]
            b = offset if self.has_bias[l] else None
            offset += self.dims[l + 1] if self.has_bias[l] else 0
            out.append((w, b))
        return out

    # cached: read on every product (cached_property writes the instance dict, frozen or not)
    @cached_property
    def num_params(self) -> int:
        return sum(self.dims[l] * self.dims[l + 1] + (self.dims[l + 1] if self.has_bias[l] else 0)
                   for l in range(self.layers))

    def kernel_args(self) -> tuple[list[int], list[int], list[int]]:
        return self._kernel_args

    @cached_property
    def _kernel_args(self) -> tuple[list[int], list[int], list[int]]:
        return (list(self.dims), [ACTIVATION_CODES[a] for a in self.activations],
                [int(b) for b in self.has_bias])


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
        if kind is nn.Linear:
            if dims and dims[-1] != m.in_features:
                return None, f"Linear {position} expects {m.in_features} inputs, gets {dims[-1]}"
            if dims:
                activations.append(pending or "identity")
            elif pending is not None:
                return None, "an activation before the first Linear is not supported"
            pending = None
            if not dims:
                dims.append(m.in_features)
            dims.append(m.out_features)
            has_bias.append(m.bias is not None)
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


# Work (multiply-adds of one product: batch x m x parameters) above which torch's
# BLAS beats the fused kernel's own blocked GEMM. Measured on the 2-core AVX-512
# CPU (bench/RESULTS.md): 8-128-128-1 at batch 128 is 4.3x faster fused at m = 1
# (2.2e6) and 1.2x at m = 32 (7.2e7); 784-1024-1024-10 is 0.8x at m = 1 (2.4e8).
# Below the threshold per-call overhead dominates and fusing it away pays.
AUTO_MAX_WORK = 1e8
# From this many columns on, mlp_gnh_product_blas (a few large GEMMs on torch's BLAS)
# beats both the fused kernel and per-column matmuls (8-128-128-1 at m = 16: 2.6 ms
# vs 3.8 fused, 3.2 per-column; 784-1024-1024-10 at m = 8: 110 ms vs 109 and 149).
BLAS_MIN_COLUMNS = 12
# Memory for MLP forward states kept between products: the GNH operator keeps each
# data slice's state across the hundreds of products a solver makes, and the
# native LiSSA engine keeps the forward pass of all training inputs for a solve.
FORWARD_CACHE_BYTES = 512 << 20
BLAS_BATCH_CHUNK = 128


def fused_pays_off(spec: MlpSpec, batch: int, num_vectors: int) -> bool:
    """Whether ``backend="auto"`` should use the fused product for this size."""
    return batch * num_vectors * spec.num_params <= AUTO_MAX_WORK


def mlp_unsupported_reason(model: nn.Module) -> str:
    """Why :func:`parse_mlp` refuses the model ('' if it accepts it)."""
    return _parse(model)[1]


# ---- the reference (spec) ------------------------------------------------------------------------

def _activation(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    if name == "tanh":
        a = torch.tanh(z)
        return a, 1 - a * a
    if name == "sigmoid":
        a = torch.sigmoid(z)
        return a, a * (1 - a)
    return z, torch.ones_like(z)


def _layer_params(spec: MlpSpec, flat: torch.Tensor):
    """Views (weight (..., out, in), bias (..., out) or None) of a flat (..., d) tensor."""
    lead = flat.shape[:-1]
    for l, (w, b) in enumerate(spec.offsets()):
        n_in, n_out = spec.dims[l], spec.dims[l + 1]
        weight = flat[..., w : w + n_out * n_in].reshape(*lead, n_out, n_in)
        bias = flat[..., b : b + n_out] if b is not None else None
        yield weight, bias


def mlp_forward_reference(spec: MlpSpec, theta: torch.Tensor, x: torch.Tensor):
    """(layer inputs a_0..a_{L-1}, slopes act'(z_1..z_{L-1}), outputs y)."""
    a = x.reshape(len(x), -1)
    inputs, slopes = [], []
    params = list(_layer_params(spec, theta))
    for l, (W, b) in enumerate(params):
        inputs.append(a)
        z = a @ W.T
        if b is not None:
            z = z + b
        if l + 1 < spec.layers:
            a, slope = _activation(spec.activations[l], z)
            slopes.append(slope)
        else:
            a = z
    return inputs, slopes, a


def mlp_gnh_product_reference(spec: MlpSpec, loss_kind: str, theta: torch.Tensor, x: torch.Tensor,
                              V: torch.Tensor) -> torch.Tensor:
    """sum over the batch of J_i^T H_i J_i V, V of shape (d,) or (d, m): explicit matmuls."""
    V2 = V.unsqueeze(1) if V.dim() == 1 else V
    inputs, slopes, y = mlp_forward_reference(spec, theta, x)
    params = list(_layer_params(spec, theta))
    tangents = list(_layer_params(spec, V2.T))  # (m, out, in), (m, out)
    t = None
    for l, ((W, _), (dW, db)) in enumerate(zip(params, tangents)):
        term = inputs[l] @ dW.transpose(-1, -2)                      # (m, B, out)
        if t is not None:
            term = term + (t * slopes[l - 1]) @ W.T
        t = term + db.unsqueeze(1) if db is not None else term
    g = output_hessian_product_reference(loss_kind, y, t)
    grads = [None] * spec.layers
    for l in range(spec.layers - 1, -1, -1):
        W = params[l][0]
        dW = g.transpose(-1, -2) @ inputs[l]                          # (m, out, in)
        db = g.sum(1) if spec.has_bias[l] else None
        grads[l] = torch.cat([dW.flatten(1)] + ([db] if db is not None else []), 1)
        if l > 0:
            g = (g @ W) * slopes[l - 1]
    out = torch.cat(grads, 1).T                                       # (d, m)
    return out.reshape(V.shape)


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
    params = list(_layer_params(spec, theta))
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
    params = list(_layer_params(spec, theta))
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


# ---- which implementation computes a GNH product ------------------------------------------------

GNH_PRODUCT = "gnh_product"


def plan_gnh_product(mlp: tuple[MlpSpec | None, str], theta: torch.Tensor, x: torch.Tensor, columns: int,
                     backend: str = "auto", *, layerwise: tuple | None = None) -> registry.Plan:
    """How ``GaussNewton`` computes sum_i J_i^T H_i J_i V over the batch ``x`` for V with
    ``columns`` columns, and why. All implementations are exact; they differ in speed.

    - ``torch.func``: jvp -> output-Hessian product -> vjp, vmapped over the columns
      (any model; the only one for ``backend="torch"`` or a model that is not a supported MLP);
    - ``mlp-blas``: :func:`mlp_gnh_product_blas`, a few large GEMMs on torch's BLAS
      ("auto" from :data:`BLAS_MIN_COLUMNS` columns on);
    - ``mlp-matmul``: :func:`mlp_gnh_product_matmul`, one column at a time on torch's BLAS
      ("auto" for few columns on big layers: more than :data:`AUTO_MAX_WORK` multiply-adds);
    - ``mlp-fused``: :func:`mlp_gnh_product`, the compiled kernel (forward, tangent,
      output Hessian and backward in one call): "auto" for small products, or the
      explicit ``backend="cpu"`` / ``"cuda"``.

    - ``layerwise``: :func:`pbrf_fast.kernels.layerwise_gnh.layerwise_gnh_product`, the exact
      layer-wise product of a conv net (one kept primal pass, one tangent pass over all
      columns, one backward): "auto" for a model that is not a supported MLP but whose
      traced graph has only supported layers (torch ops: CPU or CUDA tensors alike).

    ``mlp``: the model's ``(MlpSpec, "")`` or ``(None, why it is not a supported MLP)``;
    ``layerwise``: ``(LayerwiseSpec, "")`` or ``(None, why not)``, asked only for non-MLPs.
    An explicit compiled backend that cannot serve the product raises BackendUnavailable.
    """
    if backend == "torch":
        return registry.Plan(GNH_PRODUCT, "torch.func", "torch", "backend='torch' requested")
    spec, reason = mlp
    if spec is not None and (x.dim() < 2 or x[0].numel() != spec.dims[0] or x.dtype != theta.dtype):
        spec, reason = None, f"inputs of shape {tuple(x.shape)} and dtype {x.dtype} do not fit the MLP"
    if spec is None:
        if backend != "auto":
            raise registry.BackendUnavailable(f"fused MLP product: {reason}")
        network, why = layerwise or (None, "not asked")
        if network is not None and (tuple(x.shape[1:]) != network.input_shape or x.dtype != theta.dtype):
            network, why = None, f"inputs of shape {tuple(x.shape)} and dtype {x.dtype} do not fit the traced network"
        if network is not None:
            return registry.Plan(GNH_PRODUCT, "layerwise", "torch",
                                 f"not an MLP ({reason}); every traced layer is supported: one kept primal "
                                 f"pass, one tangent pass for all {columns} column(s), one backward")
        return registry.Plan(GNH_PRODUCT, "torch.func", "torch",
                             f"not a supported MLP: {reason}; not a layer-wise network: {why}")
    work = len(x) * columns * spec.num_params
    if backend == "auto":
        if columns >= BLAS_MIN_COLUMNS:
            return registry.Plan(GNH_PRODUCT, "mlp-blas", "torch",
                                 f"{columns} columns >= {BLAS_MIN_COLUMNS}: a few large GEMMs beat the fused kernel")
        if not fused_pays_off(spec, len(x), columns):
            return registry.Plan(GNH_PRODUCT, "mlp-matmul", "torch",
                                 f"{work:.3g} multiply-adds > {AUTO_MAX_WORK:.0e} with {columns} column(s): "
                                 "per-column GEMMs on torch's BLAS beat the fused kernel's")
    kernel = registry.plan_backend(OP_NAME, theta.dtype, theta.device, backend)
    if kernel.backend == "torch":
        return registry.Plan(GNH_PRODUCT, "mlp-matmul", "torch", f"no fused kernel here ({kernel.reason})")
    why = (f"{work:.3g} multiply-adds <= {AUTO_MAX_WORK:.0e}: per-call overhead dominates, fusing it away pays"
           if backend == "auto" else kernel.reason)
    return registry.Plan(GNH_PRODUCT, "mlp-fused", kernel.backend, why)


def run_gnh_product(plan: registry.Plan, spec: MlpSpec, loss_kind: str, theta: torch.Tensor,
                    x: torch.Tensor, V: torch.Tensor, forward=None) -> torch.Tensor:
    """Run an MLP implementation chosen by :func:`plan_gnh_product` (not ``torch.func``,
    which lives with the operator). ``forward``: the batch's forward state, if kept."""
    if plan.implementation == "mlp-fused":
        # the operator has checked V, theta and x (and planned): straight to the kernel
        return _fused(spec, registry.LOSS_KIND_CODES[loss_kind], theta, x, V, plan.backend)
    product = {"mlp-blas": mlp_gnh_product_blas, "mlp-matmul": mlp_gnh_product_matmul}[plan.implementation]
    return product(spec, loss_kind, theta, x, V, forward=forward)


# ---- wrappers ------------------------------------------------------------------------------------

def _check_arguments(spec: MlpSpec, loss_kind: str, theta, x, V) -> None:
    registry.loss_kind_code(loss_kind)
    registry.check_same_dtype_and_device(OP_NAME, theta=theta, x=x, V=V)
    if theta.shape != (spec.num_params,):
        raise InputError(f"{OP_NAME}: theta must have shape ({spec.num_params},), got {tuple(theta.shape)}")
    if V.dim() not in (1, 2) or V.shape[0] != spec.num_params:
        raise InputError(f"{OP_NAME}: V must have shape ({spec.num_params},) or "
                         f"({spec.num_params}, m), got {tuple(V.shape)}")
    if x.dim() < 2 or x[0].numel() != spec.dims[0] or len(x) == 0:
        raise InputError(f"{OP_NAME}: x must have shape (B, ...) with {spec.dims[0]} features "
                         f"per example, got {tuple(x.shape)}")


def plan_mlp_gnh_product(theta: torch.Tensor, x: torch.Tensor, V: torch.Tensor,
                         backend: str = "auto") -> registry.Plan:
    """What :func:`mlp_gnh_product` (the fused kernel's entry point) runs, and why."""
    return registry.plan_backend(OP_NAME, theta.dtype, theta.device, backend,
                                 autograd=registry.needs_autograd(theta, x, V))


def mlp_gnh_product(spec: MlpSpec, loss_kind: str, theta: torch.Tensor, x: torch.Tensor,
                    V: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """sum over the batch x of J_i^T H_i J_i V, same shape as V ((d,) or (d, m)), by the
    fused kernel of ``backend`` (the torch reference under autograd or without one)."""
    _check_arguments(spec, loss_kind, theta, x, V)
    chosen = plan_mlp_gnh_product(theta, x, V, backend).backend
    if chosen == "torch":
        return mlp_gnh_product_reference(spec, loss_kind, theta, x, V)
    return _fused(spec, registry.loss_kind_code(loss_kind), theta, x, V, chosen)


def _fused(spec: MlpSpec, code: int, theta, x, V, backend: str) -> torch.Tensor:
    """The compiled kernel of ``backend`` on checked arguments."""
    vectors = V if V.is_contiguous() else V.contiguous()
    # (B, features) rows as they are: a view op is ~1 us of a ~20 us small product
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(len(x), -1).contiguous()
    out = registry.cuda_scratch(vectors.shape, vectors) if backend == "cuda" else torch.empty_like(vectors)
    registry.implementation(OP_NAME, backend)(spec, code, theta if theta.is_contiguous() else theta.contiguous(),
                                              x2, vectors, out)
    return out


def _columns(vectors: torch.Tensor) -> int:
    return 1 if vectors.dim() == 1 else vectors.shape[1]


_THREAD_ARGS = threading.local()  # per thread: two threads sharing one operator must not share pointers


def _run_cpu(spec, code, theta, x, vectors, out):
    ext = registry.cpu_extension
    # The argument struct is built once per call shape and kept per thread and spec; a product
    # then only writes the pointers that changed (the kept rows and theta stay put product
    # after product). Building it (three lists copied into C++ vectors, twelve keyword fields)
    # was the largest piece of a small product's Python overhead (issue 15).
    m = 1 if vectors.dim() == 1 else vectors.shape[1]
    # x.shape[0], not len(x): Tensor.__len__ is ~1 us of Python here
    key = (id(spec), ext.MlpGnhProductArgs, theta.dtype, code, x.shape[0], m, torch.get_num_threads())
    kept = _THREAD_ARGS.__dict__.setdefault("args", {})
    entry = kept.get(key)
    if entry is None or entry[0] is not spec:
        dims, acts, bias = spec.kernel_args()
        args = registry.extension_args(
            ext.MlpGnhProductArgs, dtype=registry.dtype_name(theta), dims=dims, activations=acts,
            has_bias=bias, loss_kind=code, inputs=0, theta=0, vectors=0, out=0, batch=len(x),
            num_vectors=m, threads=torch.get_num_threads())
        if len(kept) > 16:  # a few shapes per operator in practice; never grow without bound
            kept.clear()
        entry = kept[key] = [spec, args, 0, 0]  # the spec (id(spec) alone could be reused), pointers set
    args = entry[1]
    inputs, weights = x.data_ptr(), theta.data_ptr()
    if entry[2] != inputs:
        args.inputs = entry[2] = inputs
    if entry[3] != weights:
        args.theta = entry[3] = weights
    args.vectors, args.out = vectors.data_ptr(), out.data_ptr()
    ext.mlp_gnh_product(args)


def _run_cuda(spec, code, theta, x, vectors, out):
    dims, acts, bias = spec.kernel_args()
    m = _columns(vectors)
    ext = registry.cuda_extension
    workspace = registry.cuda_scratch(ext.mlp_gnh_workspace_elements(dims, len(x), m), theta)
    transposed = registry.cuda_scratch(2 * m * spec.num_params if m > 1 else 1, theta)
    device, stream = registry.cuda_launch_args(theta)
    ext.mlp_gnh_product(registry.extension_args(
        ext.MlpGnhProductArgs, dtype=registry.dtype_name(theta), dims=dims, activations=acts,
        has_bias=bias, loss_kind=code, inputs=x.data_ptr(), theta=theta.data_ptr(),
        vectors=vectors.data_ptr(), out=out.data_ptr(), batch=len(x),
        num_vectors=m, transposed=transposed.data_ptr(), workspace=workspace.data_ptr(),
        workspace_elements=workspace.numel(), device=device, stream=stream))


registry.register(OP_NAME, "torch", mlp_gnh_product_reference)
if registry.cpu_extension is not None and hasattr(registry.cpu_extension, "mlp_gnh_product"):
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)
