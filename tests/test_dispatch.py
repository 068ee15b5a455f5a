"""The documented dispatch table: every row of the README's "Which implementation
runs" table is a case here, planned on a concrete problem, and the README holds
the row word for word. Also pbrf_fast.explain and `pbrf-fast backends --explain`."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast import products
from pbrf_fast.kernels import (plan_bregman_divergence, plan_conv2d_score_contraction,
                               plan_lissa_update, plan_output_hessian_product, plan_score_contraction, registry)
from pbrf_fast.inverses import plan_lissa

README = Path(__file__).resolve().parents[1] / "README.md"
HAS_CPU = registry.cpu_extension is not None
HAS_GPU = torch.cuda.is_available()


def mlp_operator(widths=(8, 16, 16, 1), n=32, backend="auto", loss="mse"):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(n, widths[0])
    problem = pbrf_fast.Problem(model, loss, x, torch.randn(n, widths[-1]))
    return pbrf_fast.GaussNewton(problem, 0.1, backend=backend)


def gnh(columns, backend="auto", n=32, widths=(8, 16, 16, 1)):
    op = mlp_operator(widths, n, backend)
    return op.plan_product(op.problem.inputs, torch.zeros(op.dim, columns))


def gnh_not_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 1))
    problem = pbrf_fast.Problem(model, "mse", torch.randn(9, 4), torch.randn(9, 1))
    op = pbrf_fast.GaussNewton(problem, 0.1)
    return op.plan_product(problem.inputs, torch.zeros(op.dim, 2))


def gnh_conv_net():
    """A residual conv block with eval BatchNorm, pooling and a Linear head."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x)) + x))

    problem = pbrf_fast.Problem(Block(), "cross_entropy", torch.randn(6, 2, 5, 5), torch.randint(3, (6,)))
    op = pbrf_fast.GaussNewton(problem, 0.1)
    return op.plan_product(problem.inputs, torch.zeros(op.dim, 2))


def gnh_fallback(model, x, y):
    problem = pbrf_fast.Problem(model, "cross_entropy", x, y)
    op = pbrf_fast.GaussNewton(problem, 0.1)
    with pytest.warns(pbrf_fast.errors.SlowPathWarning):
        return op.plan_product(problem.inputs, torch.zeros(op.dim, 2))


def gnh_transformer():
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    return gnh_fallback(Encoder(), torch.randn(3, 5, 4), torch.randint(3, (3,)))


class _OldStyleTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def gnh_custom_function():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            if x.dim() != 2:  # control flow on the input: torch.fx cannot trace it (not layer-wise)
                raise ValueError("expected (b, 4) inputs")
            return self.b(_OldStyleTanh.apply(self.a(x)))

    return gnh_fallback(Net(), torch.randn(3, 4), torch.randint(3, (3,)))


def lissa_plan(engine="auto", columns=1, batch_size=16, widths=(8, 16, 16, 1)):
    op = mlp_operator(widths)
    return plan_lissa(op, torch.zeros(op.dim, columns), batch_size=batch_size, engine=engine)


def lissa_hessian():
    op = mlp_operator()
    hessian = pbrf_fast.Hessian(op.problem, 0.1)
    return plan_lissa(hessian, torch.zeros(op.dim, 1), batch_size=16)


def contraction(device="cpu", grad=False, backend="auto"):
    a, delta, S = torch.randn(6, 5, device=device), torch.randn(6, 3, device=device), torch.randn(2, 3, 5, device=device)
    return plan_score_contraction(a.requires_grad_(grad), delta, S, backend)


def conv(stride):
    x = torch.randn(4, 3, 8, 8)
    out = nn.Conv2d(3, 6, 3, stride=stride, padding=1)(x).detach()
    return plan_conv2d_score_contraction(x, out, torch.randn(2, 6, 27), stride=stride)


def grad_logits():
    y = torch.randn(4, 3, requires_grad=True)
    return y


BIG = (784, 1024, 1024, 10)  # 1.9M parameters: one column at batch 64 is > 1e8 multiply-adds

# (README row, plan, expected implementation, expected backend, needs)
CASES = [
    ("| `gnh_product` (`GaussNewton.matvec`) | `backend=\"torch\"`, or neither a supported MLP nor a layer-wise network | `torch.func` |",
     lambda: gnh(2, backend="torch"), "torch.func", "torch", None),
    ("| `gnh_product` (`GaussNewton.matvec`) | `backend=\"torch\"`, or neither a supported MLP nor a layer-wise network | `torch.func` |",
     gnh_not_mlp, "torch.func", "torch", None),
    ("| `gnh_product` | as `torch.func`, but forward-mode AD fails on a fused attention kernel (`nn.TransformerEncoderLayer` in eval mode) | `torch.func-unfused` (fused fast paths off, one warning) |",
     gnh_transformer, "torch.func-unfused", "torch", None),
    ("| `gnh_product` | as `torch.func`, but torch.func cannot transform the model even unfused (a custom `autograd.Function` without `setup_context`, `jvp` or a vmap rule) | `reverse` (J v as a backward of a backward, one warning) |",
     gnh_custom_function, "reverse", "torch", None),
    ("| `gnh_product` | not an MLP, `\"auto\"`, every traced layer Conv2d, eval BatchNorm, ReLU / tanh / sigmoid, pooling, Linear, flatten, pad or residual add | `layerwise` |",
     gnh_conv_net, "layerwise", "torch", None),
    ("| `gnh_product` | supported MLP, `\"auto\"`, 12 or more columns | `mlp-blas` |",
     lambda: gnh(12), "mlp-blas", "torch", None),
    ("| `gnh_product` | supported MLP, `\"auto\"`, fewer columns, batch x columns x parameters > 1e8 | `mlp-matmul` |",
     lambda: gnh(1, n=64, widths=BIG), "mlp-matmul", "torch", None),
    ("| `gnh_product` | supported MLP, `\"auto\"`, fewer columns, at most 1e8 | `mlp-fused` (cpu / cuda kernel) |",
     lambda: gnh(2), "mlp-fused", "cpu", "cpu"),
    ("| `gnh_product` | supported MLP, `backend=\"cpu\"` or `\"cuda\"` | `mlp-fused` on that backend |",
     lambda: gnh(20, backend="cpu"), "mlp-fused", "cpu", "cpu"),
    ("| `mlp_lissa` (`solve(method=\"lissa\")`) | GNH of a supported MLP, `engine=\"auto\"`, batch x columns x parameters at most 1e8 | `native` (cpu / cuda) |",
     lissa_plan, "native", "cpu", "cpu"),
    ("| `mlp_lissa` | bigger products, a Hessian, `backend=\"torch\"` or `engine=\"python\"` | `python` (the loop in `solvers.lissa`) |",
     lambda: lissa_plan(batch_size=64, widths=BIG), "python", "torch", None),
    ("| `mlp_lissa` | bigger products, a Hessian, `backend=\"torch\"` or `engine=\"python\"` | `python` (the loop in `solvers.lissa`) |",
     lissa_hessian, "python", "torch", None),
    ("| `mlp_lissa` | bigger products, a Hessian, `backend=\"torch\"` or `engine=\"python\"` | `python` (the loop in `solvers.lissa`) |",
     lambda: lissa_plan(engine="python"), "python", "torch", None),
    ("| `lissa_update_`, `output_hessian_product`, `bregman_divergence` | CPU tensors, `\"auto\"` | `cpu` |",
     lambda: plan_lissa_update(torch.zeros(5, 2)), "cpu", "cpu", "cpu"),
    ("| `lissa_update_`, `output_hessian_product`, `bregman_divergence` | CPU tensors, `\"auto\"` | `cpu` |",
     lambda: plan_output_hessian_product(torch.zeros(4, 3), torch.zeros(2, 4, 3)), "cpu", "cpu", "cpu"),
    ("| `lissa_update_`, `output_hessian_product`, `bregman_divergence` | CPU tensors, `\"auto\"` | `cpu` |",
     lambda: plan_bregman_divergence(torch.zeros(4, 3), torch.zeros(4, 3)), "cpu", "cpu", "cpu"),
    ("| `lissa_update_`, `output_hessian_product`, `bregman_divergence` | CUDA tensors, `\"auto\"` | `cuda` (else `triton`, else `torch`) |",
     lambda: plan_lissa_update(torch.zeros(5, 2, device="cuda")), "cuda", "cuda", "gpu"),
    ("| `output_hessian_product`, `bregman_divergence` | an input requires grad, `\"auto\"` | `torch` (differentiable) |",
     lambda: plan_output_hessian_product(grad_logits(), torch.zeros(4, 3)), "torch", "torch", None),
    ("| `output_hessian_product`, `bregman_divergence` | an input requires grad, `\"auto\"` | `torch` (differentiable) |",
     lambda: plan_bregman_divergence(grad_logits(), torch.zeros(4, 3)), "torch", "torch", None),
    ("| `score_contraction` | CPU tensors, `\"auto\"` or `\"torch\"`, no autograd | `torch-blas` |",
     contraction, "torch-blas", "torch", None),
    ("| `score_contraction` | CPU tensors, `\"auto\"` or `\"torch\"`, no autograd | `torch-blas` |",
     lambda: contraction(backend="torch"), "torch-blas", "torch", None),
    ("| `score_contraction` | an input requires grad | `torch` (differentiable) |",
     lambda: contraction(grad=True), "torch", "torch", None),
    ("| `score_contraction` | CUDA tensors, `\"auto\"` | `cuda` (else `triton`, else `torch`) |",
     lambda: contraction("cuda"), "cuda", "cuda", "gpu"),
    ("| `conv2d_score_contraction` | CPU, stride 1, gradient order cheaper | `shifted-views` |",
     lambda: conv(1), "shifted-views", "torch", None),
    ("| `conv2d_score_contraction` | CPU, strided, gradient order cheaper | `chunked-unfold` |",
     lambda: conv(2), "chunked-unfold", "torch", None),
]


@pytest.mark.parametrize("row,plan,implementation,backend,needs", CASES,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(CASES)])
def test_documented_dispatch_table(row, plan, implementation, backend, needs):
    assert row in README.read_text(), f"README lacks the dispatch row {row!r}"
    if needs == "cpu" and not HAS_CPU:
        pytest.skip("pbrf_fast._C not built")
    if needs == "gpu" and not HAS_GPU:
        pytest.skip("needs a CUDA device")
    chosen = plan()
    assert (chosen.implementation, chosen.backend) == (implementation, backend), str(chosen)
    assert chosen.reason


def test_every_plan_is_what_runs():
    """The operator runs what its plan says: forcing a plan's implementation changes the code path."""
    op = mlp_operator(loss="mse")
    V = torch.randn(op.dim, 2)
    seen = []
    original = products._run_mlp

    def spy(owner, plan, *args, **kwargs):
        seen.append(plan.implementation)
        return original(owner, plan, *args, **kwargs)

    for name in ("mlp-blas", "mlp-matmul", "mlp-fused"):
        products._BY_NAME[name] = dataclasses.replace(products._BY_NAME[name], run=spy)
    try:
        op.matvec(V)
    finally:
        for name in ("mlp-blas", "mlp-matmul", "mlp-fused"):
            products._BY_NAME[name] = dataclasses.replace(products._BY_NAME[name], run=original)
    assert seen == [op.plan_product(op.problem.inputs, V).implementation]


def test_explicit_backend_that_cannot_run_is_named():
    with pytest.raises(pbrf_fast.kernels.BackendUnavailable, match="no triton implementation"):
        registry.plan_backend("mlp_gnh_product", torch.float32, "cpu", "triton")
    with pytest.raises(ValueError, match="unknown LiSSA engine"):
        lissa_plan(engine="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        plan_lissa_update(torch.zeros(3), "gpu")


def test_explain_covers_every_op_for_an_mlp_and_a_cnn():
    op = mlp_operator()
    plans = pbrf_fast.explain(op.problem.model, "mse", op.problem.inputs, columns=3)
    names = [p.op for p in plans]
    for expected in ("gnh_product", "mlp_lissa", "lissa_update_", "output_hessian_product", "bregman_divergence"):
        assert expected in names
    assert sum(n.startswith("score_contraction [") for n in names) == 3  # three Linear layers
    assert plans[0] == op.plan_product(op.problem.inputs, torch.zeros(op.dim, 3))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    plans = pbrf_fast.explain(cnn, "cross_entropy", torch.randn(5, 1, 6, 6))
    assert plans[0].implementation == "layerwise"
    plans_torch = pbrf_fast.explain(cnn, "cross_entropy", torch.randn(5, 1, 6, 6), backend="torch")
    assert plans_torch[0].implementation == "torch.func"
    assert [p.op for p in plans[-2:]] == ["conv2d_score_contraction [0]", "score_contraction [3]"]
    assert "gnh_product" in pbrf_fast.format_plans(plans)
    with pytest.raises(ValueError, match="columns"):
        pbrf_fast.explain(cnn, "cross_entropy", torch.randn(5, 1, 6, 6), columns=0)


def test_backends_explain_command():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pbrf_fast", "backends", *args], capture_output=True,
                              text=True, timeout=120)

    done = run("--explain", "--model", "mlp", "--inputs", "8", "--widths", "32,32", "--columns", "4", "--json")
    assert done.returncode == 0, done.stderr
    plans = json.loads(done.stdout)
    assert plans[0]["op"] == "gnh_product" and all(p["reason"] for p in plans)
    done = run("--explain", "--model", "lenet", "--inputs", "1,28,28", "--outputs", "10", "--loss", "cross_entropy")
    assert done.returncode == 0, done.stderr
    assert "conv2d_score_contraction" in done.stdout and "layerwise" in done.stdout
    assert run("--explain", "--inputs", "a,b").returncode != 0
