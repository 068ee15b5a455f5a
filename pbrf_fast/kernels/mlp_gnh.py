"""Fused Gauss-Newton-vector product of an MLP: sum_i J_i^T H_i J_i V in one call.

An MLP here is an ``nn.Sequential`` of ``nn.Linear`` layers (bias optional)
with ReLU / Tanh / Sigmoid (or nothing) between them, the last module a
Linear; a leading ``nn.Flatten`` and ``nn.Identity`` / eval-mode ``nn.Dropout``
anywhere are accepted. :func:`pbrf_fast.products.mlp.parse_mlp` recognises such a model and returns
its :class:`MlpSpec`.

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

from ..errors import InputError
from . import registry
from .output_hessian import output_hessian_product_reference

OP_NAME = "mlp_gnh_product"
# Must match enum ActivationKind in csrc/common/mlp_gnh.h.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}


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


# Work (multiply-adds of one product: batch x m x parameters) above which torch's
# BLAS beats the fused kernel's own blocked GEMM. Measured on the 2-core AVX-512
# CPU (bench/RESULTS.md): 8-128-128-1 at batch 128 is 4.3x faster fused at m = 1
# (2.2e6) and 1.2x at m = 32 (7.2e7); 784-1024-1024-10 is 0.8x at m = 1 (2.4e8).
# Below the threshold per-call overhead dominates and fusing it away pays.
AUTO_MAX_WORK = 1e8


def fused_pays_off(spec: MlpSpec, batch: int, num_vectors: int) -> bool:
    """Whether ``backend="auto"`` should use the fused product for this size."""
    return batch * num_vectors * spec.num_params <= AUTO_MAX_WORK


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


def layer_parameters(spec: MlpSpec, flat: torch.Tensor):
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
    params = list(layer_parameters(spec, theta))
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
    params = list(layer_parameters(spec, theta))
    tangents = list(layer_parameters(spec, V2.T))  # (m, out, in), (m, out)
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
    return fused_product(spec, registry.loss_kind_code(loss_kind), theta, x, V, chosen)


def fused_product(spec: MlpSpec, code: int, theta, x, V, backend: str) -> torch.Tensor:
    """The compiled kernel of ``backend`` on checked arguments (the GNH operator checks and
    plans once, then calls this directly)."""
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
