"""One in-place LiSSA step with fused bookkeeping.

h <- v + (1 - damping/scale) h - gh/scale over h of shape (d,) or (d, m);
returns the new per-column L2 norms (float64, shape (m,) or (1,)) and whether
any new element is NaN/Inf. Compiled backends do it in one pass over memory;
the reference takes several.
"""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from . import registry

OP_NAME = "lissa_update_"


def lissa_update_reference_(h: torch.Tensor, v: torch.Tensor, gh: torch.Tensor, damping: float,
                            scale: float) -> tuple[torch.Tensor, bool]:
    h.mul_(1.0 - damping / scale).add_(v).add_(gh, alpha=-1.0 / scale)
    columns = h.unsqueeze(1) if h.dim() == 1 else h
    norms = torch.linalg.vector_norm(columns, dim=0, dtype=torch.float64)
    return norms, not bool(torch.isfinite(h).all())


def _check_arguments(h, v, gh, damping, scale) -> None:
    registry.check_same_dtype_and_device(OP_NAME, h=h, v=v, gh=gh)
    if h.dim() not in (1, 2):
        raise InputError(f"{OP_NAME}: h must have shape (d,) or (d, m), got {tuple(h.shape)}")
    for name, t in (("v", v), ("gh", gh)):
        if t.shape != h.shape:
            raise InputError(f"{OP_NAME}: {name} must match h's shape {tuple(h.shape)}, "
                             f"got {tuple(t.shape)}")
    if not (math.isfinite(damping) and math.isfinite(scale)) or scale == 0:
        raise InputError(f"{OP_NAME}: damping and scale must be finite and scale non-zero, "
                         f"got damping={damping}, scale={scale}")


def plan_lissa_update(h: torch.Tensor, backend: str = "auto") -> registry.Plan:
    """What :func:`lissa_update_` runs for ``h``, and why: one fused pass of the
    compiled kernel of its device where there is one, else the torch reference."""
    return registry.plan_backend(OP_NAME, h.dtype, h.device, backend)


def lissa_update_(h: torch.Tensor, v: torch.Tensor, gh: torch.Tensor, damping: float,
                  scale: float, *, backend: str = "auto") -> tuple[torch.Tensor, bool]:
    """Update h in place; return (column norms as float64 tensor on h's device, nonfinite)."""
    damping, scale = float(damping), float(scale)
    _check_arguments(h, v, gh, damping, scale)
    chosen = plan_lissa_update(h, backend).backend
    if chosen == "torch":
        return lissa_update_reference_(h, v, gh, damping, scale)
    # Kernels write through data_ptr: update a contiguous copy and copy it back.
    work = h if h.is_contiguous() else h.contiguous()
    cols = 1 if h.dim() == 1 else h.shape[1]
    norms, nonfinite = registry.implementation(OP_NAME, chosen)(
        work, v.contiguous(), gh.contiguous(), damping, scale, h.shape[0], cols)
    if work is not h:
        h.copy_(work)
    return norms, nonfinite


def _run_cpu(h, v, gh, damping, scale, rows, cols):
    norms = torch.empty(cols, dtype=torch.float64)
    ext = registry.cpu_extension
    nonfinite = ext.lissa_update(registry.extension_args(
        ext.LissaUpdateArgs, dtype=registry.dtype_name(h), h=h.data_ptr(), v=v.data_ptr(),
        gh=gh.data_ptr(), damping=damping, scale=scale, rows=rows, cols=cols,
        norms_squared=norms.data_ptr(), threads=torch.get_num_threads()))
    return norms.sqrt_(), bool(nonfinite)


def _run_cuda(h, v, gh, damping, scale, rows, cols):
    norms = torch.zeros(cols, dtype=torch.float64, device=h.device)
    flag = torch.zeros(1, dtype=torch.int32, device=h.device)
    ext = registry.cuda_extension
    device, stream = registry.cuda_launch_args(h)
    ext.lissa_update(registry.extension_args(
        ext.LissaUpdateArgs, dtype=registry.dtype_name(h), h=h.data_ptr(), v=v.data_ptr(),
        gh=gh.data_ptr(), damping=damping, scale=scale, rows=rows, cols=cols,
        norms_squared=norms.data_ptr(), nonfinite_flag=flag.data_ptr(), device=device, stream=stream))
    return norms.sqrt_(), bool(flag.item())


registry.register(OP_NAME, "torch", lissa_update_reference_)
if registry.cpu_extension is not None:
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)

if registry.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _lissa_kernel(h_ptr, v_ptr, gh_ptr, coef_ptr, partial_ptr, flag_ptr, rows, cols,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        # Coefficients come from a float64 tensor: python float arguments
        # would arrive as float32 and cost float64 inputs 8 digits.
        keep = tl.load(coef_ptr).to(COMPUTE)
        inv_scale = tl.load(coef_ptr + 1).to(COMPUTE)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        offs = r[:, None].to(tl.int64) * cols + c[None, :]
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        gh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        x = v + keep * h - gh * inv_scale
        stored = x.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, stored, mask=mask)
        x64 = stored.to(tl.float64)  # norms of what was stored, accumulated in float64
        squares = tl.where(mask, x64 * x64, 0.0)
        tl.store(partial_ptr + pid_r * cols + c, tl.sum(squares, axis=0), mask=c < cols)
        bad = mask & ((x64 != x64) | (tl.abs(x64) == float("inf")))
        tl.store(flag_ptr + pid_r * tl.num_programs(1) + pid_c, tl.max(bad.to(tl.int32), axis=None))

    _TILE_ELEMENTS = 4096

    def _run_triton(h, v, gh, damping, scale, rows, cols):
        block_m = min(triton.next_power_of_2(cols), 1024)
        block_r = max(1, _TILE_ELEMENTS // block_m)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_m))
        coef = torch.tensor([1.0 - damping / scale, 1.0 / scale], dtype=torch.float64,
                            device=h.device)
        partial = torch.empty(grid[0], cols, dtype=torch.float64, device=h.device)
        flags = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=h.device)
        _lissa_kernel[grid](h, v, gh, coef, partial, flags, rows, cols, BLOCK_R=block_r,
                            BLOCK_M=block_m, COMPUTE=registry.triton_compute_dtype(h))
        # Summing the per-program partials here keeps the result deterministic.
        return partial.sum(0).sqrt_(), bool(flags.any())

    registry.register(OP_NAME, "triton", _run_triton)
