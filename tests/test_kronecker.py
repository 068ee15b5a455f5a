"""K-FAC / EK-FAC (pbrf_fast.curvatures.kronecker) against dense float64 references.

The references build each layer's inputs and the Jacobian of the outputs with respect
to the layer's pre-activations one example at a time with torch.autograd.functional,
and the exact GNH with factories.dense_gnh, so they share no code with the factors."""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pbrf_fast
from pbrf_fast.atomic_io import atomic_save_tensor, load_tensor
from pbrf_fast.errors import InputError
from pbrf_fast.curvatures.kronecker import KroneckerCurvature, KroneckerFactors, compute_factors, kronecker_layers

from factories import dense_gnh, dense_gradients, make_problem, output_hessian, rel_err


def conv_problem(loss="cross_entropy", n=9, seed=0, bias=True, stride=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=stride, bias=bias), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * (5 // stride + (stride > 1)) ** 2, 4)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    t = torch.randint(4, (n,), generator=g)
    return pbrf_fast.Problem(model, loss, x, t, batch_size=4)


def dense_layer_factors(problem, layer):
    """A = 1/N sum_{n,t} a a^T and S = 1/(N T) sum_{n,t} J_t^T H_n J_t for one layer, where
    J_t is the Jacobian of the outputs with respect to the layer's pre-activation at t."""
    module, N = layer.module, problem.n
    A = S = 0
    for n in range(N):
        x = problem.inputs[n:n + 1]
        seen = {}
        handle = module.register_forward_hook(lambda m, i, o: seen.update(a=i[0].detach()))
        with torch.no_grad():
            y = problem.model(x)
        handle.remove()
        a = seen["a"]
        if isinstance(module, nn.Conv2d):
            patches = F.unfold(a, module.kernel_size, padding=module.padding, stride=module.stride)[0].T
        else:
            patches = a.reshape(1, -1)
        if module.bias is not None:
            patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=patches.dtype)], 1)
        A = A + patches.T @ patches
        shape = module(a).shape

        def outputs(e):
            h = module.register_forward_hook(lambda m, i, o: o + e)
            try:
                return problem.model(x).reshape(-1)
            finally:
                h.remove()

        J = torch.autograd.functional.jacobian(outputs, torch.zeros(shape, dtype=torch.float64))
        J = J.reshape(y.numel(), module.out_channels if isinstance(module, nn.Conv2d) else shape[-1], -1)
        H = output_hessian(problem.loss.name, y.reshape(1, -1))[0]
        T = J.shape[2]
        S = S + torch.einsum("cot,cd,dpt->op", J, H, J) / T
    return A / N, S / N


def block_index(layer):
    """Flat parameter positions of the layer's (o, i') matrix [W | b], row-major."""
    o = layer.out_dim
    lo, hi = layer.weight
    W = torch.arange(lo, hi).reshape(o, -1)
    if layer.bias is None:
        return W
    return torch.cat([W, torch.arange(*layer.bias).unsqueeze(1)], 1)


# ------------------------------------------------------------------------------------ factors
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_mlp_factors_equal_dense_factors(loss):
    problem = make_problem(loss, n=11, d_in=3, hidden=(5,), outputs=3, batch_size=4)
    factors = compute_factors(problem, "kfac", pseudo_gradients="exact")
    for layer in kronecker_layers(problem)[0]:
        A, S = dense_layer_factors(problem, layer)
        assert rel_err(factors.A[layer.name], A) < 1e-12
        assert rel_err(factors.S[layer.name], S) < 1e-12


@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_conv_factors_equal_dense_factors(stride, bias):
    problem = conv_problem(stride=stride, bias=bias)
    factors = compute_factors(problem, "kfac", pseudo_gradients="exact")
    layers = kronecker_layers(problem)[0]
    assert [type(layer.module) for layer in layers] == [nn.Conv2d, nn.Linear]
    for layer in layers:
        A, S = dense_layer_factors(problem, layer)
        assert rel_err(factors.A[layer.name], A) < 1e-12
        assert rel_err(factors.S[layer.name], S) < 1e-12


def test_generic_loss_uses_its_hessian_root():
    """An AutogradLoss (no closed form) gets the eigh square root of its output Hessian:
    the same factors as the built-in cross-entropy."""
    problem = make_problem("cross_entropy", n=7, hidden=(4,), outputs=3)
    custom = pbrf_fast.AutogradLoss(lambda y, t: F.cross_entropy(y, t, reduction="none"), name="ce")
    other = pbrf_fast.Problem(problem.model, custom, problem.inputs, problem.targets, batch_size=5)
    a, b = compute_factors(problem, "ekfac", pseudo_gradients="exact"), compute_factors(other, "ekfac",
                                                                                        pseudo_gradients="exact")
    for name in a.S:
        assert rel_err(b.S[name], a.S[name]) < 1e-10
        assert rel_err(b.corrected[name], a.corrected[name]) < 1e-10


def test_single_linear_layer_with_mse_is_exact():
    """y = W x + b with MSE: S = I and the GNH is exactly A (x) I, so K-FAC and EK-FAC both
    equal it (and their inverses the exact damped inverse)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    problem = pbrf_fast.Problem(model, "mse", torch.randn(17, 4, generator=g, dtype=torch.float64),
                                torch.randn(17, 3, generator=g, dtype=torch.float64), weight_decay=1e-3,
                                batch_size=5)
    exact = dense_gnh(problem, damping=1e-2)
    B = torch.randn(problem.dim, 3, generator=g, dtype=torch.float64)
    for kind in ("kfac", "ekfac"):
        op = KroneckerCurvature(problem, 1e-2, kind)
        assert rel_err(op.dense(), exact) < 1e-12
        assert rel_err(pbrf_fast.solve(op, B, "kronecker").solution, torch.linalg.solve(exact, B)) < 1e-11


@pytest.mark.parametrize("make", [lambda: make_problem("cross_entropy", n=9, hidden=(4,), outputs=3),
                                  lambda: conv_problem(n=5)], ids=["mlp", "conv"])
def test_ekfac_eigenvalues_are_the_gnh_diagonal_in_the_kronecker_basis(make):
    problem = make()
    factors = compute_factors(problem, "ekfac", pseudo_gradients="exact")
    G = dense_gnh(problem)
    for layer in kronecker_layers(problem)[0]:
        idx = block_index(layer).reshape(-1)
        block = G[idx][:, idx]
        _, Q_A, _, Q_S = factors.eigen[layer.name]
        U = torch.kron(Q_S, Q_A)
        expected = torch.diagonal(U.T @ block @ U).reshape(layer.out_dim, layer.in_dim)
        assert rel_err(factors.corrected[layer.name], expected) < 1e-10
        # K-FAC's eigenvalues are those of A (x) S
        l_A, _, l_S, _ = factors.eigen[layer.name]
        kron = torch.diagonal(U.T @ torch.kron(factors.S[layer.name], factors.A[layer.name]) @ U)
        assert rel_err(torch.outer(l_S, l_A).reshape(-1), kron) < 1e-10


def test_sampled_pseudo_gradients_are_seeded_and_unbiased():
    problem = make_problem("cross_entropy", n=40, hidden=(4,), outputs=3, batch_size=40)
    exact = compute_factors(problem, "kfac", pseudo_gradients="exact")
    one = compute_factors(problem, "kfac", pseudo_gradients="sampled", samples=400, seed=3)
    again = compute_factors(problem, "kfac", pseudo_gradients="sampled", samples=400, seed=3)
    other = compute_factors(problem, "kfac", pseudo_gradients="sampled", samples=400, seed=4)
    for name in exact.S:
        assert torch.equal(one.S[name], again.S[name])
        assert not torch.equal(one.S[name], other.S[name])
        assert rel_err(one.S[name], exact.S[name]) < 0.1  # 16 000 draws: a few percent off
        assert torch.equal(one.A[name], exact.A[name])


# ----------------------------------------------------------------------------------- operator
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_inverse_matches_dense_operator(kind):
    problem = make_problem("cross_entropy", n=12, hidden=(5,), outputs=3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(5)
    B = torch.randn(problem.dim, 4, generator=g, dtype=torch.float64)
    for options in ({}, {"relative_damping": 0.1}):
        op = KroneckerCurvature(problem, 1e-3, kind, **options)
        dense = op.dense()
        assert rel_err(dense, dense.T) < 1e-13
        result = pbrf_fast.solve(op, B)
        assert result.method == kind
        assert rel_err(result.solution, torch.linalg.solve(dense, B)) < 1e-10
        assert rel_err(op.matvec(result.solution), B) < 1e-10
    # with_damping shares the factors and moves every eigenvalue by the new damping
    op = KroneckerCurvature(problem, 1e-3, kind)
    other = op.with_damping(0.5)
    assert other.factors is op.factors
    assert rel_err(other.dense() - op.dense(), (0.5 - 1e-3) * torch.eye(problem.dim, dtype=torch.float64)) < 1e-12


def test_relative_damping_is_a_tenth_of_each_blocks_mean_eigenvalue():
    problem = make_problem("mse", n=10, hidden=(4,), outputs=2)
    op = KroneckerCurvature(problem, 0.0, "ekfac", relative_damping=0.1)
    plain = KroneckerCurvature(problem, 0.0, "ekfac", factors=op.factors)
    V = torch.zeros(problem.dim, 1, dtype=torch.float64)
    for layer in op.layers:
        lo, hi = layer.weight
        V.zero_()
        V[lo] = 1.0
        extra = (op.matvec(V) - plain.matvec(V))[lo, 0]
        assert abs(float(extra) - 0.1 * float(op.factors.corrected[layer.name].mean())) < 1e-14


def test_other_parameters_get_the_gnh_diagonal_and_are_reported():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))

        def forward(self, x):
            return x * self.gain

    torch.manual_seed(0)
    # eval-mode BatchNorm (served by the hooks) and a custom parameter (served by torch.func)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Scale(), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    problem = pbrf_fast.Problem(model, "cross_entropy", torch.randn(10, 3, generator=g, dtype=torch.float64),
                                torch.randint(3, (10,), generator=g), batch_size=4)
    others = ["1.weight", "1.bias", "2.gain"]
    with pytest.warns(UserWarning, match="2.gain"):
        op = KroneckerCurvature(problem, 1e-2, "ekfac")
    assert op.coverage == {"kronecker": ["0", "4"], "diagonal": others, "damping_only": []}
    starts = [sum(problem.param_sizes[:problem.param_names.index(n)]) for n in others]
    rows = torch.cat([torch.arange(start, start + 4) for start in starts])
    G = dense_gnh(problem)
    assert rel_err(op.factors.diagonal, torch.diagonal(G)[rows]) < 1e-12
    dense = op.dense()
    assert rel_err(dense[rows][:, rows], torch.diag(torch.diagonal(G)[rows] + 1e-2)) < 1e-12
    with pytest.warns(UserWarning, match="damping only"):
        bare = KroneckerCurvature(problem, 1e-2, "ekfac", other="damping")
    assert bare.coverage["damping_only"] == others
    assert rel_err(bare.dense()[rows][:, rows], 1e-2 * torch.eye(12, dtype=torch.float64)) < 1e-14
    with pytest.raises(InputError, match="2.gain"):
        KroneckerCurvature(problem, 1e-2, "ekfac", other="error")
    # the quadratic form g^T K^{-1} g, layer by layer, matches dense per-example gradients
    grads = dense_gradients(problem, problem.inputs, problem.targets)
    expected = (grads.T * torch.linalg.solve(dense, grads.T)).sum(0)
    assert rel_err(op.quadratic_form_per_example(problem.inputs, problem.targets), expected) < 1e-10


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_influence_scores_contract_per_layer(kind):
    problem = conv_problem(n=8)
    influence = pbrf_fast.Influence(problem, damping=1e-2, curvature=kind)
    x_test, t_test = problem.inputs[:3], problem.targets[:3]
    scores = influence.scores(x_test, t_test)
    assert influence.method == "kronecker"
    op = influence.operator
    dense = op.dense()
    test_grads = dense_gradients(problem, x_test, t_test)
    train_grads = dense_gradients(problem, problem.inputs, problem.targets)
    expected = train_grads @ torch.linalg.solve(dense, test_grads.T) / problem.n
    assert rel_err(scores, expected) < 1e-10
    assert rel_err(influence.scores(x_test, t_test, train_idx=[2, 5]), expected[[2, 5]]) < 1e-10


def test_factors_round_trip_through_disk(tmp_path):
    problem = conv_problem(n=6)
    op = KroneckerCurvature(problem, 1e-2, "ekfac")
    atomic_save_tensor(tmp_path / "factors.pt", op.factors.state_dict())
    loaded = KroneckerFactors.from_state_dict(load_tensor(tmp_path / "factors.pt"))
    again = KroneckerCurvature(problem, 1e-2, "ekfac", factors=loaded)
    B = torch.randn(problem.dim, 2, dtype=torch.float64)
    assert torch.equal(again.inverse_matvec(B), op.inverse_matvec(B))


# --------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_named_errors():
    problem = make_problem("mse", n=6, hidden=(3,), outputs=2)
    with pytest.raises(InputError, match="curvature"):
        pbrf_fast.Influence(problem, curvature="kfca")
    with pytest.raises(InputError, match="kind"):
        KroneckerCurvature(problem, 1e-3, "diag")
    with pytest.raises(InputError, match="pseudo_gradients"):
        KroneckerCurvature(problem, 1e-3, "kfac", pseudo_gradients="true")
    with pytest.raises(InputError, match="other"):
        KroneckerCurvature(problem, 1e-3, "kfac", other="drop")
    with pytest.raises(InputError, match="relative_damping"):
        KroneckerCurvature(problem, 1e-3, "kfac", relative_damping=-1.0)
    with pytest.raises(InputError, match="curvature_options"):
        pbrf_fast.Influence(problem, curvature="gnh", curvature_options={"other": "damping"})
    op = KroneckerCurvature(problem, 0.0, "kfac")
    with pytest.raises(InputError, match="damping"):
        op.inverse_matvec(torch.zeros(problem.dim, dtype=torch.float64))
    with pytest.raises(InputError, match="mini-batch"):
        op.matvec(torch.zeros(problem.dim, dtype=torch.float64), idx=[0, 1])
    with pytest.raises(InputError, match="kronecker"):
        pbrf_fast.solve(pbrf_fast.GaussNewton(problem, 1e-3), torch.zeros(problem.dim, dtype=torch.float64),
                        "kronecker")


def test_unsupported_models_are_refused():
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.w

    with pytest.raises(InputError, match="no nn.Linear"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KroneckerCurvature(pbrf_fast.Problem(NoLayers(), "mse", x, t), 1e-3, "kfac")
    shared = nn.Linear(3, 3).double()
    twice = pbrf_fast.Problem(nn.Sequential(shared, nn.Tanh(), shared), "mse", x, t)
    with pytest.raises(InputError, match="more than once"):
        KroneckerCurvature(twice, 1e-3, "kfac").factors
    nonconvex = pbrf_fast.AutogradLoss(lambda y, t: -(y - t).pow(2).sum(-1), convex_in_outputs=False)
    with pytest.raises(pbrf_fast.NonConvexLossError):
        KroneckerCurvature(pbrf_fast.Problem(nn.Linear(3, 3).double(), nonconvex, x, t), 1e-3, "kfac")


# -------------------------------------------------------------------------------- distributed
def _factor_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        problem = conv_problem(n=9)
        lo, hi = 9 * rank // world, 9 * (rank + 1) // world
        shard = pbrf_fast.Problem(problem.model, problem.loss, problem.inputs[lo:hi], problem.targets[lo:hi],
                                  batch_size=2)
        factors = compute_factors(shard, "ekfac", pseudo_gradients="exact", distributed=True)
        if rank == 0:
            torch.save(factors.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_factors_of_one_process(tmp_path):
    one = compute_factors(conv_problem(n=9), "ekfac", pseudo_gradients="exact")
    mp.spawn(_factor_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2, join=True)
    two = KroneckerFactors.from_state_dict(torch.load(tmp_path / "two.pt"))
    assert two.num_examples == one.num_examples == 9
    for name in one.A:
        assert rel_err(two.A[name], one.A[name]) < 1e-12
        assert rel_err(two.S[name], one.S[name]) < 1e-12
        assert rel_err(two.corrected[name], one.corrected[name]) < 1e-12


# ------------------------------------------------------------------------------ scale pipeline
def _pipeline_setup():
    from pbrf_fast.paper.models import mlp
    from pbrf_fast.paper.builtin_scores import load_dataset

    x_tr, y_tr, x_te, y_te = load_dataset("synthetic", n_train=40, n_test=3, seed=1)
    return mlp(12, (6,), 4, seed=0, dtype=torch.float64), x_tr.double(), y_tr, x_te.double(), y_te


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_pipeline_scores_self_influence_and_resume(tmp_path, kind):
    import numpy as np

    from pbrf_fast.scale import compute_scores

    model, x_tr, y_tr, x_te, y_te = _pipeline_setup()
    options = dict(damping=1e-2, weight_decay=1e-3, curvature=kind, solver="auto", query_chunk=2, batch_size=16,
                   curvature_batch_size=16, progress=False)
    summary = compute_scores(model, "cross_entropy", x_tr, y_tr, x_te, y_te, tmp_path / "run", **options)
    problem = pbrf_fast.Problem(model, "cross_entropy", x_tr, y_tr, weight_decay=1e-3)
    influence = pbrf_fast.Influence(problem, damping=1e-2, curvature=kind)
    expected = influence.scores(x_te, y_te).numpy()
    scores = np.load(tmp_path / "run" / "scores.npy")
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    dense = influence.operator.dense()
    grads = dense_gradients(problem, problem.inputs, problem.targets)
    self_expected = (grads.T * torch.linalg.solve(dense, grads.T)).sum(0) / problem.n
    np.testing.assert_allclose(np.load(tmp_path / "run" / "self_influence.npy"), self_expected.numpy(), rtol=1e-8)
    assert (tmp_path / "run" / f"factors_{kind}.pt").exists() and "factors" in summary["stage_seconds"]
    assert summary["self_influence_method"].startswith(kind)
    # a rerun finds every stage on disk: no factors computed again, the same bytes
    again = compute_scores(model, "cross_entropy", x_tr, y_tr, x_te, y_te, tmp_path / "run", **options)
    assert "factors" not in again["stage_seconds"]
    assert np.array_equal(np.load(tmp_path / "run" / "scores.npy"), scores)


@pytest.mark.parametrize("preconditioner", ["kfac", "nystrom"])
def test_pipeline_pcg_stores_its_preconditioner_and_matches_direct(tmp_path, preconditioner):
    import numpy as np

    from pbrf_fast.scale import ScoreArguments, compute_scores

    model, x_tr, y_tr, x_te, y_te = _pipeline_setup()
    options = {"tol": 1e-12, "preconditioner": preconditioner}
    if preconditioner == "nystrom":
        options["preconditioner_options"] = {"rank": 12}
    compute_scores(model, "cross_entropy", x_tr, y_tr, x_te, y_te, tmp_path, damping=1e-2, solver="pcg",
                   solver_options=options, query_chunk=3, batch_size=16, self_influence=False, progress=False)
    problem = pbrf_fast.Problem(model, "cross_entropy", x_tr, y_tr)
    expected = pbrf_fast.Influence(problem, damping=1e-2, solver="direct").scores(x_te, y_te).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())
    # the Kronecker factors are stored; a Nystrom sketch is rebuilt from the operator (r products)
    assert (tmp_path / "factors_kfac.pt").exists() == (preconditioner == "kfac")
    with pytest.raises(InputError, match="curvature"):
        ScoreArguments(curvature="diag")
    with pytest.raises(InputError, match="own exact inverse"):
        ScoreArguments(curvature="ekfac", solver="lowrank")


def test_scores_command_takes_a_curvature(tmp_path):
    import json

    from pbrf_fast.cli import main

    base = ["scores", "--dataset", "synthetic", "--model", "mlp", "--train-points", "60", "--test-points", "2",
            "--no-progress", "--threads", "1"]
    assert main([*base, "--curvature", "ekfac", "--solver", "auto", "--out", str(tmp_path / "ok")]) == 0
    arguments = json.loads((tmp_path / "ok" / "arguments.json").read_text())
    assert arguments["curvature"] == "ekfac" and (tmp_path / "ok" / "factors_ekfac.pt").exists()
    assert main([*base, "--curvature", "kfac", "--solver", "lowrank", "--out", str(tmp_path / "bad")]) == 2
