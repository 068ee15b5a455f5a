"""The blocked GEMM inside the fused C++ kernels (csrc/cpu/gemm_cpu.cpp) against torch.

It has two paths: packed register tiles, and unpacked loops for thin shapes
(M <= 4 or N <= 16, where a register tile would be mostly padding). Both must
handle any element strides (transposed operands, a transposed C), C = AB and
C += AB, batches, and give bit-identical results for any thread count.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from pbrf_fast.kernels import registry

ext = registry.cpu_extension
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "gemm"), reason="pbrf_fast._C not built")

SHAPES = [  # (M, N, K): thin rows, thin columns, tiny depth, odd, bigger than one cache block
    (1, 1, 1), (1, 128, 37), (3, 17, 50), (4, 9, 5), (45, 1, 33), (70, 8, 129), (33, 5, 0),
    (13, 40, 1), (37, 45, 29), (150, 70, 300), (12, 32, 16),
    (70, 13, 129), (21, 16, 40), (9, 11, 300), (6, 17, 7),  # N <= 16: blocked dot products
]


def strided(batch, rows, cols, transposed, dtype, generator):
    """A (batch, rows, cols) tensor, row-major or a transposed view."""
    if transposed:
        return torch.randn(batch, cols, rows, dtype=dtype, generator=generator).transpose(1, 2)
    return torch.randn(batch, rows, cols, dtype=dtype, generator=generator)


def operand(t):
    """A (batch, rows, cols) view as the GEMM's strided operand."""
    return registry.extension_args(ext.StridedOperand, data=t.data_ptr(), row_stride=t.stride(1),
                                   col_stride=t.stride(2), batch_stride=t.stride(0))


def run(A, B, C, accumulate, threads):
    batch, M, K = A.shape
    N = B.shape[2]
    ext.gemm(registry.extension_args(
        ext.GemmArgs, dtype=registry.dtype_name(A), M=M, N=N, K=K, batch=batch, a=operand(A),
        b=operand(B), c=operand(C), accumulate=accumulate, threads=threads))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=lambda v: str(v))
def test_gemm_matches_torch_for_every_layout(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * 10007 + N * 101 + K)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for trans_a, trans_b, trans_c, accumulate, batch in itertools.product(
            (False, True), (False, True), (False, True), (False, True), (1, 3)):
        A = strided(batch, M, K, trans_a, dtype, g)
        B = strided(batch, K, N, trans_b, dtype, g)
        C0 = strided(batch, M, N, trans_c, dtype, g)
        expected = (A.double() @ B.double()) + (C0.double() if accumulate else 0)
        results = []
        for threads in (1, 2, 3):
            C = C0.clone() if not trans_c else C0.transpose(1, 2).clone().transpose(1, 2)
            run(A, B, C, accumulate, threads)
            results.append(C)
        scale = expected.abs().max().clamp_min(1.0)
        err = (results[0].double() - expected).abs().max() / scale
        assert err < tolerance, (trans_a, trans_b, trans_c, accumulate, batch, float(err))
        # each element is reduced in one fixed order by one thread
        assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_gemm_leaves_the_rest_of_c_alone():
    """A product into a window of a bigger buffer writes exactly the window."""
    g = torch.Generator().manual_seed(0)
    for M, N, K in [(70, 8, 20), (3, 50, 20), (40, 41, 20)]:
        A = torch.randn(1, M, K, dtype=torch.float64, generator=g)
        B = torch.randn(1, K, N, dtype=torch.float64, generator=g)
        big = torch.full((1, M + 4, N + 6), float("nan"), dtype=torch.float64)
        window = big[:, 2:2 + M, 3:3 + N]
        run(A, B, window, False, 2)
        assert torch.allclose(window, A @ B, rtol=1e-12, atol=1e-12)
        window.zero_()
        assert torch.isnan(big).sum() == big.numel() - M * N


def test_gemm_args_need_every_field_by_name():
    """A forgotten, misspelt or mistyped field is a TypeError naming it, never a zero."""
    A = torch.randn(1, 2, 3, dtype=torch.float64)
    fields = dict(dtype="float64", M=2, N=2, K=3, batch=1, a=operand(A), b=operand(A),
                  c=operand(A), accumulate=False, threads=1)
    assert registry.extension_args(ext.GemmArgs, **fields).K == 3
    with pytest.raises(TypeError, match="missing threads, K$"):
        registry.extension_args(ext.GemmArgs, **{k: v for k, v in fields.items()
                                                 if k not in ("K", "threads")})
    with pytest.raises(TypeError, match="has no field 'num_threads'"):
        registry.extension_args(ext.GemmArgs, **fields, num_threads=1)
    with pytest.raises(TypeError, match="GemmArgs.M: cannot take a float"):
        registry.extension_args(ext.GemmArgs, **{**fields, "M": 2.0})
    with pytest.raises(ValueError, match="float32 and float64"):
        registry.extension_args(ext.GemmArgs, **{**fields, "dtype": "float16"})
