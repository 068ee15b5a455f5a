"""Output-Hessian product H_y u for the three convex output-space losses.

The reference :func:`output_hessian_product_reference` is the spec; the cpu,
cuda and triton backends must match it. Shapes: logits (B, C); vectors
(..., B, C) with any leading dims (M vectors per example, flattened).

- mse (1/2 ||y - t||^2): H_y = I, the product is a copy.
- cross_entropy: H_y u = p * u - p (p^T u), p = softmax(y); the C x C matrix
  diag(p) - p p^T is never formed.
- bce (sigmoid, with logits): H_y u = sigma(y) sigma(-y) * u.
"""
from __future__ import annotations

import functools

import torch

from ..errors import InputError
from . import registry

OP_NAME = "output_hessian_product"


def output_hessian_product_reference(loss_kind: str, logits: torch.Tensor,
                                     vectors: torch.Tensor) -> torch.Tensor:
    registry.loss_kind_code(loss_kind)
    return _hessian_times(loss_kind, logits, vectors)


def _hessian_times(loss_kind: str, logits: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The reference's arithmetic, on checked arguments."""
    if loss_kind == "mse":
        return vectors.clone()
    if loss_kind == "cross_entropy":
        p = torch.softmax(logits, dim=-1)  # max-subtracted internally
        return p * (vectors - (p * vectors).sum(-1, keepdim=True))
    # sigma(y) sigma(-y) instead of sigma (1 - sigma): no cancellation near sigma = 1.
    weight = torch.sigmoid(logits) * torch.sigmoid(-logits)
    return weight * vectors


def _check_arguments(loss_kind, logits, vectors) -> int:
    code = registry.loss_kind_code(loss_kind)
    registry.check_same_dtype_and_device(OP_NAME, logits=logits, vectors=vectors)
    if logits.dim() != 2:
        raise InputError(f"{OP_NAME}: logits must have shape (B, C), got {tuple(logits.shape)}")
    if vectors.dim() < 2 or vectors.shape[-2:] != logits.shape:
        raise InputError(f"{OP_NAME}: vectors must have shape (..., B, C) = (..., "
                         f"{logits.shape[0]}, {logits.shape[1]}), got {tuple(vectors.shape)}")
    return code


def plan_output_hessian_product(logits: torch.Tensor, vectors: torch.Tensor,
                                backend: str = "auto") -> registry.Plan:
    """What :func:`output_hessian_product` runs for these tensors, and why: the
    compiled kernel of their device, or the differentiable reference under autograd."""
    return registry.plan_backend(OP_NAME, logits.dtype, logits.device, backend,
                                 autograd=registry.needs_autograd(logits, vectors))


def output_hessian_product(loss_kind: str, logits: torch.Tensor, vectors: torch.Tensor, *,
                           backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """H_y u for every example and every vector, shape of `vectors`.

    backend: "auto", "torch", "cpu", "cuda" or "triton" (see pbrf_fast.backends()).
    out: optional contiguous buffer of `vectors`' shape to write into.
    The torch backend is differentiable; compiled backends are forward-only, so
    "auto" picks torch when an input requires grad.
    """
    code = _check_arguments(loss_kind, logits, vectors)
    chosen = plan_output_hessian_product(logits, vectors, backend).backend
    if out is not None:
        registry.check_output_buffer(OP_NAME, "out", out, vectors, tuple(vectors.shape))
    if chosen == "torch":
        result = output_hessian_product_reference(loss_kind, logits, vectors)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(vectors.shape, dtype=vectors.dtype, device=vectors.device)
    if out.numel() == 0:
        return out
    # Non-contiguous inputs are copied once; the kernels index rows directly.
    logits, vectors = logits.contiguous(), vectors.contiguous()
    registry.implementation(OP_NAME, chosen)(code, logits, vectors, out)
    return out


def bind_output_hessian_product(loss_kind: str, logits: torch.Tensor, vectors: torch.Tensor,
                                backend: str = "auto"):
    """H_y u as a function ``(logits, targets, vectors)`` -- a Loss's ``hvp`` signature, the
    targets unused -- for repeated calls on tensors of these tensors' dtype and device: the loss
    kind is checked, the backend chosen and (on "cpu") the kernel's fixed arguments bound once,
    so a solver's hundreds of products skip all three and go from here straight to the kernel."""
    code = registry.loss_kind_code(loss_kind)
    chosen = plan_output_hessian_product(logits, vectors, backend).backend
    if chosen == "torch":
        def product(logits, targets, vectors):
            return _hessian_times(loss_kind, logits, vectors)

        return product
    launch = _cpu_launcher(code, registry.dtype_name(logits)) if chosen == "cpu" else \
        functools.partial(registry.implementation(OP_NAME, chosen), code)

    def product(logits, targets, vectors):
        out = torch.empty(vectors.shape, dtype=vectors.dtype, device=vectors.device)
        if out.numel():
            launch(logits.contiguous(), vectors.contiguous(), out)
        return out

    return product


def _problem_size(logits: torch.Tensor, vectors: torch.Tensor) -> tuple[int, int, int]:
    batch, classes = logits.shape
    return batch, classes, vectors.numel() // max(batch * classes, 1)


def _cpu_launcher(code: int, dtype: str):
    """The cpu kernel for one loss kind and dtype, ``(logits, vectors, out) -> None``: the entry
    point and argument struct looked up once, each call naming every field of the struct by
    keyword (the struct's constructor rejects a missing or unknown one: the rule of
    :func:`registry.extension_args`, without a call into the registry per product)."""
    ext = registry.cpu_extension
    entry, arguments = ext.output_hessian_product, ext.OutputHessianArgs

    def launch(logits, vectors, out) -> None:
        batch, classes, num_vectors = _problem_size(logits, vectors)
        entry(arguments(loss_kind=code, dtype=dtype, logits=logits.data_ptr(), vectors=vectors.data_ptr(),
                        out=out.data_ptr(), batch=batch, classes=classes, num_vectors=num_vectors,
                        threads=torch.get_num_threads()))

    return launch


def _run_cpu(code: int, logits, vectors, out) -> None:
    _cpu_launcher(code, registry.dtype_name(logits))(logits, vectors, out)


def _run_cuda(code: int, logits, vectors, out) -> None:
    batch, classes, num_vectors = _problem_size(logits, vectors)
    ext = registry.cuda_extension
    device, stream = registry.cuda_launch_args(logits)
    ext.output_hessian_product(registry.extension_args(
        ext.OutputHessianArgs, loss_kind=code, dtype=registry.dtype_name(logits),
        logits=logits.data_ptr(), vectors=vectors.data_ptr(), out=out.data_ptr(), batch=batch,
        classes=classes, num_vectors=num_vectors, device=device, stream=stream))


registry.register(OP_NAME, "torch", output_hessian_product_reference)
if registry.cpu_extension is not None:
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)

if registry.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _curvature(x, row_max, inv_sum, KIND: tl.constexpr):
        if KIND == 1:  # softmax probability
            return tl.exp(x - row_max) * inv_sum
        # sigma(x) sigma(-x) = e / (1 + e)^2 with e = exp(-|x|): never overflows
        e = tl.exp(-tl.abs(x))
        return e / ((1.0 + e) * (1.0 + e))

    @triton.jit
    def _output_hessian_kernel(logits_ptr, vectors_ptr, out_ptr, B, C, M,
                               KIND: tl.constexpr, BLOCK_C: tl.constexpr,
                               SINGLE_TILE: tl.constexpr, COMPUTE: tl.constexpr):
        b = tl.program_id(0)
        row_ptr = logits_ptr + b * C
        cols = tl.arange(0, BLOCK_C)
        if KIND == 1:  # two passes for the softmax statistics
            run_max = tl.full([BLOCK_C], float("-inf"), dtype=COMPUTE)
            for start in range(0, C, BLOCK_C):
                x = tl.load(row_ptr + start + cols, mask=start + cols < C, other=float("-inf"))
                run_max = tl.maximum(run_max, x.to(COMPUTE))
            row_max = tl.max(run_max, axis=0)
            run_sum = tl.zeros([BLOCK_C], dtype=COMPUTE)
            for start in range(0, C, BLOCK_C):
                mask = start + cols < C
                x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(COMPUTE)
                run_sum += tl.where(mask, tl.exp(x - row_max), 0.0)
            inv_sum = 1.0 / tl.sum(run_sum, axis=0)
        else:  # unused by the sigmoid curvature
            row_max = 0.0
            inv_sum = 1.0
        if SINGLE_TILE:  # the whole row fits: curvature once, reused for all M vectors
            mask = cols < C
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(COMPUTE)
            w = tl.where(mask, _curvature(x, row_max, inv_sum, KIND), 0.0)
            for m in range(M):
                offset = (m * B + b) * C
                u = tl.load(vectors_ptr + offset + cols, mask=mask, other=0.0).to(COMPUTE)
                if KIND == 1:
                    result = w * (u - tl.sum(w * u, axis=0))
                else:
                    result = w * u
                tl.store(out_ptr + offset + cols, result.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # long rows: recompute the curvature per tile
            for m in range(M):
                offset = (m * B + b) * C
                dot = tl.zeros([BLOCK_C], dtype=COMPUTE)
                if KIND == 1:
                    for start in range(0, C, BLOCK_C):
                        mask = start + cols < C
                        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(COMPUTE)
                        u = tl.load(vectors_ptr + offset + start + cols, mask=mask, other=0.0)
                        dot += tl.where(mask, _curvature(x, row_max, inv_sum, KIND) * u.to(COMPUTE), 0.0)
                p_dot_u = tl.sum(dot, axis=0)
                for start in range(0, C, BLOCK_C):
                    mask = start + cols < C
                    x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(COMPUTE)
                    u = tl.load(vectors_ptr + offset + start + cols, mask=mask, other=0.0).to(COMPUTE)
                    w = _curvature(x, row_max, inv_sum, KIND)
                    if KIND == 1:
                        result = w * (u - p_dot_u)
                    else:
                        result = w * u
                    tl.store(out_ptr + offset + start + cols, result.to(out_ptr.dtype.element_ty),
                             mask=mask)

    _MAX_TILE = 4096

    def _run_triton(code: int, logits, vectors, out) -> None:
        if code == registry.LOSS_KIND_CODES["mse"]:
            out.copy_(vectors)
            return
        batch, classes, num_vectors = _problem_size(logits, vectors)
        block = min(triton.next_power_of_2(classes), _MAX_TILE)
        _output_hessian_kernel[(batch,)](
            logits, vectors, out, batch, classes, num_vectors, KIND=code, BLOCK_C=block,
            SINGLE_TILE=classes <= block, COMPUTE=registry.triton_compute_dtype(logits))

    registry.register(OP_NAME, "triton", _run_triton)
