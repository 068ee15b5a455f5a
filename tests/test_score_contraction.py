"""Score contraction (kernels/score_contraction.py) against a float64 reference that
forms per-example gradients explicitly: every backend, odd shapes, both dtypes,
poisoned outputs, non-contiguous inputs, low-rank and Conv2d forms."""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from pbrf_fast.kernels import BackendUnavailable, plan_backend
from pbrf_fast.kernels.score_contraction import (choose_order, contraction_flops, conv2d_score_contraction,

                                                 score_contraction, score_contraction_lowrank,
                                                 score_contraction_reference)

from factories import CUDA_EMULATED

OP = "score_contraction"
gpu = pytest.mark.gpu
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpret"),
    pytest.param("cuda", "cuda", id="cuda", marks=gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=gpu),
    CUDA_EMULATED,
]
# (b, t, o, i, m); t = None means 2-D (Linear) inputs.
SHAPES = [(1, None, 1, 1, 1), (5, None, 3, 7, 2), (9, 13, 17, 19, 5), (4, 40, 5, 33, 3), (3, 2, 20, 1, 17)]


def explicit_reference(a, delta, S):
    a, delta, S = a.double(), delta.double(), S.double()
    if a.dim() == 2:
        a, delta = a.unsqueeze(1), delta.unsqueeze(1)
    grads = torch.einsum("bto,bti->boi", delta, a)  # per-example gradients, explicitly
    return torch.einsum("boi,qoi->bq", grads, S)


def tol(dtype):
    return dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def need(backend, tensor):
    try:
        plan_backend(OP, tensor.dtype, tensor.device, backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def make(shape, dtype, device, seed):
    b, t, o, i, m = shape
    g = torch.Generator().manual_seed(seed)
    lead = (b,) if t is None else (b, t)
    a = torch.randn(*lead, i, generator=g, dtype=torch.float64)
    d = torch.randn(*lead, o, generator=g, dtype=torch.float64)
    S = torch.randn(m, o, i, generator=g, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (a, d, S)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_explicit_per_example_gradients(backend, device, dtype, shape):
    a, d, S = make(shape, dtype, device, int(hashlib.sha256(repr(shape).encode()).hexdigest()[:6], 16) % 1000)
    need(backend, a)
    out = torch.full((a.shape[0], S.shape[0]), math.nan, dtype=dtype, device=device)  # poisoned
    result = score_contraction(a, d, S, backend=backend, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(result.double().cpu(), explicit_reference(a, d, S).cpu(), **tol(dtype))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous_inputs(backend, device):
    a, d, S = make((6, 5, 8, 11, 3), torch.float64, device, 3)
    need(backend, a)
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)          # strided batch
    d_nc = torch.cat([d, d], -1)[..., ::2].clone()[..., :]            # copy
    d_nc = torch.stack([d, d], -1)[..., 0]                             # strided last dim
    S_nc = S.transpose(1, 2).contiguous().transpose(1, 2)
    assert not a_nc.is_contiguous() and not d_nc.is_contiguous() and not S_nc.is_contiguous()
    result = score_contraction(a_nc, d_nc, S_nc, backend=backend)
    torch.testing.assert_close(result.cpu(), explicit_reference(a, d, S).cpu(), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch_and_zero_tokens(backend, device):
    a, d, S = make((0, 3, 4, 5, 2), torch.float64, device, 4)
    need(backend, S)
    assert score_contraction(a, d, S, backend=backend).shape == (0, 2)
    a, d, S = make((3, 3, 4, 5, 2), torch.float64, device, 5)
    r = score_contraction(a[:, :0], d[:, :0], S, backend=backend)
    assert torch.equal(r.cpu(), torch.zeros(3, 2, dtype=torch.float64))


def test_reference_orders_agree():
    # t = 1 takes the projection order, t > 1 the gradient-tile order; both exact.
    for shape in [(7, 1, 30, 9, 4), (7, 1, 9, 30, 4), (7, 6, 9, 30, 4)]:
        a, d, S = make(shape, torch.float64, "cpu", 6)
        torch.testing.assert_close(score_contraction_reference(a, d, S), explicit_reference(a, d, S))
    assert choose_order(10, 1, 100, 100, 10) == "projection"
    assert choose_order(10, 1024, 16, 144, 10) == "gradient"
    costs = contraction_flops(10, 64, 64, 576, 10, rank=4)
    assert min(costs, key=costs.get) == choose_order(10, 64, 64, 576, 10, rank=4)


@pytest.mark.parametrize("shape,rank", [((5, 7, 9, 11, 3), 2), ((4, 1, 40, 50, 2), 1), ((4, 3, 3, 4, 2), 6)])
def test_lowrank_matches_dense(shape, rank):
    b, t, o, i, m = shape
    g = torch.Generator().manual_seed(7)
    a = torch.randn(b, t, i, generator=g, dtype=torch.float64)
    d = torch.randn(b, t, o, generator=g, dtype=torch.float64)
    L = torch.randn(m, o, rank, generator=g, dtype=torch.float64)
    R = torch.randn(m, i, rank, generator=g, dtype=torch.float64)
    expected = explicit_reference(a, d, L @ R.transpose(1, 2))
    torch.testing.assert_close(score_contraction_lowrank(a, d, L, R), expected)


CONV_CASES = [  # (kernel, stride, padding, dilation): stride 1 runs on shifted views, others unfold
    (3, 1, 1, 1), (3, 2, 0, 1), (3, 1, 2, 2), ((3, 2), 1, (2, 1), 1), (1, 1, 0, 1), ((2, 3), 1, 0, (2, 1)),
    (3, (2, 1), 1, 1), (5, 1, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("small_chunks", [False, True], ids=["one-chunk", "small-chunks"])
@pytest.mark.parametrize("kernel,stride,padding,dilation", CONV_CASES, ids=str)
def test_conv2d_matches_per_example_weight_gradients(monkeypatch, kernel, stride, padding, dilation,
                                                      small_chunks, dtype):
    import pbrf_fast.kernels.score_contraction as sc
    if small_chunks:  # one or two examples per chunk
        monkeypatch.setattr(sc, "_CPU_SHIFT_CHUNK_BYTES", 1)
        monkeypatch.setattr(sc, "_CPU_UNFOLD_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(8)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(3, 2, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 2, *k, generator=g, dtype=torch.float64)
    S = torch.randn(4, 5, 2, *k, generator=g, dtype=torch.float64)
    y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)

    def per_example(xi, dyi):
        return torch.func.grad(lambda w_: (F.conv2d(xi[None], w_, stride=stride, padding=padding,
                                                    dilation=dilation) * dyi[None]).sum())(w)

    grads = torch.func.vmap(per_example)(x, dy)
    expected = torch.einsum("bocij,qocij->bq", grads, S)
    args = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
    got = conv2d_score_contraction(x.to(dtype), dy.to(dtype), S.to(dtype), **args)
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), expected, **tolerance)
    # the all-at-once unfold (what every non-CPU or autograd call runs) agrees
    unfolded = conv2d_score_contraction(x, dy, S.requires_grad_(True), **args)
    torch.testing.assert_close(unfolded.detach(), expected, rtol=1e-10, atol=1e-10)


@gpu
@pytest.mark.parametrize("kernel,stride,padding,dilation", CONV_CASES[:3], ids=str)
def test_conv2d_on_cuda_matches_cpu(kernel, stride, padding, dilation):
    """The conv path on CUDA (unfold + the cuda op for scores; shifted strided views
    through cuBLAS for the gradient blocks) equals the CPU path in float64."""
    from pbrf_fast.kernels.score_contraction import conv2d_weight_gradient_blocks
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(3)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(5, 3, 9, 8, generator=g, dtype=torch.float64)
    y = F.conv2d(x, torch.zeros(4, 3, *k, dtype=torch.float64), stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    S = torch.randn(6, 4, 3, *k, generator=g, dtype=torch.float64)
    args = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
    cpu = conv2d_score_contraction(x, dy, S, **args)
    cuda = conv2d_score_contraction(x.cuda(), dy.cuda(), S.cuda(), **args)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-10, atol=1e-10)
    norms = {}
    for device in ("cpu", "cuda"):
        total = torch.zeros(5, dtype=torch.float64, device=device)
        for k0, n, _, G in conv2d_weight_gradient_blocks(x.to(device), dy.to(device), **args):
            total[k0:k0 + n] += G.pow(2).sum((1, 2))
        norms[device] = total.cpu()
    torch.testing.assert_close(norms["cuda"], norms["cpu"], rtol=1e-10, atol=1e-10)


def test_conv2d_geometry_errors():
    x, dy, S = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(5, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="do not fit kernel"):
        conv2d_score_contraction(x, dy, S, kernel_size=3, padding=0)   # 6 x 6 outputs, not 8 x 8
    with pytest.raises(ValueError, match="same b"):
        conv2d_score_contraction(x, dy[:1], S, kernel_size=3, padding=1)


def test_argument_errors():
    a, d, S = make((3, 2, 4, 5, 2), torch.float64, "cpu", 9)
    with pytest.raises(ValueError, match="S must have shape"):
        score_contraction(a, d, S.transpose(1, 2))
    with pytest.raises(ValueError, match="disagree"):
        score_contraction(a, d[:2], S)
    with pytest.raises(ValueError, match="dtype mismatch"):
        score_contraction(a.float(), d, S)
    with pytest.raises(ValueError, match="out has shape"):
        score_contraction(a, d, S, out=torch.empty(3, 3, dtype=torch.float64))


def test_autograd_keeps_torch():
    a, d, S = make((3, 2, 4, 5, 2), torch.float64, "cpu", 10)
    S.requires_grad_(True)
    score_contraction(a, d, S).sum().backward()
    assert S.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(7, None, 3, 11, 5), (13, 1, 9, 23, 6), (5, 1, 31, 17, 3), (11, 3, 7, 13, 1),
                                   (9, 13, 17, 19, 5), (6, 37, 5, 33, 7), (3, 0, 4, 5, 2), (0, 4, 3, 5, 2)], ids=str)
@pytest.mark.parametrize("small_chunks", [False, True], ids=["one-chunk", "small-chunks"])
def test_torch_cpu_fast_path_matches_dense(monkeypatch, dtype, shape, small_chunks):
    # The CPU fast path against a float64 einsum; tiny budgets force the example and query chunking.
    import pbrf_fast.kernels.score_contraction as sc
    if small_chunks:
        monkeypatch.setattr(sc, "_TORCH_CHUNK_ELEMENTS", 37)
        monkeypatch.setattr(sc, "_CPU_GRADIENT_CHUNK_BYTES", 3 * 8 * shape[2] * shape[3])
    a, d, S = make(shape, dtype, "cpu", sum(x or 0 for x in shape))
    expected = explicit_reference(a, d, S)
    got = sc.score_contraction_torch_cpu(a, d, S)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, **tol(dtype))
    out = torch.full_like(got, math.nan)
    assert score_contraction(a, d, S, out=out).data_ptr() == out.data_ptr()  # "auto" on CPU takes this path
    torch.testing.assert_close(out.double(), expected, **tol(dtype))
