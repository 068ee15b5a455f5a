"""Fused MLP Gauss-Newton product and native LiSSA engine against their specs.

- mlp_gnh_product (every backend) == the explicit-matmul reference == the
  torch.func GaussNewton product, for each loss x activation, depths 1-3, odd
  widths, with and without bias, m in {1, 4};
- parse_mlp refuses unsupported models with a reason, and GaussNewton falls back;
- solve(..., "lissa", engine="native") == engine="python" (same seed), and both raise
  the same DivergenceError when the scale is too small.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.kernels import BackendUnavailable, Plan, plan_backend
from pbrf_fast.inverses import solve
from pbrf_fast.kernels.mlp_gnh import mlp_forward_reference, mlp_gnh_product, mlp_gnh_product_reference
from pbrf_fast.products.mlp import (BLAS_MIN_COLUMNS, mlp_gnh_product_blas, mlp_gnh_product_matmul,
                                    mlp_unsupported_reason, parse_mlp)

from factories import CUDA_EMULATED, LOSSES, make_targets, rel_err

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
SHAPES = [(5, 3), (5, 7, 3), (6, 9, 5, 4)]  # depths 1-3, odd widths
BACKEND_DEVICES = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
    CUDA_EMULATED,
]


def make_mlp(dims, activation, bias, dtype, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).to(dtype)


def make_problem(loss, dims, activation, bias, dtype=torch.float64, n=11, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    model = make_mlp(dims, activation, bias, dtype, seed).to(device)
    x = torch.randn(n, dims[0], generator=g, dtype=torch.float64).to(dtype)
    t = make_targets(loss, n, dims[-1], g)
    return pbrf_fast.Problem(model, loss, x.to(device), t.to(device), batch_size=64)


def runs(plan):
    return plan.implementation, plan.backend


def require(backend, tensor):
    try:
        plan_backend("mlp_gnh_product", tensor.dtype, tensor.device, backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "-".join(map(str, d)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_product_matches_reference_and_torch_func(backend, device, dtype, loss, activation,
                                                        dims, bias):
    problem = make_problem(loss, dims, activation, bias, dtype, device=device)
    require(backend, problem.theta)
    spec = parse_mlp(problem.model)
    assert spec is not None and spec.num_params == problem.dim
    x, t = problem.batch(None)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch_func = pbrf_fast.GaussNewton(problem, backend="torch")
    for m in (1, 4):
        V = torch.randn(problem.dim, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
        V = V.to(dtype=dtype, device=device)
        fused = mlp_gnh_product(spec, loss, problem.theta, x, V, backend=backend)
        reference = mlp_gnh_product_reference(spec, loss, problem.theta.double(), x.double(), V.double())
        with torch.no_grad():
            autodiff = torch_func._batch_sum(V.double(), x.double(), t) if dtype == torch.float64 \
                else torch_func._batch_sum(V, x, t).double()
        assert fused.shape == V.shape
        assert rel_err(fused.double(), reference) < tol
        assert rel_err(reference, autodiff) < (1e-10 if dtype == torch.float64 else 2e-5)
    # a (d,) vector keeps its shape
    v = V[:, 0].contiguous()
    assert mlp_gnh_product(spec, loss, problem.theta, x, v, backend=backend).shape == v.shape


@pytest.mark.parametrize("loss", LOSSES)
def test_gauss_newton_operator_uses_fused_product(loss):
    problem = make_problem(loss, (5, 7, 3), "tanh", True)
    require("cpu", problem.theta)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    fused = pbrf_fast.GaussNewton(problem, 0.1, backend="cpu").with_damping(0.2)
    assert fused.backend == "cpu"
    auto = pbrf_fast.GaussNewton(problem, 0.2)
    reference = pbrf_fast.GaussNewton(problem, 0.2, backend="torch")
    expected = reference.matvec(V)
    assert rel_err(fused.matvec(V), expected) < 1e-10
    assert rel_err(auto.matvec(V), expected) < 1e-10
    assert runs(auto.plan_product(problem.inputs, V)) == ("mlp-fused", "cpu")
    assert reference.plan_product(problem.inputs, V).implementation == "torch.func"


def test_auto_leaves_big_products_to_torch_blas():
    """Past fused_pays_off's work threshold "auto" takes torch.func (faster there);
    an explicit backend="cpu" still gets the fused kernel."""
    from pbrf_fast.kernels.mlp_gnh import AUTO_MAX_WORK, fused_pays_off

    problem = make_problem("mse", (5, 7, 3), "tanh", True)
    require("cpu", problem.theta)
    spec = parse_mlp(problem.model)
    small, big = torch.zeros(problem.dim, 2), torch.zeros(problem.dim, 1)
    batch_for_big = int(AUTO_MAX_WORK // spec.num_params) + 1
    assert fused_pays_off(spec, len(problem.inputs), 2)
    assert not fused_pays_off(spec, batch_for_big, 1)
    x_big = torch.zeros(batch_for_big, 5, dtype=problem.dtype)
    assert pbrf_fast.GaussNewton(problem, 0.1).plan_product(x_big, big).implementation == "mlp-matmul"
    assert runs(pbrf_fast.GaussNewton(problem, 0.1, backend="cpu").plan_product(x_big, big)) == ("mlp-fused", "cpu")
    assert runs(pbrf_fast.GaussNewton(problem, 0.1).plan_product(problem.inputs, small)) == ("mlp-fused", "cpu")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "-".join(map(str, d)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_blas_and_matmul_layout_products_match_reference(loss, activation, dims, bias, device):
    problem = make_problem(loss, dims, activation, bias, device=device)
    spec = parse_mlp(problem.model)
    x, t = problem.batch(None)
    forward = mlp_forward_reference(spec, problem.theta, x)
    for product in (mlp_gnh_product_blas, mlp_gnh_product_matmul):
        for m in (1, 3, BLAS_MIN_COLUMNS + 1):
            V = torch.randn(problem.dim, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m)).to(device)
            expected = mlp_gnh_product_reference(spec, loss, problem.theta, x, V)
            got = product(spec, loss, problem.theta, x, V)
            assert got.shape == V.shape and rel_err(got, expected) < 1e-12
            assert rel_err(product(spec, loss, problem.theta, x, V, forward=forward), expected) < 1e-12
        v = V[:, 0].contiguous()
        assert rel_err(product(spec, loss, problem.theta, x, v),
                       mlp_gnh_product_reference(spec, loss, problem.theta, x, v)) < 1e-12


def test_gnh_forward_cache_follows_parameter_and_data_changes():
    """Products over all data reuse each slice's forward state, and never a stale one."""
    problem = make_problem("cross_entropy", (5, 7, 3), "tanh", True, n=30)
    V = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch_op = pbrf_fast.GaussNewton(problem, 0.1, backend="torch", batch_size=8)
    op = pbrf_fast.GaussNewton(problem, 0.1, batch_size=8)   # four slices
    forced = ["mlp-matmul"]  # force the cached-forward paths on a small model
    op.products.plan = lambda x, V: Plan("gnh_product", forced[0], "torch", "forced by the test")
    first = op.matvec(V)
    assert len(op._cache["mlp_forward"]) == 4
    assert rel_err(first, torch_op.matvec(V)) < 1e-12
    assert rel_err(op.matvec(V), first) == 0
    problem.set_theta(problem.theta * 1.1)                  # new parameters
    assert rel_err(op.matvec(V), torch_op.matvec(V)) < 1e-12
    with torch.no_grad():
        problem.inputs.mul_(0.5)                            # data changed in place
    assert rel_err(op.matvec(V), torch_op.matvec(V)) < 1e-12
    problem.inputs = problem.inputs * 3.0                   # data replaced (may reuse the address)
    assert rel_err(op.matvec(V), torch_op.matvec(V)) < 1e-12
    forced[0] = "mlp-blas"
    assert rel_err(op.matvec(V), torch_op.matvec(V)) < 1e-12
    assert rel_err(op.with_damping(0.3).matvec(V),
                   pbrf_fast.GaussNewton(problem, 0.3, backend="torch", batch_size=8).matvec(V)) < 1e-12


def test_auto_dispatch_paths_are_all_exact():
    """"auto" runs many columns through the BLAS-shaped product and few through the fused
    kernel (or explicit matmuls); each equals torch.func to float64 precision."""
    problem = make_problem("cross_entropy", (6, 9, 5, 4), "relu", True)
    auto = pbrf_fast.GaussNewton(problem, 0.3)
    reference = pbrf_fast.GaussNewton(problem, 0.3, backend="torch")
    x = problem.inputs
    for m in (1, BLAS_MIN_COLUMNS):
        V = torch.randn(problem.dim, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
        assert rel_err(auto.matvec(V), reference.matvec(V)) < 1e-12
    assert auto.plan_product(x, torch.zeros(problem.dim, BLAS_MIN_COLUMNS)).implementation == "mlp-blas"
    assert auto.plan_product(x, torch.zeros(problem.dim, 2)).implementation in ("mlp-fused", "mlp-matmul")
    assert reference.plan_product(x, torch.zeros(problem.dim, 2)).implementation == "torch.func"


@pytest.mark.parametrize("model,reason", [
    (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)), "LayerNorm"),
    (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)), "Conv1d"),
    (nn.Sequential(nn.Linear(4, 5), nn.Tanh()), "last module"),
    (nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Tanh(), nn.Linear(5, 2)), "two activations"),
    (nn.Linear(4, 2), "not an nn.Sequential"),
])
def test_parse_mlp_refuses_unsupported_models_with_reason(model, reason):
    assert parse_mlp(model) is None
    assert reason in mlp_unsupported_reason(model)


def test_parse_mlp_accepts_flatten_identity_dropout_and_plain_linear_stacks():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Identity(), nn.Dropout(0.5),
                          nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2, bias=False)).eval()
    spec = parse_mlp(model)
    assert spec.dims == (6, 4, 3, 2) and spec.activations == ("identity", "sigmoid")
    assert spec.has_bias == (True, True, False)
    assert parse_mlp(model.train()) is None  # random dropout


def test_unsupported_model_falls_back_to_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(0)
    problem = pbrf_fast.Problem(model, "mse", torch.randn(7, 3, dtype=torch.float64, generator=g),
                                torch.randn(7, 2, dtype=torch.float64, generator=g))
    op = pbrf_fast.GaussNewton(problem, 0.1)
    plan = op.plan_product(problem.inputs, torch.zeros(problem.dim))
    assert plan.implementation == "torch.func" and "LayerNorm" in plan.reason
    V = torch.randn(problem.dim, 2, dtype=torch.float64)
    assert rel_err(op.matvec(V), pbrf_fast.GaussNewton(problem, 0.1, backend="torch").matvec(V)) < 1e-12
    with pytest.raises(BackendUnavailable, match="LayerNorm"):
        pbrf_fast.GaussNewton(problem, 0.1, backend="cpu").matvec(V)


# ---- native LiSSA ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dims,activation", [((4, 6, 3), "tanh"), ((5, 3), "relu"),
                                             ((3, 5, 4, 2), "sigmoid")])
def test_native_lissa_matches_python_lissa(loss, dims, activation, backend, device):
    problem = make_problem(loss, dims, activation, True, n=23, device=device)
    problem.weight_decay = 1e-2
    require(backend, problem.theta)
    B = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    options = dict(depth=30, repeats=2, batch_size=6, seed=5, compute_residual=True)
    # The Python loop over the torch.func product once (slow), else over the fused
    # product (itself checked against torch.func above): the loops are what differ.
    loop_backend = "torch" if loss == "mse" else "auto"
    python = solve(pbrf_fast.GaussNewton(problem, 0.05, backend=loop_backend), B, "lissa", engine="python", **options)
    native = solve(pbrf_fast.GaussNewton(problem, 0.05, backend=backend), B, "lissa", engine="native", **options)
    assert native.info["engine"] == "native" and python.info["engine"] == "python"
    assert native.info["scale"] == pytest.approx(python.info["scale"], rel=1e-10)
    assert rel_err(native.solution, python.solution) < 1e-5
    assert native.solution.shape == python.solution.shape
    assert native.residual_norms.shape == python.residual_norms.shape


def test_native_lissa_full_batch_and_single_vector():
    problem = make_problem("mse", (4, 6, 2), "tanh", True, n=9)
    require("cpu", problem.theta)
    b = torch.randn(problem.dim, dtype=torch.float64)
    op = pbrf_fast.GaussNewton(problem, 0.1)
    python = solve(op, b, "lissa", depth=30, batch_size=50, engine="python")
    native = solve(op, b, "lissa", depth=30, batch_size=50, engine="native")
    assert native.solution.shape == b.shape
    assert rel_err(native.solution, python.solution) < 1e-10


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_lissa_batch_slices_match_python(threads):
    """Batches of >= 32 rows on small networks are split among the threads (each
    runs its slice through the whole product); any thread count, even or not,
    gives the Python loop's answer, and the same divergence error."""
    problem = make_problem("cross_entropy", (6, 20, 3), "tanh", True, n=120)
    problem.weight_decay = 1e-2
    require("cpu", problem.theta)
    B = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    op = pbrf_fast.GaussNewton(problem, 0.05)
    options = dict(depth=25, repeats=2, batch_size=70, seed=3)
    python = solve(op, B, "lissa", engine="python", **options)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = solve(op, B, "lissa", engine="native", **options)
        with pytest.raises(pbrf_fast.DivergenceError) as native_error:
            solve(op, B, "lissa", depth=50, batch_size=40, scale=1e-3, engine="native")
    finally:
        torch.set_num_threads(before)
    assert rel_err(native.solution, python.solution) < 1e-10
    with pytest.raises(pbrf_fast.DivergenceError) as python_error:
        solve(op, B, "lissa", depth=50, batch_size=40, scale=1e-3, engine="python")
    assert str(native_error.value).split("||h||")[0] == str(python_error.value).split("||h||")[0]


def test_split_batch_falls_back_when_openmp_grants_fewer_threads(tmp_path):
    """Asked for 2 threads but granted 1 (OMP_THREAD_LIMIT), the fused product and
    the native LiSSA run the whole batch on the one thread, with the same answers."""
    require("cpu", torch.zeros(1, dtype=torch.float64))
    script = (
        "import torch, pbrf_fast, sys\n"
        "from test_mlp_kernels import make_problem, rel_err\n"
        "from pbrf_fast.inverses import solve\n"
        "torch.set_num_threads(2)\n"
        "p = make_problem('mse', (6, 20, 2), 'tanh', True, n=96)\n"
        "B = torch.randn(p.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
        "fused = pbrf_fast.GaussNewton(p, 0.1, backend='cpu').matvec(B)\n"
        "exact = pbrf_fast.GaussNewton(p, 0.1, backend='torch').matvec(B)\n"
        "assert rel_err(fused, exact) < 1e-12, rel_err(fused, exact)\n"
        "op = pbrf_fast.GaussNewton(p, 0.1)\n"
        "kw = dict(depth=20, batch_size=64, seed=1)\n"
        "a = solve(op, B, 'lissa', engine='native', **kw).solution\n"
        "b = solve(op, B, 'lissa', engine='python', **kw).solution\n"
        "assert rel_err(a, b) < 1e-10, rel_err(a, b)\n"
        "print('ok')\n")
    # the child imports the same pbrf_fast as this process (installed or in-tree) and this file
    package_root = os.path.dirname(os.path.dirname(pbrf_fast.__file__))
    path = os.pathsep.join([package_root, os.path.dirname(os.path.abspath(__file__)), *sys.path])
    env = dict(os.environ, OMP_THREAD_LIMIT="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_native_lissa_raises_divergence_like_python(backend, device):
    problem = make_problem("cross_entropy", (4, 6, 3), "tanh", True, n=20, device=device)
    require(backend, problem.theta)
    B = torch.randn(problem.dim, 2, dtype=torch.float64).to(device)
    messages = []
    for engine in ("python", "native"):
        op = pbrf_fast.GaussNewton(problem, 0.1, backend=backend if engine == "native" else "auto")
        with pytest.raises(pbrf_fast.DivergenceError, match="diverged in column") as info:
            solve(op, B, "lissa", depth=50, batch_size=5, scale=1e-3, engine=engine)
        messages.append(str(info.value))
    # same column, step and repeat; the norms' last digits may differ on the GPU
    assert messages[0].split("||h||")[0] == messages[1].split("||h||")[0]
    if device == "cpu":
        assert messages[0] == messages[1]


def test_lissa_engine_option_validation():
    problem = make_problem("mse", (4, 3), "tanh", True)
    B = torch.randn(problem.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="engine"):
        solve(pbrf_fast.GaussNewton(problem, 0.1), B, "lissa", depth=2, engine="fortran")
    with pytest.raises(BackendUnavailable, match="Gauss-Newton"):
        solve(pbrf_fast.Hessian(problem, 0.1), B, "lissa", depth=2, engine="native")
    # auto falls back to the Python loop for the Hessian
    assert solve(pbrf_fast.Hessian(problem, 0.1), B, "lissa", depth=2, scale=100.0).info["engine"] == "python"
