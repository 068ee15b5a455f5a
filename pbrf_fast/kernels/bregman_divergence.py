"""Bregman divergence of the loss in output space, with its gradient in y.

D(y, y_ref) = L(y) - L(y_ref) - dL/dy(y_ref)^T (y - y_ref); the targets cancel
for all three losses, so only outputs and reference outputs enter:

- mse: 1/2 ||y - y_ref||^2, grad y - y_ref
- cross_entropy: lse(y) - lse(y_ref) - softmax(y_ref)^T (y - y_ref),
  grad softmax(y) - softmax(y_ref)
- bce: sum_c softplus(y) - softplus(y_ref) - sigma(y_ref)(y - y_ref),
  grad sigma(y) - sigma(y_ref)

The reference is differentiable (PBRF training backpropagates through it);
compiled backends are forward-only and return value and gradient explicitly.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from . import registry

OP_NAME = "bregman_divergence"


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # logaddexp(x, 0) is exact for large |x| (F.softplus switches to x past a threshold)
    return torch.logaddexp(x, torch.zeros_like(x))


def bregman_divergence_reference(loss_kind: str, outputs: torch.Tensor,
                                 ref_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    registry.loss_kind_code(loss_kind)
    diff = outputs - ref_outputs
    if loss_kind == "mse":
        return 0.5 * (diff * diff).sum(-1), diff
    if loss_kind == "cross_entropy":
        p_ref = torch.softmax(ref_outputs, dim=-1)
        values = (torch.logsumexp(outputs, -1) - torch.logsumexp(ref_outputs, -1)
                  - (p_ref * diff).sum(-1))
        return values, torch.softmax(outputs, dim=-1) - p_ref
    sigma_ref = torch.sigmoid(ref_outputs)
    values = (_softplus(outputs) - _softplus(ref_outputs) - sigma_ref * diff).sum(-1)
    return values, torch.sigmoid(outputs) - sigma_ref


def _check_arguments(loss_kind, outputs, ref_outputs) -> int:
    code = registry.loss_kind_code(loss_kind)
    registry.check_same_dtype_and_device(OP_NAME, outputs=outputs, ref_outputs=ref_outputs)
    if outputs.dim() != 2:
        raise InputError(f"{OP_NAME}: outputs must have shape (B, C), got {tuple(outputs.shape)}")
    if ref_outputs.shape != outputs.shape:
        raise InputError(f"{OP_NAME}: ref_outputs must match outputs' shape "
                         f"{tuple(outputs.shape)}, got {tuple(ref_outputs.shape)}")
    return code


def plan_bregman_divergence(outputs: torch.Tensor, ref_outputs: torch.Tensor,
                            backend: str = "auto") -> registry.Plan:
    """What :func:`bregman_divergence` runs for these tensors, and why (PBRF training
    differentiates through it, so under autograd "auto" keeps the torch reference)."""
    return registry.plan_backend(OP_NAME, outputs.dtype, outputs.device, backend,
                                 autograd=registry.needs_autograd(outputs, ref_outputs))


def bregman_divergence(loss_kind: str, outputs: torch.Tensor, ref_outputs: torch.Tensor, *,
                       backend: str = "auto",
                       out: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B,), grad (B, C)) of the output-space Bregman divergence.

    out: optional (values, grad) contiguous buffers to write into.
    """
    code = _check_arguments(loss_kind, outputs, ref_outputs)
    chosen = plan_bregman_divergence(outputs, ref_outputs, backend).backend
    batch, classes = outputs.shape
    if out is not None:
        registry.check_output_buffer(OP_NAME, "out[0] (values)", out[0], outputs, (batch,))
        registry.check_output_buffer(OP_NAME, "out[1] (grad)", out[1], outputs, (batch, classes))
    if chosen == "torch":
        values, grad = bregman_divergence_reference(loss_kind, outputs, ref_outputs)
        return (values, grad) if out is None else (out[0].copy_(values), out[1].copy_(grad))
    values, grad = out if out is not None else (outputs.new_empty(batch), torch.empty_like(
        outputs, memory_format=torch.contiguous_format))
    if classes == 0:  # nothing to diverge: D = 0, and kernels need a non-empty row
        values.zero_()
        return values, grad
    if batch > 0:
        registry.implementation(OP_NAME, chosen)(
            code, outputs.contiguous(), ref_outputs.contiguous(), values, grad)
    return values, grad


def _run_cpu(code, outputs, ref_outputs, values, grad) -> None:
    batch, classes = outputs.shape
    ext = registry.cpu_extension
    ext.bregman_divergence(registry.extension_args(
        ext.BregmanDivergenceArgs, loss_kind=code, dtype=registry.dtype_name(outputs),
        outputs=outputs.data_ptr(), ref_outputs=ref_outputs.data_ptr(), values=values.data_ptr(),
        grad=grad.data_ptr(), batch=batch, classes=classes, threads=torch.get_num_threads()))


def _run_cuda(code, outputs, ref_outputs, values, grad) -> None:
    batch, classes = outputs.shape
    ext = registry.cuda_extension
    device, stream = registry.cuda_launch_args(outputs)
    ext.bregman_divergence(registry.extension_args(
        ext.BregmanDivergenceArgs, loss_kind=code, dtype=registry.dtype_name(outputs),
        outputs=outputs.data_ptr(), ref_outputs=ref_outputs.data_ptr(), values=values.data_ptr(),
        grad=grad.data_ptr(), batch=batch, classes=classes, device=device, stream=stream))


registry.register(OP_NAME, "torch", bregman_divergence_reference)
if registry.cpu_extension is not None:
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)

if registry.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _sigmoid_and_softplus(x):
        # Both from e = exp(-|x|) <= 1, so nothing overflows. log1p(e) via
        # Goldberg's trick: log(u) * e / (u - 1) with u = 1 + e is exact to
        # rounding, and tl has no log1p that the interpreter also runs.
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        sigma = tl.where(x >= 0, 1.0 / u, e / u)
        return sigma, tl.maximum(x, 0.0) + log1p_e

    @triton.jit
    def _row_softmax_stats(row_ptr, C, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
        cols = tl.arange(0, BLOCK_C)
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
        return row_max, tl.sum(run_sum, axis=0)

    @triton.jit
    def _bregman_kernel(y_ptr, r_ptr, values_ptr, grad_ptr, C, KIND: tl.constexpr,
                        BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        if KIND == 1:
            y_max, y_sum = _row_softmax_stats(y_ptr + b * C, C, BLOCK_C, COMPUTE)
            r_max, r_sum = _row_softmax_stats(r_ptr + b * C, C, BLOCK_C, COMPUTE)
        else:  # unused by mse / bce
            y_max, y_sum, r_max, r_sum = 0.0, 1.0, 0.0, 1.0
        acc = tl.zeros([BLOCK_C], dtype=COMPUTE)
        for start in range(0, C, BLOCK_C):
            mask = start + cols < C
            offs = b * C + start + cols
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            if KIND == 0:
                term = 0.5 * (y - r) * (y - r)
                grad = y - r
            elif KIND == 1:
                p = tl.exp(y - y_max) / y_sum
                p_ref = tl.exp(r - r_max) / r_sum
                term = p_ref * (y - r)
                grad = p - p_ref
            else:
                sigma, softplus = _sigmoid_and_softplus(y)
                sigma_ref, softplus_ref = _sigmoid_and_softplus(r)
                term = softplus - softplus_ref - sigma_ref * (y - r)
                grad = sigma - sigma_ref
            acc += tl.where(mask, term, 0.0)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        value = tl.sum(acc, axis=0)
        if KIND == 1:  # lse(y) - lse(y_ref) - sum p_ref (y - y_ref)
            value = (y_max + tl.log(y_sum)) - (r_max + tl.log(r_sum)) - value
        tl.store(values_ptr + b, value.to(values_ptr.dtype.element_ty))

    _MAX_TILE = 4096

    def _run_triton(code, outputs, ref_outputs, values, grad) -> None:
        batch, classes = outputs.shape
        _bregman_kernel[(batch,)](
            outputs, ref_outputs, values, grad, classes, KIND=code,
            BLOCK_C=min(triton.next_power_of_2(classes), _MAX_TILE),
            COMPUTE=registry.triton_compute_dtype(outputs))

    registry.register(OP_NAME, "triton", _run_triton)
