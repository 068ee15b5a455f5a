"""Influence-score contraction for one layer, without per-example gradients.

For a layer ``y = W a`` (Linear: one token per example; Conv2d: the unfolded
patches are the tokens) the gradient of example b's loss is
``G_b = sum_t delta_{b,t} a_{b,t}^T`` (o x i), so its inner product with a
preconditioned test vector S_q (o x i) is

    scores[b, q] = <G_b, S_q> = sum_t delta_{b,t}^T S_q a_{b,t}.

Shapes: ``a`` (b, t, i) or (b, i); ``delta`` (b, t, o) or (b, o); ``S``
(m, o, i). Two contraction orders, chosen by flop count:

- *gradient tile*: 2 b t o i + 2 b o i m -- build G_b one tile at a time and
  contract each tile with every S_q at once (the compiled kernels; the torch
  path does it in example chunks, so G never exists for the whole batch);
- *projection*: 2 b t o i m + 2 b t m min(o, i) -- push each token through
  S_q (one GEMM) and dot with the other side; cheaper only for t = 1.

Low-rank test vectors ``S_q = L_q R_q^T`` (L: m x o x r, R: m x i x r) add a
third order, 2 b t m r (o + i + 1): project both sides to rank r.
``conv2d_score_contraction`` unfolds Conv2d inputs into tokens.

The reference :func:`score_contraction_reference` is the spec; the cpu, cuda
and triton backends must match it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import registry

OP_NAME = "score_contraction"
# Elements of a transient per-chunk gradient block on the torch path (64 MiB in float32).
_TORCH_CHUNK_ELEMENTS = 1 << 24
# Bytes of the per-chunk gradient block on the CPU fast path: G chunks that stay in cache
# between the bmm and the GEMM with S beat one batch-sized G that round-trips DRAM
# (resnet20-stage3-conv: 37.7 MB of G, 2x faster in 16 MiB chunks).
_CPU_GRADIENT_CHUNK_BYTES = 16 << 20

__all__ = ["score_contraction", "plan_score_contraction", "plan_conv2d_score_contraction", "score_contraction_reference", "score_contraction_torch_cpu",
           "score_contraction_lowrank",
           "conv2d_score_contraction", "conv2d_weight_gradient_blocks", "contraction_flops", "choose_order"]


# ------------------------------------------------------------------------------------ cost model
def contraction_flops(batch: int, tokens: int, out_features: int, in_features: int, queries: int,
                      rank: int | None = None) -> dict[str, float]:
    """Flops of each contraction order (the keys are the order names)."""
    b, t, o, i, m = map(float, (batch, tokens, out_features, in_features, queries))
    costs = {"gradient": 2 * b * o * i * (t + m), "projection": 2 * b * t * m * (o * i + min(o, i))}
    if rank is not None:
        r = float(rank)
        costs = {k + "+dense": v + 2 * m * o * i * r for k, v in costs.items()}
        costs["lowrank"] = 2 * b * t * m * r * (o + i + 1)
    return costs


def choose_order(batch, tokens, out_features, in_features, queries, rank=None) -> str:
    costs = contraction_flops(batch, tokens, out_features, in_features, queries, rank)
    return min(costs, key=costs.get)


# ------------------------------------------------------------------------------------ reference
def _as_tokens(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise InputError(f"{OP_NAME}: {name} must be (b, i) / (b, o) or (b, t, features), got {tuple(x.shape)}")
    return x


def score_contraction_reference(a: torch.Tensor, delta: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """scores[b, q] = sum_t delta[b, t]^T S[q] a[b, t], in the cheaper order, in bounded memory."""
    a, delta = _as_tokens(a, "a"), _as_tokens(delta, "delta")
    b, t, i = a.shape
    o, m = delta.shape[2], S.shape[0]
    if choose_order(b, t, o, i, m) == "projection":
        if i <= o:  # (delta S_q) . a: the GEMM output has m * i columns
            projected = delta.reshape(b * t, o) @ S.permute(1, 0, 2).reshape(o, m * i)
            other = a
        else:       # (S_q a) . delta
            projected = a.reshape(b * t, i) @ S.reshape(m * o, i).T
            other = delta
        width = other.shape[2]
        prod = projected.reshape(b, t, m, width) * other.reshape(b, t, 1, width)
        return prod.sum((1, 3))
    rows = max(1, _TORCH_CHUNK_ELEMENTS // max(o * i, 1))
    flat_s = S.reshape(m, o * i)
    out = [torch.bmm(delta[k:k + rows].transpose(1, 2), a[k:k + rows]).reshape(-1, o * i) @ flat_s.T
           for k in range(0, b, rows)]
    return torch.cat(out) if out else a.new_zeros(0, m)


# ------------------------------------------------------------------------------- CPU fast path
def _even_chunks(total: int, limit: int) -> list[tuple[int, int]]:
    """(start, size) pieces of at most `limit`, of near-equal size (no small tail chunk)."""
    pieces = -(-total // max(limit, 1))
    step = -(-total // pieces) if total else 1
    return [(k, min(step, total - k)) for k in range(0, total, step)]


def score_contraction_torch_cpu(a: torch.Tensor, delta: torch.Tensor, S: torch.Tensor,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's math and orders, arranged for CPU BLAS (forward only: out= ops).

    Gradient order: G in cache-sized example chunks (one reused buffer), each chunk's
    scores written in place by one GEMM with S. Projection order: the token-side
    product is reduced by a batched GEMV (bmm) rather than multiply + sum, which
    writes and re-reads a temporary of the projection's size; the batch is split by
    queries first, so the big GEMM keeps all rows and reads S once.
    """
    a, delta = _as_tokens(a, "a"), _as_tokens(delta, "delta")
    b, t, i = a.shape
    o, m = delta.shape[2], S.shape[0]
    if out is None:
        out = a.new_empty(b, m)
    if choose_order(b, t, o, i, m) == "projection":
        if i <= o:
            src, other, flat = delta, a, S.permute(1, 0, 2).reshape(o, m * i)
        else:
            src, other, flat = a, delta, S.reshape(m * o, i).T
        w = other.shape[2]
        if t == 1 and b * m * w <= _TORCH_CHUNK_ELEMENTS:  # one chunk: skip the loop glue (fc layers)
            projected = (src.reshape(b, src.shape[2]) @ flat).view(b, m, w)
            return torch.bmm(projected, other.reshape(b, w, 1), out=out.view(b, m, 1)).view(b, m)
        queries = max(1, min(m, _TORCH_CHUNK_ELEMENTS // max(b * t * w, 1)))
        rows = max(1, _TORCH_CHUNK_ELEMENTS // max(t * queries * w, 1))
        for k, n in _even_chunks(b, rows):
            tokens = src[k:k + n].reshape(n * t, src.shape[2])
            dots = other[k:k + n].reshape(n * t, w, 1)
            for q, mc in _even_chunks(m, queries):
                projected = (tokens @ flat[:, q * w:(q + mc) * w]).view(n * t, mc, w)
                if t == 1 and mc == m:  # the fc / MLP case: straight into out
                    torch.bmm(projected, dots, out=out[k:k + n].view(n, m, 1))
                else:
                    out[k:k + n, q:q + mc] = torch.bmm(projected, dots).view(n, t, mc).sum(1)
        return out
    rows = max(1, _CPU_GRADIENT_CHUNK_BYTES // (a.element_size() * max(o * i, 1)))
    flat_s = S.reshape(m, o * i).T
    grads = None
    for k, n in _even_chunks(b, rows):
        if grads is None:
            grads = a.new_empty(n, o, i)
        torch.bmm(delta[k:k + n].transpose(1, 2), a[k:k + n], out=grads[:n])
        torch.mm(grads[:n].view(n, o * i), flat_s, out=out[k:k + n])
    return out


# --------------------------------------------------------------------------------------- wrapper
def _check_arguments(a, delta, S):
    registry.check_same_dtype_and_device(OP_NAME, a=a, delta=delta, S=S)
    if a.dim() != delta.dim() or a.dim() not in (2, 3):
        raise InputError(f"{OP_NAME}: a and delta must both be 2-D (b, features) or 3-D (b, t, features); "
                         f"got {tuple(a.shape)} and {tuple(delta.shape)}")
    if a.shape[:-1] != delta.shape[:-1]:
        raise InputError(f"{OP_NAME}: a {tuple(a.shape)} and delta {tuple(delta.shape)} disagree on (b, t)")
    if S.dim() != 3 or S.shape[1] != delta.shape[-1] or S.shape[2] != a.shape[-1]:
        raise InputError(f"{OP_NAME}: S must have shape (m, o, i) = (m, {delta.shape[-1]}, {a.shape[-1]}), "
                         f"got {tuple(S.shape)}")


def plan_score_contraction(a: torch.Tensor, delta: torch.Tensor, S: torch.Tensor,
                           backend: str = "auto") -> registry.Plan:
    """What :func:`score_contraction` runs for these tensors, and why.

    Implementations: ``torch`` (the differentiable reference), ``torch-blas``
    (:func:`score_contraction_torch_cpu`: the same orders on torch's BLAS, forward
    only), and the compiled ``cpu`` / ``cuda`` / ``triton`` kernels.
    """
    a3, d3 = _as_tokens(a, "a"), _as_tokens(delta, "delta")
    order = choose_order(a3.shape[0], a3.shape[1], d3.shape[2], a3.shape[2], S.shape[0])
    autograd = registry.needs_autograd(a, delta, S)
    on_cpu = a.device.type == "cpu"
    if on_cpu and not autograd and backend in ("auto", "torch"):
        # bench/bench_scale.py: on every ResNet-20 and MLP layer shape torch's BLAS in
        # cache-sized chunks is 1.4-2x faster than the OpenMP kernel (our blocked GEMM).
        why = ("backend='auto' on CPU: torch's BLAS in cache-sized chunks measures 1.4-2x faster "
               "than the OpenMP kernel" if backend == "auto" else "backend='torch' without autograd")
        return registry.Plan(OP_NAME, "torch-blas", "torch", f"{why}; {order} order")
    plan = registry.plan_backend(OP_NAME, a.dtype, a.device, backend, autograd=autograd)
    return dataclasses.replace(plan, reason=f"{plan.reason}; {order} order")


def score_contraction(a: torch.Tensor, delta: torch.Tensor, S: torch.Tensor, *, backend: str = "auto",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """scores (b, m) with scores[b, q] = sum_t delta[b, t]^T S[q] a[b, t].

    backend: "auto", "torch", "cpu", "cuda" or "triton"; :func:`plan_score_contraction`
    says which implementation runs and why. ``out``: optional contiguous (b, m)
    buffer, fully overwritten.
    """
    _check_arguments(a, delta, S)
    plan = plan_score_contraction(a, delta, S, backend)
    shape = (a.shape[0], S.shape[0])
    if out is not None:
        registry.check_output_buffer(OP_NAME, "out", out, a, shape)
    if plan.implementation == "torch-blas":
        return score_contraction_torch_cpu(a, delta, S, out=out)
    if plan.implementation == "torch":
        result = score_contraction_reference(a, delta, S)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(shape, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    # The kernels index rows directly: non-contiguous inputs are copied once.
    a3, d3 = _as_tokens(a, "a").contiguous(), _as_tokens(delta, "delta").contiguous()
    registry.implementation(OP_NAME, plan.backend)(a3, d3, S.contiguous(), out)
    return out


def _sizes(a, delta, S):
    return dict(batch=a.shape[0], tokens=a.shape[1], out_features=delta.shape[2], in_features=a.shape[2],
                queries=S.shape[0])


def _run_cpu(a, delta, S, out) -> None:
    ext = registry.cpu_extension
    ext.score_contraction(registry.extension_args(
        ext.ScoreContractionArgs, dtype=registry.dtype_name(a), a=a.data_ptr(),
        delta=delta.data_ptr(), s=S.data_ptr(), out=out.data_ptr(), **_sizes(a, delta, S),
        threads=torch.get_num_threads()))


def _run_cuda(a, delta, S, out) -> None:
    ext = registry.cuda_extension
    device, stream = registry.cuda_launch_args(a)
    ext.score_contraction(registry.extension_args(
        ext.ScoreContractionArgs, dtype=registry.dtype_name(a), a=a.data_ptr(),
        delta=delta.data_ptr(), s=S.data_ptr(), out=out.data_ptr(), **_sizes(a, delta, S),
        device=device, stream=stream))


registry.register(OP_NAME, "torch", score_contraction_reference)
if registry.cpu_extension is not None and hasattr(registry.cpu_extension, OP_NAME):
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)


# ------------------------------------------------------------------------------ low rank, conv
def score_contraction_lowrank(a: torch.Tensor, delta: torch.Tensor, L: torch.Tensor, R: torch.Tensor, *,
                              backend: str = "auto") -> torch.Tensor:
    """Scores for S_q = L_q R_q^T (L: m x o x r, R: m x i x r), in the cheapest order."""
    a3, d3 = _as_tokens(a, "a"), _as_tokens(delta, "delta")
    registry.check_same_dtype_and_device(OP_NAME, a=a3, delta=d3, L=L, R=R)
    if L.dim() != 3 or R.dim() != 3 or L.shape[0] != R.shape[0] or L.shape[2] != R.shape[2]:
        raise InputError(f"{OP_NAME}: L (m, o, r) and R (m, i, r) disagree: {tuple(L.shape)}, {tuple(R.shape)}")
    b, t, i = a3.shape
    o, m, r = d3.shape[2], L.shape[0], L.shape[2]
    if choose_order(b, t, o, i, m, rank=r) != "lowrank":
        return score_contraction(a, delta, L @ R.transpose(1, 2), backend=backend)
    # Rank-r projections of both sides, in example chunks of bounded size.
    rows = max(1, _TORCH_CHUNK_ELEMENTS // max(t * m * r, 1))
    flat_l = L.permute(1, 0, 2).reshape(o, m * r)
    flat_r = R.permute(1, 0, 2).reshape(i, m * r)
    out = []
    for k in range(0, b, rows):
        pd = d3[k:k + rows].reshape(-1, o) @ flat_l
        pa = a3[k:k + rows].reshape(-1, i) @ flat_r
        out.append((pd * pa).reshape(-1, t, m, r).sum((1, 3)))
    return torch.cat(out) if out else a3.new_zeros(0, m)


def unfold_conv_input(inputs: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Conv2d input (b, C, H, W) -> tokens (b, H'W', C k k) in the layout of weight.flatten(1)."""
    cols = F.unfold(inputs, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def plan_conv2d_score_contraction(inputs: torch.Tensor, grad_outputs: torch.Tensor, S: torch.Tensor, *,
                                  stride=1, backend: str = "auto") -> registry.Plan:
    """What :func:`conv2d_score_contraction` runs, and why.

    ``shifted-views`` (stride 1) / ``chunked-unfold`` (strided): per-example weight
    gradients from :func:`conv2d_weight_gradient_blocks`, never the batch's patches
    (CPU, forward only, when the gradient order is the cheaper one); ``unfold``: the
    batch's patches at once, then :func:`score_contraction` (its own plan).
    """
    S3 = S.reshape(S.shape[0], S.shape[1], -1)
    positions = grad_outputs.shape[2] * grad_outputs.shape[3]
    order = choose_order(len(inputs), positions, S3.shape[1], S3.shape[2], S3.shape[0])
    op = "conv2d_score_contraction"
    if (backend in ("auto", "torch") and inputs.device.type == "cpu" and order == "gradient"
            and not registry.needs_autograd(inputs, grad_outputs, S)):
        if _pair(stride) == (1, 1):
            return registry.Plan(op, "shifted-views", "torch",
                                 "CPU, stride 1: shifted strided views of the padded input, one batched "
                                 "GEMM per kernel offset, no unfolded copy")
        return registry.Plan(op, "chunked-unfold", "torch",
                             "CPU, strided: patches unfolded a cache-sized example chunk at a time")
    why = ("autograd, another device, an explicit compiled backend or the projection order "
           f"({order} order here)")
    return registry.Plan(op, "unfold", "torch", f"patches unfolded for the batch ({why}), then score_contraction")


def conv2d_score_contraction(inputs: torch.Tensor, grad_outputs: torch.Tensor, S: torch.Tensor, *,
                             kernel_size, stride=1, padding=0, dilation=1, backend: str = "auto"):
    """Scores of a Conv2d (groups = 1, zero padding) through its unfolded view.

    inputs (b, C_in, H, W); grad_outputs (b, C_out, H', W'); S (m, C_out, C_in, kh, kw)
    or (m, C_out, C_in kh kw). Bias is not included (its gradient is sum_t delta_t).
    On CPU (torch backend, no autograd) the patches are never materialised for the
    whole batch (:func:`_conv2d_scores_cpu`); otherwise they are unfolded at once
    into score_contraction.
    """
    if inputs.dim() != 4 or grad_outputs.dim() != 4 or len(inputs) != len(grad_outputs):
        raise InputError(f"{OP_NAME}: need inputs (b, C_in, H, W) and grad_outputs (b, C_out, H', W') "
                         f"with the same b, got {tuple(inputs.shape)} and {tuple(grad_outputs.shape)}")
    S3 = S.reshape(S.shape[0], S.shape[1], -1)
    plan = plan_conv2d_score_contraction(inputs, grad_outputs, S3, stride=stride, backend=backend)
    if plan.implementation != "unfold":
        registry.check_same_dtype_and_device(OP_NAME, inputs=inputs, grad_outputs=grad_outputs, S=S)
        return _conv2d_scores_cpu(inputs, grad_outputs, S3, kernel_size=kernel_size, stride=stride,
                                  padding=padding, dilation=dilation)
    a = unfold_conv_input(inputs, kernel_size, stride, padding, dilation)
    delta = grad_outputs.flatten(2).transpose(1, 2)
    if a.shape[1] != delta.shape[1]:
        raise InputError(f"{OP_NAME}: conv input gives {a.shape[1]} patches but grad_outputs has "
                         f"{delta.shape[1]} positions; check kernel_size/stride/padding/dilation")
    return score_contraction(a, delta, S3, backend=backend)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv2d_scores_cpu(inputs, grad_outputs, S3, **conv):
    """scores = <G_b, S_q> from :func:`conv2d_weight_gradient_blocks`, block by block."""
    m, o, i = S3.shape
    out = inputs.new_zeros(len(inputs), m)
    flat_s = S3.reshape(m, o * i).T
    kh, kw = _pair(conv["kernel_size"])
    C = inputs.shape[1]
    if i != C * kh * kw:
        raise InputError(f"{OP_NAME}: S has {i} values per output channel, the conv input "
                         f"{C} channels x kernel {(kh, kw)} = {C * kh * kw}")
    # S as (kh kw, o C, m): one (o C, m) block per kernel offset
    S_offsets = S3.reshape(m, o, C, kh, kw).permute(3, 4, 1, 2, 0).reshape(kh * kw, o * C, m)
    for k, n, offset, G in conv2d_weight_gradient_blocks(inputs, grad_outputs, out_features=o, **conv):
        block = flat_s if offset is None else S_offsets[offset]
        out[k:k + n].addmm_(G.view(n, -1), block)
    return out


# Bytes of padded inputs and gradients per example chunk (stride-1 convs).
_CPU_SHIFT_CHUNK_BYTES = 32 << 20
# Bytes of unfolded patches per chunk (strided convs).
_CPU_UNFOLD_CHUNK_BYTES = 2 << 20


def conv2d_weight_gradient_blocks(inputs: torch.Tensor, grad_outputs: torch.Tensor, *, kernel_size,
                                  stride=1, padding=0, dilation=1, out_features: int | None = None):
    """Per-example Conv2d weight gradients (groups = 1, zero padding) in transient blocks,
    without the batch's unfolded patches (k*k times the input: 151 MB per 256 images in
    ResNet-20's first stage, which F.unfold writes at a few GB/s).

    Yields ``(start, count, offset, G)`` for examples start .. start + count:
    stride 1 gives one block per kernel offset, ``offset = r * kw + s`` and G (count,
    C_out, C_in) = the gradient's [:, :, r, s] slice; strided convs give the whole
    gradient, ``offset = None`` and G (count, C_out, C_in kh kw) from a chunk-sized
    unfold (still in cache for the GEMM). G is a reused buffer: use it before the
    next block.

    Stride 1: with the input zero-padded to width Wp and the output gradients to
    the same width, output position t = y Wp + x reads input element (c, y + r dh,
    x + s dw), flat index c P + (r dh Wp + s dw) + t of a channel plane of P
    elements; so for each offset the (positions, C) patch matrix is a strided
    *view* (unit stride along t, P along c) and G is one batched GEMM with no copy.
    The zero pad columns of the gradients cancel the extra positions (Wp / Wo more
    work: 6% at 32 x 32).
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel_size, dilation, padding, stride))
    b, C, H, W = inputs.shape
    o, Ho, Wo = grad_outputs.shape[1:]
    if ((out_features is not None and o != out_features) or len(grad_outputs) != b
            or Ho != (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1 or Wo != (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1):
        raise InputError(f"{OP_NAME}: conv input {tuple(inputs.shape)} and grad_outputs "
                         f"{tuple(grad_outputs.shape)} do not fit kernel {(kh, kw)}, stride {(sh, sw)}, "
                         f"padding {(ph, pw)}, dilation {(dh, dw)} and {out_features} output channels")
    if b == 0:
        return
    grads = None
    if (sh, sw) != (1, 1):
        delta = grad_outputs.flatten(2)                                    # (b, o, L)
        per_example = C * kh * kw * Ho * Wo * inputs.element_size()
        for k, n in _even_chunks(b, max(1, _CPU_UNFOLD_CHUNK_BYTES // per_example)):
            cols = F.unfold(inputs[k:k + n], (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
            if grads is None:
                grads = inputs.new_empty(n, o, C * kh * kw)
            torch.bmm(delta[k:k + n], cols.transpose(1, 2), out=grads[:n])
            yield k, n, None, grads[:n]
        return
    Wp = W + 2 * pw
    spare = -(-(dw * (kw - 1)) // Wp)          # rows so the last offset's view stays inside the plane
    plane, positions = (H + 2 * ph + spare) * Wp, Ho * Wp
    per_example = (C * plane + o * positions) * inputs.element_size()
    for k, n in _even_chunks(b, max(1, _CPU_SHIFT_CHUNK_BYTES // per_example)):
        padded = F.pad(inputs[k:k + n], (pw, pw, ph, ph + spare))                         # (n, C, Hp, Wp)
        delta = F.pad(grad_outputs[k:k + n], (0, Wp - Wo)).reshape(n, o, positions)      # (n, o, L')
        if grads is None:
            grads = inputs.new_empty(n, o, C)
        for r in range(kh):
            for s in range(kw):
                patches = padded.as_strided((n, positions, C), (C * plane, 1, plane),
                                            padded.storage_offset() + r * dh * Wp + s * dw)
                torch.bmm(delta, patches, out=grads[:n])
                yield k, n, r * kw + s, grads[:n]


# ------------------------------------------------------------------------------------- triton
if registry.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _score_contraction_kernel(a_ptr, d_ptr, s_ptr, out_ptr, T, O, I, M,
                                  BT: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BQ: tl.constexpr,
                                  USE_DOT: tl.constexpr, COMPUTE: tl.constexpr):
        b = tl.program_id(0)
        qs = tl.program_id(1) * BQ + tl.arange(0, BQ)
        ts, os_, is_ = tl.arange(0, BT), tl.arange(0, BO), tl.arange(0, BI)
        acc = tl.zeros([BQ], dtype=COMPUTE)
        for o0 in range(0, O, BO):
            for i0 in range(0, I, BI):
                tile = tl.zeros([BO, BI], dtype=COMPUTE)
                for t0 in range(0, T, BT):
                    tm = t0 + ts < T
                    d = tl.load(d_ptr + (b * T + t0 + ts[:, None]) * O + o0 + os_[None, :],
                                mask=tm[:, None] & (o0 + os_[None, :] < O), other=0.0).to(COMPUTE)
                    x = tl.load(a_ptr + (b * T + t0 + ts[:, None]) * I + i0 + is_[None, :],
                                mask=tm[:, None] & (i0 + is_[None, :] < I), other=0.0).to(COMPUTE)
                    if USE_DOT:
                        tile += tl.dot(tl.trans(d), x, input_precision="ieee")
                    else:
                        tile += tl.sum(d[:, :, None] * x[:, None, :], axis=0)
                offs = (qs[:, None, None] * O + o0 + os_[None, :, None]) * I + i0 + is_[None, None, :]
                mask = (qs[:, None, None] < M) & (o0 + os_[None, :, None] < O) & (i0 + is_[None, None, :] < I)
                s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
                acc += tl.sum(tl.sum(s * tile[None, :, :], axis=2), axis=1)
        tl.store(out_ptr + b * M + qs, acc.to(out_ptr.dtype.element_ty), mask=qs < M)

    def _run_triton(a, delta, S, out) -> None:
        b, t, i = a.shape
        o, m = delta.shape[2], S.shape[0]
        block_q = min(16, triton.next_power_of_2(m))
        use_dot = a.dtype != torch.float64
        _score_contraction_kernel[(b, triton.cdiv(m, block_q))](
            a, delta, S, out, t, o, i, m, BT=16, BO=16, BI=16, BQ=block_q, USE_DOT=use_dot,
            COMPUTE=registry.triton_compute_dtype(a))

    registry.register(OP_NAME, "triton", _run_triton)
