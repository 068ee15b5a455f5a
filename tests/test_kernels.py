"""Every kernel backend against the pure-torch reference (the spec).

Backends run here: cpu (pbrf_fast._C) and triton (interpreted on CPU
tensors via TRITON_INTERPRET=1, set in conftest.py); cuda and compiled triton
run under the ``gpu`` marker. Comparisons are against a float64 reference
computed from the same inputs.
"""
import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

from pbrf_fast.backends import backends
from pbrf_fast.kernels import (BackendUnavailable, bregman_divergence,
                               bregman_divergence_reference, lissa_update_,
                               lissa_update_reference_, output_hessian_product,
                               output_hessian_product_reference, plan_backend,
                               plan_output_hessian_product)
from pbrf_fast.kernels import registry

from factories import CUDA_EMULATED

LOSS_KINDS = ["mse", "cross_entropy", "bce"]
DTYPES = [torch.float32, torch.float64]
BATCHES = [1, 7, 33]
CLASSES = [1, 3, 10, 17]
NUM_VECTORS = [1, 5]
gpu = pytest.mark.gpu
# (backend, device) pairs; unavailable ones skip with the registry's reason.
BACKEND_DEVICES = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpret"),
    pytest.param("cuda", "cuda", id="cuda", marks=gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=gpu),
    CUDA_EMULATED,
]


def tolerances(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


def require_backend(op_name, backend, tensor):
    try:
        plan_backend(op_name, tensor.dtype, tensor.device, backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def make_generator(*key):
    # a stable digest: hash() of strings changes with PYTHONHASHSEED between processes
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16))


def randn(shape, dtype, device, gen, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)


# ---- output-Hessian product ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("num_vectors", NUM_VECTORS)
def test_output_hessian_matches_reference(backend, device, dtype, loss_kind, batch, classes,
                                          num_vectors):
    gen = make_generator("ohp", loss_kind, batch, classes, num_vectors)
    logits = randn((batch, classes), dtype, device, gen, scale=3.0)
    vectors = randn((num_vectors, batch, classes), dtype, device, gen)
    require_backend("output_hessian_product", backend, logits)
    out = torch.full_like(vectors, math.nan)  # poisoned: every element must be written
    result = output_hessian_product(loss_kind, logits, vectors, backend=backend, out=out)
    expected = output_hessian_product_reference(loss_kind, logits.double(), vectors.double())
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(result.double(), expected, **tolerances(dtype))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
def test_output_hessian_noncontiguous_and_leading_dims(backend, device, loss_kind):
    gen = make_generator("ohp-nc", loss_kind)
    logits = randn((10, 7), torch.float64, device, gen).t()  # (7, 10), non-contiguous
    vectors = randn((2, 3, 10, 7), torch.float64, device, gen).transpose(-1, -2)  # (2, 3, 7, 10)
    require_backend("output_hessian_product", backend, logits)
    result = output_hessian_product(loss_kind, logits, vectors, backend=backend)
    expected = output_hessian_product_reference(loss_kind, logits, vectors)
    assert result.shape == vectors.shape
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_classes", [100, 5000])
def test_output_hessian_long_rows_cpu(num_classes):
    gen = make_generator("ohp-long", num_classes)
    logits, vectors = randn((3, num_classes), torch.float64, "cpu", gen), randn((2, 3, num_classes), torch.float64, "cpu", gen)
    for loss_kind in LOSS_KINDS:
        torch.testing.assert_close(
            output_hessian_product(loss_kind, logits, vectors, backend="cpu"),
            output_hessian_product_reference(loss_kind, logits, vectors), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES[1::2])  # the triton ones
def test_output_hessian_triton_long_rows_use_tiles(backend, device):
    gen = make_generator("ohp-tiles")
    logits = randn((2, 5000), torch.float64, device, gen)  # > one 4096 tile
    vectors = randn((2, 2, 5000), torch.float64, device, gen)
    require_backend("output_hessian_product", backend, logits)
    for loss_kind in ("cross_entropy", "bce"):
        torch.testing.assert_close(
            output_hessian_product(loss_kind, logits, vectors, backend=backend),
            output_hessian_product_reference(loss_kind, logits, vectors), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES[1::2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_output_hessian_triton_half_inputs(backend, device, dtype):
    gen = make_generator("ohp-half", str(dtype))
    logits, vectors = randn((7, 10), dtype, device, gen), randn((3, 7, 10), dtype, device, gen)
    require_backend("output_hessian_product", backend, logits)
    result = output_hessian_product("cross_entropy", logits, vectors, backend=backend)
    expected = output_hessian_product_reference("cross_entropy", logits.double(), vectors.double())
    assert result.dtype == dtype
    torch.testing.assert_close(result.double(), expected, rtol=2e-2, atol=1e-2)


def test_output_hessian_reference_matches_autograd_hessian():
    gen = make_generator("ohp-autograd")
    logits, vectors, targets = (randn((1, 5), torch.float64, "cpu", gen) for _ in range(3))
    losses = {
        "mse": lambda y: 0.5 * ((y - targets) ** 2).sum(),
        "cross_entropy": lambda y: torch.nn.functional.cross_entropy(y, targets.softmax(-1), reduction="sum"),
        "bce": lambda y: torch.nn.functional.binary_cross_entropy_with_logits(y, targets.sigmoid(), reduction="sum"),
    }
    for loss_kind, loss in losses.items():
        hessian = torch.autograd.functional.hessian(loss, logits).reshape(5, 5)
        torch.testing.assert_close(output_hessian_product_reference(loss_kind, logits, vectors)[0],
                                   hessian @ vectors[0], rtol=1e-12, atol=1e-12)


# ---- Bregman divergence --------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
def test_bregman_matches_reference(backend, device, dtype, loss_kind, batch, classes):
    gen = make_generator("breg", loss_kind, batch, classes)
    outputs = randn((batch, classes), dtype, device, gen, scale=3.0)
    ref_outputs = randn((batch, classes), dtype, device, gen, scale=3.0)
    require_backend("bregman_divergence", backend, outputs)
    out = (torch.full((batch,), math.nan, dtype=dtype, device=device), torch.full_like(outputs, math.nan))
    values, grad = bregman_divergence(loss_kind, outputs, ref_outputs, backend=backend, out=out)
    expected_values, expected_grad = bregman_divergence_reference(loss_kind, outputs.double(), ref_outputs.double())
    assert values.data_ptr() == out[0].data_ptr() and grad.data_ptr() == out[1].data_ptr()
    torch.testing.assert_close(values.double(), expected_values, **tolerances(dtype))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerances(dtype))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
def test_bregman_noncontiguous_and_extreme_logits(backend, device, loss_kind):
    gen = make_generator("breg-nc", loss_kind)
    outputs = randn((9, 5), torch.float64, device, gen, scale=40.0).t()  # large: overflow-prone
    ref_outputs = randn((9, 5), torch.float64, device, gen, scale=40.0).t()
    require_backend("bregman_divergence", backend, outputs)
    values, grad = bregman_divergence(loss_kind, outputs, ref_outputs, backend=backend)
    expected_values, expected_grad = bregman_divergence_reference(loss_kind, outputs, ref_outputs)
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values, expected_values, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
def test_bregman_reference_is_differentiable_and_consistent(loss_kind):
    gen = make_generator("breg-autograd", loss_kind)
    outputs = randn((4, 6), torch.float64, "cpu", gen).requires_grad_()
    ref_outputs = randn((4, 6), torch.float64, "cpu", gen)
    values, grad = bregman_divergence(loss_kind, outputs, ref_outputs, backend="torch")
    (autograd_grad,) = torch.autograd.grad(values.sum(), outputs)
    torch.testing.assert_close(autograd_grad, grad.detach(), rtol=1e-12, atol=1e-12)
    zero, _ = bregman_divergence(loss_kind, ref_outputs, ref_outputs, backend="torch")
    torch.testing.assert_close(zero, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (values >= -1e-12).all()  # convex loss: divergence is non-negative


# ---- LiSSA update --------------------------------------------------------------------------------

LISSA_SHAPES = [(1,), (33,), (1000,), (7, 1), (33, 2), (17, 3), (100, 4), (9, 5), (65, 8), (5, 9)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LISSA_SHAPES, ids=str)
def test_lissa_update_matches_reference(backend, device, dtype, shape):
    gen = make_generator("lissa", shape)
    h, v, gh = (randn(shape, dtype, device, gen) for _ in range(3))
    require_backend("lissa_update_", backend, h)
    h_expected = h.double().clone()  # .double() is a no-op view for float64
    expected_norms, expected_nonfinite = lissa_update_reference_(h_expected, v.double(), gh.double(), 0.01, 7.0)
    pointer = h.data_ptr()
    norms, nonfinite = lissa_update_(h, v, gh, 0.01, 7.0, backend=backend)
    assert h.data_ptr() == pointer and nonfinite is False and expected_nonfinite is False
    assert norms.dtype == torch.float64 and norms.shape == ((1,) if len(shape) == 1 else (shape[1],))
    torch.testing.assert_close(h.double(), h_expected, **tolerances(dtype))
    torch.testing.assert_close(norms.cpu(), expected_norms, **tolerances(dtype))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_lissa_update_noncontiguous_h_is_updated_in_place(backend, device):
    gen = make_generator("lissa-nc")
    h = randn((3, 50), torch.float64, device, gen).t()  # (50, 3), non-contiguous view
    v, gh = randn((50, 3), torch.float64, device, gen), randn((3, 50), torch.float64, device, gen).t()
    require_backend("lissa_update_", backend, h)
    h_expected = h.clone()
    expected_norms, _ = lissa_update_reference_(h_expected, v, gh, 0.5, 3.0)
    norms, _ = lissa_update_(h, v, gh, 0.5, 3.0, backend=backend)
    torch.testing.assert_close(h, h_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norms.cpu(), expected_norms, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch")] + BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf], ids=["nan", "inf"])
def test_lissa_update_flags_nonfinite(backend, device, dtype, bad_value):
    h, v, gh = (torch.ones(40, 3, dtype=dtype, device=device) for _ in range(3))
    require_backend("lissa_update_", backend, h)
    gh[37, 1] = bad_value
    norms, nonfinite = lissa_update_(h, v, gh, 0.1, 2.0, backend=backend)
    assert nonfinite is True
    assert math.isfinite(norms[0].item()) and not math.isfinite(norms[1].item())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_lissa_update_huge_finite_values_are_not_flagged(backend, device):
    h = torch.full((10, 2), 1e200, dtype=torch.float64, device=device)  # squares overflow, values don't
    v, gh = torch.zeros_like(h), torch.zeros_like(h)
    require_backend("lissa_update_", backend, h)
    _, nonfinite = lissa_update_(h, v, gh, 0.0, 1.0, backend=backend)
    assert nonfinite is False


# ---- argument checking and backend selection ------------------------------------------------------

def test_bad_arguments_raise_value_errors_naming_the_problem():
    logits, vectors = torch.randn(4, 3), torch.randn(2, 4, 3)
    cases = [
        (lambda: output_hessian_product("hinge", logits, vectors), "loss_kind"),
        (lambda: output_hessian_product("mse", logits, vectors.double()), "dtype mismatch"),
        (lambda: output_hessian_product("mse", logits.long(), vectors.long()), "floating point"),
        (lambda: output_hessian_product("mse", logits, torch.randn(2, 4, 5)), "vectors must have shape"),
        (lambda: output_hessian_product("mse", logits[0], vectors), "logits must have shape"),
        (lambda: output_hessian_product("mse", logits, vectors.to("meta")), "device mismatch"),
        (lambda: output_hessian_product("mse", logits, vectors, out=torch.empty(4, 2, 3).transpose(0, 1)),
         "contiguous"),
        (lambda: output_hessian_product("mse", logits, vectors, out=torch.empty(2, 4, 3, dtype=torch.float64)),
         "must be torch.float32"),
        (lambda: bregman_divergence("mse", logits, logits[:2]), "ref_outputs must match"),
        (lambda: bregman_divergence("mse", logits, logits.double()), "dtype mismatch"),
        (lambda: lissa_update_(torch.randn(5), torch.randn(6), torch.randn(5), 0.1, 1.0), "v must match"),
        (lambda: lissa_update_(torch.randn(5, 2, 2), torch.randn(5, 2, 2), torch.randn(5, 2, 2), 0.1, 1.0),
         "h must have shape"),
        (lambda: lissa_update_(torch.randn(5), torch.randn(5), torch.randn(5), 0.1, 0.0), "scale"),
        (lambda: lissa_update_(torch.randn(5), torch.randn(5), torch.randn(5).half(), 0.1, 1.0), "dtype mismatch"),
        (lambda: output_hessian_product("mse", logits, vectors, backend="gpu"), "unknown backend"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_explicit_backend_that_cannot_serve_raises_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        output_hessian_product("mse", torch.randn(2, 3), torch.randn(2, 3), backend="cuda")
    if registry.cpu_extension is not None:
        with pytest.raises(BackendUnavailable, match="float16"):
            output_hessian_product("mse", torch.randn(2, 3).half(), torch.randn(2, 3).half(), backend="cpu")


def test_auto_backend_on_cpu_tensors():
    from conftest import REQUIRED_BACKENDS

    # Where .ci/run requires the cpu backend, the answer must not follow a broken build.
    expected = "cpu" if registry.cpu_extension is not None or "cpu" in REQUIRED_BACKENDS else "torch"
    x = torch.randn(2, 2)
    assert plan_output_hessian_product(x, x).backend == expected
    assert plan_output_hessian_product(x.bfloat16(), x.bfloat16()).backend == "torch"
    x.requires_grad_()
    assert plan_output_hessian_product(x, x).implementation == "torch"  # autograd: the reference


def test_required_backends_are_available():
    """The backends .ci/run names in PBRF_FAST_REQUIRE are built and usable here."""
    from pbrf_fast.testing import emulator_available

    from conftest import REQUIRED_BACKENDS

    if not REQUIRED_BACKENDS:
        pytest.skip("PBRF_FAST_REQUIRE not set")
    report = backends()
    for backend in REQUIRED_BACKENDS:
        if backend == "cuda-emulator":
            assert emulator_available(), "pbrf_fast._C_cuda_emu not built (PBRF_FAST_CUDA_EMULATOR=1)"
        else:
            assert report[backend]["available"], report[backend]["reason"]


def test_backends_report():
    report = backends()
    assert set(report) == {"torch", "cpu", "cuda", "triton"}
    assert report["torch"]["available"] is True
    for entry in report.values():
        assert isinstance(entry["available"], bool) and isinstance(entry["reason"], str) and entry["reason"]


def test_cuda_module_imports_and_reports_devices():
    if registry.cuda_extension is None:
        pytest.skip("pbrf_fast._C_cuda not built")
    count, status = registry.cuda_extension.device_count(), registry.cuda_extension.status()
    assert isinstance(status, str)
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count()
    else:
        assert count == 0 and "no CUDA device" in status
        assert backends()["cuda"]["available"] is False


def run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_triton_on_cpu_needs_interpret_mode_at_import():
    code = (
        "import torch\n"
        "from pbrf_fast.kernels import registry, BackendUnavailable\n"
        "if registry.triton is None: print('no triton'); raise SystemExit\n"
        "try: registry.plan_backend('lissa_update_', torch.float32, 'cpu', 'triton')\n"
        "except BackendUnavailable as e: print(e)\n"
    )
    result = run_python(code, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr
    if torch.cuda.is_available():
        pytest.skip("not meaningful on a GPU machine")
    assert "no triton" in result.stdout or "TRITON_INTERPRET=1" in result.stdout


def test_package_works_without_compiled_modules():
    code = (
        "import sys\n"
        "sys.modules['pbrf_fast._C'] = None; sys.modules['pbrf_fast._C_cuda'] = None\n"
        "sys.modules['triton'] = None\n"
        "import torch\n"
        "from pbrf_fast.backends import backends\n"
        "from pbrf_fast.kernels import output_hessian_product, plan_output_hessian_product\n"
        "report = backends()\n"
        "assert not report['cpu']['available'] and not report['triton']['available'], report\n"
        "assert plan_output_hessian_product(torch.ones(2, 2), torch.ones(2, 2)).backend == 'torch'\n"
        "y = torch.randn(3, 4); print(output_hessian_product('cross_entropy', y, y).shape)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([3, 4])" in result.stdout


def test_auto_keeps_autograd_working():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    vectors = torch.randn(2, 4, 3, dtype=torch.float64)
    output_hessian_product("cross_entropy", logits, vectors).sum().backward()
    assert logits.grad is not None
    values, _ = bregman_divergence("bce", logits, logits.detach() + 1)
    assert values.requires_grad
