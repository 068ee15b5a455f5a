"""What batching buys in the influence engine (pytest-benchmark).

Run: .venv/bin/pytest bench/bench_influence.py --benchmark-only
Each pair (block vs loop) runs in the same session, so report their ratio.
"""
import pytest
import torch

import pbrf_fast

MLPS = {
    "8-128-128-1": (8, (128, 128), 1, "mse"),
    "784-1024-1024-10": (784, (1024, 1024), 10, "cross_entropy"),
}


def _mlp_problem(name, n=128, seed=0):
    d_in, hidden, d_out, loss = MLPS[name]
    torch.manual_seed(seed)
    layers, width = [], d_in
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, d_out))
    x = torch.randn(n, d_in)
    t = torch.randint(d_out, (n,)) if loss == "cross_entropy" else torch.randn(n, d_out)
    return pbrf_fast.Problem(model, loss, x, t, weight_decay=1e-4, batch_size=n)


@pytest.mark.parametrize("mlp", list(MLPS))
@pytest.mark.parametrize("mode", ["block32", "loop32"])
def test_gnh_product(benchmark, mlp, mode):
    """One GNH product with m = 32 columns at once vs 32 single-vector products (batch 128)."""
    problem = _mlp_problem(mlp)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    V = torch.randn(problem.dim, 32)
    benchmark.group = f"gnh-product {mlp}"
    if mode == "block32":
        benchmark.pedantic(op.matvec, args=(V,), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: [op.matvec(V[:, j]) for j in range(32)], rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("n_train", [128, 1024])
@pytest.mark.parametrize("mode", ["block", "one_at_a_time"])
def test_s_test_100_points(benchmark, mode, n_train):
    """s_test for 100 test points solved together vs one at a time (CG, same tolerance)."""
    problem = _mlp_problem("8-128-128-1", n=n_train)
    problem.batch_size = n_train
    influence = pbrf_fast.Influence(problem, damping=1e-2, solver="cg", solver_options={"tol": 1e-4})
    gen = torch.Generator().manual_seed(1)
    x_test, t_test = torch.randn(100, 8, generator=gen), torch.randn(100, 1, generator=gen)
    benchmark.group = f"s_test 100 points, MLP 8-128-128-1, {n_train} train"
    if mode == "block":
        benchmark.pedantic(influence.s_test, args=(x_test, t_test), rounds=2, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: [influence.s_test(x_test[j:j + 1], t_test[j:j + 1]) for j in range(100)],
                           rounds=1, warmup_rounds=0)
