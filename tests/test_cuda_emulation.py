"""The CUDA kernels under the CPU emulator (pbrf_fast._C_cuda_emu, csrc/emulation).

The parity tests of test_kernels.py, test_mlp_kernels.py and
test_score_contraction.py already run every CUDA launcher under the emulator
(their "cuda-emulated" parameter). This file checks the emulator itself --
each kind of fault it claims to catch is caught -- and what only the emulator
can check: no kernel reads or writes outside its buffers (inputs and outputs
sit between NaN guards), and no result depends on the order in which a block's
threads run between barriers (a race).
"""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from pbrf_fast.kernels import (bregman_divergence, bregman_divergence_reference, lissa_update_,
                               lissa_update_reference_, output_hessian_product,
                               output_hessian_product_reference, plan_output_hessian_product, registry)
from pbrf_fast.kernels.lissa_engine import lissa_engine_reference, mlp_lissa
from pbrf_fast.kernels.mlp_gnh import MlpSpec, mlp_gnh_product, mlp_gnh_product_reference
from pbrf_fast.kernels.score_contraction import score_contraction, score_contraction_reference
from pbrf_fast.testing import cuda_emulation

emulator = pytest.importorskip("pbrf_fast._C_cuda_emu", reason="CUDA emulator not built")
ORDERS = [("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2)]
PAD = 67  # guard elements on each side of every buffer


def generator(seed):
    return torch.Generator().manual_seed(seed)


def guarded(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): a contiguous copy of t inside a buffer with PAD guard elements
    on each side, NaN for floats (an out-of-bounds read poisons the result) and 0 for
    integers (a valid index, so a stray read cannot crash the process)."""
    fill = float("nan") if t.is_floating_point() else 0
    buffer = torch.full((t.numel() + 2 * PAD,), fill, dtype=t.dtype)
    view = buffer[PAD:PAD + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buffer


def assert_guards_intact(*buffers: torch.Tensor) -> None:
    for buffer in buffers:
        for guard in (buffer[:PAD], buffer[-PAD:]):
            intact = torch.isnan(guard).all() if buffer.is_floating_point() else (guard == 0).all()
            assert intact, "a kernel wrote outside its buffer"


def poisoned(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An output buffer full of NaN, guarded: every element the kernel must write."""
    return guarded(torch.full(shape, float("nan"), dtype=dtype))


def selftest(name, order="forward", seed=0):
    """(error, outputs) of one self-test kernel run in the given thread order."""
    emulator.set_thread_order(order, seed)
    try:
        return emulator.selftest(name)
    finally:
        emulator.set_thread_order("forward", 0)


# ---- the emulator catches what it claims to -------------------------------------------------------

@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", "divergent barrier: some threads exited while others wait"),
    ("shared_overflow", "write past the end of a 128-byte __shared__ array"),
    ("shuffle_after_exit", "mask 0xffffffff, but the live lanes are 0x0000ffff"),
    ("too_many_threads", "cudaErrorInvalidConfiguration: .*block of 2048 threads"),
    ("too_much_shared", "cudaErrorInvalidConfiguration: .*65536 bytes of dynamic shared memory"),
])
def test_emulator_reports_each_fault(name, message):
    error, _ = selftest(name)
    assert error, f"{name}: the emulator reported nothing"
    assert re.search(message, error), error


def test_emulator_runs_correct_barriers_and_shuffles():
    for order, seed in ORDERS:
        error, values = selftest("block_sum", order, seed)
        assert error == ""
        assert values[:2] == [sum(range(64)) - 100.0, 1.0]  # warp shuffles + shared sum; __syncthreads_or


def test_emulator_poisons_unwritten_shared_memory():
    error, values = selftest("uninitialized_shared")
    assert error == ""
    assert all(v == i for i, v in enumerate(values) if i % 2 == 0)
    assert all(v != v for i, v in enumerate(values) if i % 2 == 1)  # NaN: never written


def test_thread_order_exposes_a_missing_barrier():
    results = {order: selftest("missing_barrier", order)[1] for order in ("forward", "reverse")}
    assert results["forward"] == [42.0] * 64
    assert results["reverse"][0] == 42.0 and all(v != v for v in results["reverse"][1:])


def test_block_order_exposes_an_unsynchronised_write():
    results = {order: selftest("block_race", order)[1][0] for order in ("forward", "reverse")}
    assert results == {"forward": 3.0, "reverse": 0.0}


def test_launch_errors_surface_as_runtime_errors():
    """A kernel fault inside a launcher reaches Python as RuntimeError with the detail."""
    def call_lissa_update(dtype, device):
        ext.lissa_update(registry.extension_args(
            ext.LissaUpdateArgs, dtype=dtype, h=0, v=0, gh=0, damping=0.0, scale=1.0, rows=1,
            cols=1, norms_squared=0, nonfinite_flag=0, device=device, stream=0))

    with cuda_emulation():
        ext = registry.cuda_extension
        with pytest.raises(ValueError, match="float32 and float64"):
            call_lissa_update("float16", 0)
        with pytest.raises(RuntimeError, match="cudaSetDevice"):
            call_lissa_update("float32", 3)


def test_emulation_context_routes_cuda_backend_and_restores():
    x = torch.randn(3, 4)
    with pytest.raises(registry.BackendUnavailable):
        plan_output_hessian_product(x, x, "cuda")
    with cuda_emulation() as emu:
        assert emu.emulated and plan_output_hessian_product(x, x, "cuda").backend == "cuda"
        assert plan_output_hessian_product(x, x).backend == "cpu" or registry.cpu_extension is None
        output_hessian_product("cross_entropy", x, x.clone(), backend="cuda")
        assert emu.counters()["launches"] == 1 and emu.counters()["shuffles"] > 0
    with pytest.raises(registry.BackendUnavailable):
        plan_output_hessian_product(x, x, "cuda")


def test_translator_rewrites_launches_and_shared_and_refuses_the_rest():
    path = Path(__file__).resolve().parents[1] / "csrc" / "emulation" / "translate_cuda.py"
    if not path.exists():
        pytest.skip("source tree not available")
    spec = importlib.util.spec_from_file_location("translate_cuda", path)
    translate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(translate)
    source = ("__global__ void k(float* x) {\n  __shared__ float tile[4][5];\n"
              "  extern __shared__ double dyn[];\n}\n"
              "void go(float* x, cudaStream_t s) {\n  k<<<dim3(2, 3),\n 64, 0, s>>>(x);\n"
              "  other<float><<<1, 32>>>();\n}\n")
    out = translate.translate(source, "x.cu")
    assert out.startswith('#line 1 "x.cu"\n') and out.count("\n") == source.count("\n") + 1
    assert "::pbrf_emu::Launch(dim3(2, 3),\n 64, 0, s)(k, x);" in out
    assert "::pbrf_emu::Launch(1, 32)(other<float>);" in out
    assert "auto& tile = ::pbrf_emu::SharedDeclaration<float[4][5]," in out
    assert "double* dyn = static_cast<double*>(::pbrf_emu::dynamic_shared());" in out
    with pytest.raises(SystemExit, match="cannot rewrite"):
        translate.translate("__global__ void k() { __shared__ float *p; }\n", "y.cu")
    # comments may mention the syntax freely
    assert "<<<" in translate.translate("// k<<<1, 2>>> and __shared__\n", "z.cu")


# ---- the real kernels: guarded buffers, every thread order ----------------------------------------

def run_in_every_order(compute):
    """compute() under each thread order; returns the list of results."""
    results = []
    for order, seed in ORDERS:
        with cuda_emulation(order, seed) as emu:
            results.append(compute())
            assert emu.counters()["launches"] > 0
    return results


def assert_all_equal(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first if isinstance(first, tuple) else (first,),
                        other if isinstance(other, tuple) else (other,)):
            assert torch.equal(a, b), "result depends on the order of the threads"


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_output_hessian_guarded_and_order_free(loss, dtype):
    g = generator(1)
    logits = torch.randn(9, 45, generator=g, dtype=torch.float64).to(dtype)   # 45 > one warp of classes
    vectors = torch.randn(3, 9, 45, generator=g, dtype=torch.float64).to(dtype)
    expected = output_hessian_product_reference(loss, logits.double(), vectors.double())

    def compute():
        (lg, lb), (vg, vb), (out, ob) = guarded(logits), guarded(vectors), poisoned(vectors.shape, dtype)
        output_hessian_product(loss, lg, vg, backend="cuda", out=out)
        assert_guards_intact(lb, vb, ob)
        return out.clone()

    results = run_in_every_order(compute)
    assert_all_equal(results)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(results[0].double(), expected, rtol=tol, atol=tol)


def test_output_hessian_without_shared_cache():
    """Over 48 KiB of probabilities per block: the kernel recomputes them instead of caching."""
    g = generator(2)
    logits = torch.randn(5, 1700, generator=g, dtype=torch.float64)
    vectors = torch.randn(2, 5, 1700, generator=g, dtype=torch.float64)
    with cuda_emulation():
        (lg, lb), (vg, vb), (out, ob) = guarded(logits), guarded(vectors), poisoned(vectors.shape, torch.float64)
        output_hessian_product("cross_entropy", lg, vg, backend="cuda", out=out)
    assert_guards_intact(lb, vb, ob)
    torch.testing.assert_close(out, output_hessian_product_reference("cross_entropy", logits, vectors),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_bregman_guarded_and_order_free(loss):
    g = generator(3)
    y = torch.randn(7, 40, generator=g, dtype=torch.float64)
    y_ref = torch.randn(7, 40, generator=g, dtype=torch.float64)
    expected = bregman_divergence_reference(loss, y, y_ref)

    def compute():
        (a, ab), (b, bb) = guarded(y), guarded(y_ref)
        (values, vb), (grad, gb) = poisoned((7,), torch.float64), poisoned((7, 40), torch.float64)
        bregman_divergence(loss, a, b, backend="cuda", out=(values, grad))
        assert_guards_intact(ab, bb, vb, gb)
        return values.clone(), grad.clone()

    results = run_in_every_order(compute)
    assert_all_equal(results)
    torch.testing.assert_close(results[0][0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows,cols", [(3000, 3), (2, 2100)], ids=["shared-sums", "global-sums"])  # grid-stride: 2-3 passes
def test_lissa_update_guarded_and_order_free(rows, cols):
    g = generator(4)
    h0, v, gh = (torch.randn(rows, cols, generator=g, dtype=torch.float64) for _ in range(3))
    h_ref = h0.clone()
    norms_ref, _ = lissa_update_reference_(h_ref, v, gh, 0.01, 7.0)

    def compute():
        (h, hb), (vv, vb), (gg, gb) = guarded(h0), guarded(v), guarded(gh)
        norms, nonfinite = lissa_update_(h, vv, gg, 0.01, 7.0, backend="cuda")
        assert_guards_intact(hb, vb, gb)
        assert not nonfinite
        return h.clone(), norms

    results = run_in_every_order(compute)
    for h, norms in results:  # the norms are float64 atomics: their order may move the last bit
        assert torch.equal(h, results[0][0])
        torch.testing.assert_close(norms, norms_ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(results[0][0], h_ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_score_contraction_guarded_and_order_free(dtype):
    g = generator(5)
    a = torch.randn(3, 37, 20, generator=g, dtype=torch.float64).to(dtype)      # tokens, in: 2-3 tiles
    delta = torch.randn(3, 37, 35, generator=g, dtype=torch.float64).to(dtype)  # out: 3 tiles
    S = torch.randn(11, 35, 20, generator=g, dtype=torch.float64).to(dtype)     # 11 > 8 warps
    expected = score_contraction_reference(a.double(), delta.double(), S.double())

    def compute():
        (ag, ab), (dg, db), (sg, sb) = guarded(a), guarded(delta), guarded(S)
        out, ob = poisoned((3, 11), dtype)
        score_contraction(ag, dg, sg, backend="cuda", out=out)
        assert_guards_intact(ab, db, sb, ob)
        return out.clone()

    results = run_in_every_order(compute)
    assert_all_equal(results)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(results[0].double(), expected, rtol=tol, atol=tol * expected.abs().max())


def mlp_case(dims, activation, seed, dtype=torch.float64):
    spec = MlpSpec(dims=dims, activations=(activation,) * (len(dims) - 2),
                   has_bias=tuple(l % 2 == 0 for l in range(len(dims) - 1)))
    g = generator(seed)
    theta = (0.3 * torch.randn(spec.num_params, generator=g, dtype=torch.float64)).to(dtype)
    return spec, theta, g


@pytest.mark.parametrize("m", [1, 3])
def test_mlp_product_multi_tile_guarded_and_order_free(m):
    """Widths above the 64-wide GEMM tile and batch over its 16-deep k-step."""
    spec, theta, g = mlp_case((70, 130, 11), "tanh", 6)
    x = torch.randn(67, 70, generator=g, dtype=torch.float64)
    V = torch.randn(spec.num_params, m, generator=g, dtype=torch.float64).squeeze(1)
    expected = mlp_gnh_product_reference(spec, "cross_entropy", theta, x, V)

    def compute():
        (tg, tb), (xg, xb), (vg, vb) = guarded(theta), guarded(x), guarded(V)
        out = mlp_gnh_product(spec, "cross_entropy", tg, xg, vg, backend="cuda")
        assert_guards_intact(tb, xb, vb)
        return out

    results = run_in_every_order(compute)
    assert_all_equal(results)
    torch.testing.assert_close(results[0], expected, rtol=1e-11, atol=1e-11 * expected.abs().max())


def test_mlp_lissa_guarded_and_order_free():
    spec, theta, g = mlp_case((6, 9, 4), "relu", 7)
    inputs = torch.randn(30, 6, generator=g, dtype=torch.float64)
    V = torch.randn(spec.num_params, 2, generator=g, dtype=torch.float64)
    schedule = torch.randint(0, 30, (2, 12, 5), generator=g)
    kwargs = dict(weight_decay=1e-3, damping=0.05, scale=50.0, limits=torch.full((2,), 1e6),
                  ceiling=float("inf"))
    expected = lissa_engine_reference(spec, "bce", theta, inputs, V, schedule, **kwargs)

    def compute():
        (tg, tb), (ig, ib), (vg, vb), (sg, sb) = guarded(theta), guarded(inputs), guarded(V), guarded(schedule)
        out = mlp_lissa(spec, "bce", tg, ig, vg, sg, backend="cuda", **kwargs)
        assert_guards_intact(tb, ib, vb, sb)
        return out.clone()

    results = run_in_every_order(compute)
    assert_all_equal(results)
    torch.testing.assert_close(results[0], expected, rtol=1e-11, atol=1e-11 * expected.abs().max())


def test_solvers_drive_the_emulated_cuda_kernels():
    """GaussNewton(backend="cuda") runs CG on the CUDA fused product and LiSSA on the
    CUDA engine; the answers equal the torch.func operator's."""
    import pbrf_fast
    from pbrf_fast.inverses import solve
    from test_mlp_kernels import make_problem, rel_err

    problem = make_problem("cross_entropy", (5, 8, 3), "tanh", True, n=17)
    B = torch.randn(problem.dim, 3, dtype=torch.float64, generator=generator(8))
    reference = pbrf_fast.GaussNewton(problem, 0.1, backend="torch")
    expected_cg = solve(reference, B, "cg", tol=1e-12).solution
    options = dict(depth=25, repeats=2, batch_size=4, seed=3)
    expected_lissa = solve(reference, B, "lissa", engine="python", **options).solution
    with cuda_emulation() as emu:
        op = pbrf_fast.GaussNewton(problem, 0.1, backend="cuda")
        assert rel_err(solve(op, B, "cg", tol=1e-12).solution, expected_cg) < 1e-9
        launches = emu.counters()["launches"]
        assert launches > 0
        native = solve(op, B, "lissa", engine="native", **options)
        assert native.info["engine"] == "native" and emu.counters()["launches"] > launches
        assert rel_err(native.solution, expected_lissa) < 1e-10
