"""Exact GNH products on ResNet-20 (layer-wise) against plain torch.func and a training step, same run.

    python -m pytest bench/bench_conv_gnh.py --benchmark-only         # pytest-benchmark table
    python bench/bench_conv_gnh.py [--cuda] [--images N] [--rounds R]  # ratios, GFLOP/s, targets
    python bench/bench_conv_gnh.py --cg [--cg-train N] [--cg-test K] [--cg-iters I]   # block CG

ResNet-20 (pbrf_fast.paper.resnet, eval mode, float32) on N random CIFAR-shaped images
(default 1,000), cross-entropy:
- ``layerwise``: ``GaussNewton(backend="auto").matvec`` repeated on one operator, as a solver
  does (the primal pass is kept between products), m = 1 and m = 8;
- ``layerwise_cold``: the same with the kept state dropped before every product;
- ``layerwise_nchw``: the kept product with its activations in NCHW instead of the NHWC the
  layout rule picks for float32 images (the measurement behind that rule);
- ``torch_func``: this file's own plain torch.func reference: ``jvp`` of the model, the output
  Hessian, then ``vjp``, vmapped over the m columns (one primal ``vjp`` shared);
- ``train_step``: forward + backward of the mean loss (NCHW, train mode, same batch).
Plus the MLP 8-128-128-1 at batch 128, m = 1: ``GaussNewton.matvec(V, idx)`` vs its
torch.func reference, and the matvec's Python overhead (matvec time - kernel time).

Script mode interleaves the variants over R rounds and reports each one's fastest round,
so a loaded machine slows them alike. GFLOP/s count the convolutions and Linear layers:
a forward pass is F multiply-adds x 2, a training step 3F, a product with the primal
pass kept 4mF (tangent: conv(t, W) and conv(a, dW); backward: their two transposes).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbrf_fast
from pbrf_fast.paper.resnet import resnet20

DEVICE = os.environ.get("PBRF_BENCH_DEVICE") or ("cuda" if "--cuda" in sys.argv else "cpu")
IMAGES = int(os.environ.get("PBRF_BENCH_IMAGES", "1000"))
MLP_DIMS, MLP_BATCH, MLP_N = (8, 128, 128, 1), 128, 930


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def resnet_problem(n=IMAGES, seed=0, batch_size=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    t = torch.randint(10, (n,), generator=g)
    model = resnet20(seed=seed).to(DEVICE)
    return pbrf_fast.Problem(model, "cross_entropy", x.to(DEVICE), t.to(DEVICE), batch_size=batch_size or n)


def torch_func_product(problem, V):
    """Plain torch.func GNH product: sum_i J_i^T H_i J_i V (jvp, output Hessian, vjp; vmapped)."""
    theta, x, t = problem.theta, problem.inputs, problem.targets

    def outputs(th):
        return problem.forward(th, x)

    with torch.enable_grad():
        y, pullback = torch.func.vjp(outputs, theta)
        JV = torch.func.vmap(lambda v: torch.func.jvp(outputs, (theta,), (v,))[1])(V.T)
        HJV = problem.loss.hvp(y.detach(), t, JV.detach())
        (out,) = torch.func.vmap(pullback)(HJV)
    return out.detach().T


def training_step(problem):
    model = copy.deepcopy(problem.model).train()  # train mode must not move the problem's statistics
    x, t = problem.inputs, problem.targets

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), t).backward()

    return step


def multiply_adds_per_image(model, shape=(3, 32, 32)):
    """Multiply-adds of one image's forward pass through the Conv2d and Linear layers."""
    total = [0]

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            total[0] += out[0].numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            total[0] += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape, device=next(model.parameters()).device))
    for h in handles:
        h.remove()
    return total[0]


def matmul_gflops():
    a = torch.randn(2048, 1024, device=DEVICE)
    b = torch.randn(1024, 1024, device=DEVICE)
    return 2 * 2048 * 1024 * 1024 / best_times({"mm": lambda: a @ b}, 6)["mm"] / 1e9


def resnet_variants(problem, only=None):
    """name -> zero-argument function: every timed ResNet-20 variant (those whose name starts
    with one of ``only``'s prefixes, if given)."""
    from pbrf_fast.products import layerwise

    g = torch.Generator().manual_seed(1)
    V = {m: torch.randn(problem.dim, m, generator=g).to(DEVICE) for m in (1, 8)}
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    assert op.plan_product(problem.inputs, V[1]).implementation == "layerwise"
    # the same product with its activations kept in NCHW (the layout rule's alternative)
    nchw = pbrf_fast.GaussNewton(problem, 1e-3)
    nchw.products._layerwise = layerwise.parse_layerwise(problem)
    nchw.products._layerwise[0].channels_last = False

    def cold(m):
        def run():
            op._cache.clear()
            return op.matvec(V[m])
        return run

    variants = {"train_step": training_step(problem)}
    for m in (1, 8):
        variants[f"layerwise m={m}"] = lambda m=m: op.matvec(V[m])
        variants[f"layerwise_nchw m={m}"] = lambda m=m: nchw.matvec(V[m])
        variants[f"layerwise_cold m={m}"] = cold(m)
        variants[f"torch_func m={m}"] = lambda m=m: torch_func_product(problem, V[m])
    if only:
        variants = {k: f for k, f in variants.items() if any(k.startswith(prefix) for prefix in only)}
    return variants


# variants that keep state between calls (the primal pass): warmed up before the timed rounds
KEPT = ("layerwise m=", "layerwise_nchw m=")


def mlp_setup():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)).to(DEVICE)
    x, t = torch.randn(MLP_N, 8, generator=g), torch.randn(MLP_N, 1, generator=g)
    problem = pbrf_fast.Problem(model, "mse", x.to(DEVICE), t.to(DEVICE))
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    idx = torch.randperm(MLP_N, generator=g)[:MLP_BATCH]
    V = torch.randn(problem.dim, 1, generator=g).to(DEVICE)
    return problem, op, idx, V


def mlp_variants():
    from pbrf_fast.kernels import mlp_gnh, registry

    problem, op, idx, V = mlp_setup()
    x_batch, t_batch = problem.inputs[idx.to(DEVICE)], problem.targets[idx.to(DEVICE)]
    sub = pbrf_fast.Problem(problem.model, "mse", x_batch, t_batch)
    plan = op.plan_product(x_batch, V)
    spec = op.mlp_spec()[0]
    variants = {"mlp matvec(V, idx)": lambda: op.matvec(V, idx),
                "mlp torch_func": lambda: torch_func_product(sub, V)}
    if plan.implementation == "mlp-fused":
        kernel = registry.implementation(mlp_gnh.OP_NAME, plan.backend)
        theta, xc, out = problem.theta.contiguous(), x_batch.contiguous(), torch.empty_like(V)
        code = registry.loss_kind_code("mse")
        variants["mlp kernel only"] = lambda: kernel(spec, code, theta, xc, V, out)
    return variants


def best_times(variants, rounds, inner=1, warm=None):
    """Fastest round of each variant, the variants interleaved round by round. ``warm``:
    name prefixes of the variants to call once before timing (default: all)."""
    for name, f in variants.items():  # warm-up
        if warm is None or name.startswith(warm):
            f()
            sync()
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for name, f in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / inner)
    return best


def check_parity(problem):
    V = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    op = pbrf_fast.GaussNewton(problem, 0.0)
    a, b = op.data_matvec(V) * problem.n, torch_func_product(problem, V)
    return ((a - b).norm() / b.norm()).item()


# ---- pytest-benchmark --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    return resnet_variants(resnet_problem(min(IMAGES, int(os.environ.get("PBRF_BENCH_PYTEST_IMAGES", "100")))))


@pytest.mark.parametrize("name", ["train_step", "layerwise m=1", "layerwise_cold m=1", "torch_func m=1",
                                  "layerwise m=8", "torch_func m=8"])
def test_resnet20_gnh_product(benchmark, resnet, name):
    benchmark.group = "resnet20 gnh product"
    resnet[name]()  # warm: the operator keeps its primal pass, as in a solver
    benchmark.pedantic(lambda: (resnet[name](), sync()), rounds=2, warmup_rounds=0)


@pytest.mark.parametrize("name", ["mlp matvec(V, idx)", "mlp torch_func", "mlp kernel only"])
def test_mlp_gnh_product(benchmark, name):
    variants = mlp_variants()
    if name not in variants:
        pytest.skip("no fused kernel here")
    benchmark.group = "mlp 8-128-128-1 batch 128 m=1"
    benchmark(variants[name])


# ---- script mode ---------------------------------------------------------------------------------

def report_resnet(images, rounds, only=None, profile=False):
    problem = resnet_problem(images)
    print(f"ResNet-20, {images} images, {DEVICE}, {torch.get_num_threads()} threads, "
          f"parity vs torch.func (float32, m=2): {check_parity(resnet_problem(8)):.2e}")
    variants = resnet_variants(problem, only)
    t = best_times(variants, rounds, warm=KEPT)
    ceiling = matmul_gflops()
    fwd = 2 * multiply_adds_per_image(problem.model) * images
    for name, seconds in t.items():
        kept = name.startswith(KEPT)
        work = 3 * fwd if name == "train_step" else (4 * int(name[-1]) * fwd if kept else (1 + 4 * int(name[-1])) * fwd)
        print(f"  {name:22s} {seconds:9.3f} s   ~{work / seconds / 1e9:6.1f} GFLOP/s")
    print(f"  torch.mm ceiling this run: {ceiling:.1f} GFLOP/s")
    rows = [("layerwise m=1 / train_step", "layerwise m=1", "train_step", "<= 1.5"),
            ("torch_func m=1 / layerwise m=1", "torch_func m=1", "layerwise m=1", ">= 3"),
            ("layerwise m=8 / layerwise m=1", "layerwise m=8", "layerwise m=1", "<= 5"),
            ("nchw m=1 / layerwise m=1 (NHWC)", "layerwise_nchw m=1", "layerwise m=1", "layout"),
            ("nchw m=8 / layerwise m=8 (NHWC)", "layerwise_nchw m=8", "layerwise m=8", "layout"),
            ("cold m=8 / cold m=1", "layerwise_cold m=8", "layerwise_cold m=1", "(<= 5)"),
            ("torch_func m=8 / layerwise m=8", "torch_func m=8", "layerwise m=8", ""),
            ("layerwise_cold m=1 / train_step", "layerwise_cold m=1", "train_step", "")]
    for label, a, b, target in rows:
        if a in t and b in t:
            print(f"  {label:34s} {t[a] / t[b]:6.2f}x  {target}")
    if profile and "layerwise m=1" in variants:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            variants["layerwise m=1"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def stubbed_overhead(rounds):
    """matvec(V, idx) with the compiled work replaced by a no-op: its Python overhead alone
    (robust on a loaded machine, where the kernel's own time swings by milliseconds).

    Two cuts: the registry's kernel entry replaced (everything but the kernel wrapper), and
    only the compiled extension's call replaced (the wrapper's argument struct included).
    Beside them, in the same run, one small in-place tensor op (``V.add_(V)`` on the (d, 1)
    block, ~2-4 us on a quiet box) as the unit a loaded box slows alike."""
    import types

    from pbrf_fast.kernels import mlp_gnh, registry

    _, op, idx, V = mlp_setup()
    plan = op.plan_product(op.problem.inputs[:MLP_BATCH], V)
    if plan.implementation != "mlp-fused" or plan.backend != "cpu":
        return None
    kernel, extension = registry.implementation(mlp_gnh.OP_NAME, "cpu"), registry.cpu_extension
    scratch = V.clone()
    times = {"one in-place op": best_times({"op": lambda: scratch.add_(V)}, rounds, inner=1000)["op"]}
    registry.cpu_extension = types.SimpleNamespace(MlpGnhProductArgs=extension.MlpGnhProductArgs,
                                                   mlp_gnh_product=lambda args: None)
    try:
        times["extension call stubbed"] = best_times({"stub": lambda: op.matvec(V, idx)}, rounds, inner=1000)["stub"]
    finally:
        registry.cpu_extension = extension
    registry.register(mlp_gnh.OP_NAME, "cpu", lambda *args: None)
    try:
        times["kernel stubbed out"] = best_times({"stub": lambda: op.matvec(V, idx)}, rounds, inner=1000)["stub"]
    finally:
        registry.register(mlp_gnh.OP_NAME, "cpu", kernel)
    return times


def report_mlp(rounds):
    t = best_times(mlp_variants(), rounds, inner=200)
    for name, seconds in t.items():
        print(f"  {name:22s} {seconds * 1e6:9.1f} us")
    print(f"  torch_func / matvec: {t['mlp torch_func'] / t['mlp matvec(V, idx)']:.2f}x (target >= 5)")
    if "mlp kernel only" in t:
        print(f"  matvec overhead (matvec - kernel): {(t['mlp matvec(V, idx)'] - t['mlp kernel only']) * 1e6:.1f} us "
              "(target < 30)")
    stub = stubbed_overhead(rounds)
    if stub is not None:
        unit = stub["one in-place op"]
        for name, seconds in stub.items():
            print(f"  {name:24s} {seconds * 1e6:7.1f} us = {seconds / unit:5.1f} in-place ops"
                  + ("" if name == "one in-place op" else " (target < 30 us)"))


def report_cg(n_train, n_test, iters, data_dir, batch_size=500):
    """Block CG on the ResNet-20 GNH (damping 1e-3, tol 1e-4), capped at ``iters`` iterations.

    Prints the iterations, the column-products (block CG drops converged columns, so an
    iteration costs its active columns), the wall time and the time per column-product."""
    from pbrf_fast.inverses import solve

    if data_dir:
        from pbrf_fast.paper.data.cifar import load_cifar10

        x, y, x_test, y_test = load_cifar10(data_dir, n_train=n_train, n_test=n_test)
        source = "CIFAR-10"
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n_train, 3, 32, 32, generator=g), torch.randint(10, (n_train,), generator=g)
        x_test, y_test = torch.randn(n_test, 3, 32, 32, generator=g), torch.randint(10, (n_test,), generator=g)
        source = "random CIFAR-shaped"
    model = resnet20(seed=0).to(DEVICE)
    problem = pbrf_fast.Problem(model, "cross_entropy", x.to(DEVICE), y.to(DEVICE), batch_size=batch_size)
    xt, yt = problem.check_data(x_test.to(DEVICE), y_test.to(DEVICE))
    B = problem.per_example_gradients(xt, yt).T.contiguous()
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    matvec, calls = op.matvec, [0]

    def logged(V, idx=None):  # progress on stderr: a long solve shows its rate before it ends
        calls[0] += 1
        if calls[0] % 50 == 0:
            print(f"  ... {calls[0]} block products, {V.shape[-1] if V.dim() > 1 else 1} columns active, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return matvec(V, idx)

    op.matvec = logged
    sync()
    start = time.perf_counter()
    result = solve(op, B, method="cg", tol=1e-4, max_iter=iters, compute_residual=False)
    sync()
    seconds = time.perf_counter() - start
    its = torch.as_tensor(result.iterations).reshape(-1)
    steps, column_products = int(its.max()), int(its.sum()) if its.numel() == n_test else int(its.max()) * n_test
    converged = "?" if result.converged is None else int(result.converged.sum())
    print(f"block CG: {source}, {n_train} train images, {n_test} test points, damping 1e-3, tol 1e-4, "
          f"max_iter {iters}, {DEVICE}, {torch.get_num_threads()} threads: {seconds:.1f} s, {steps} iterations "
          f"(block products), {column_products} column-products, "
          f"{seconds / max(column_products, 1) * 1e3:.1f} ms per column-product = "
          f"{seconds / max(column_products, 1) / n_train * 1e3:.3f} ms per image-column; converged "
          f"{converged}/{n_test}, max residual estimate {float(result.residual_norms.max()):.2e}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mlp-only", action="store_true")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--cg", action="store_true", help="run only the block-CG measurement")
    parser.add_argument("--cg-train", type=int, default=2000)
    parser.add_argument("--cg-test", type=int, default=100)
    parser.add_argument("--cg-iters", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("PBRF_DATA"))
    parser.add_argument("--only", default="", help="comma-separated variant-name prefixes to time, "
                        "e.g. 'train_step,layerwise m=1,torch_func m=1'")
    parser.add_argument("--profile", action="store_true", help="print the m = 1 product's operator profile")
    args = parser.parse_args()
    if args.cg:
        report_cg(args.cg_train, args.cg_test, args.cg_iters, args.data_dir)
        sys.exit(0)
    if not args.mlp_only:
        report_resnet(args.images, args.rounds, [p for p in args.only.split(",") if p], args.profile)
    if not args.skip_mlp:
        print(f"MLP 8-128-128-1, batch {MLP_BATCH}, m=1, {DEVICE}")
        report_mlp(max(args.rounds, 5))
