"""The models people bring (issue 31): attention, recurrent layers, custom autograd Functions.

Every product and gradient is checked in float64 against dense references built by
``torch.autograd.functional`` (reverse mode, one output at a time: independent of the library's
torch.func and fallback paths).
"""
import warnings

import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.autodiff import unfused_attention
from pbrf_fast.errors import SlowPathWarning
from factories import dense_gnh, dense_gradients, rel_err

DT = torch.float64


# The reference's attention without fused kernels (they have no double backward): a switch of
# torch's own settings, no computation of the library's.
plain_attention = unfused_attention


class TransformerClassifier(nn.Module):
    """Embedding + one nn.TransformerEncoderLayer (fused fast path in eval mode) + mean pool + head."""

    def __init__(self, vocab=7, width=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.enc = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class GRUClassifier(nn.Module):
    def __init__(self, vocab=7, width=4, hidden=5, classes=3, cell=nn.GRU):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.rnn = cell(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0][:, -1])


class OldStyleSquare(torch.autograd.Function):
    """A custom Function without setup_context: no torch.func transform can enter it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class NoVmapSquare(torch.autograd.Function):
    """A new-style custom Function with neither jvp nor a vmap rule."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CustomFunctionNet(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.function.apply(self.a(x)))


def tokens_problem(model, n=6, length=5, vocab=7, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model.to(DT)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return pbrf_fast.Problem(model, "cross_entropy", x, torch.randint(0, classes, (n,), generator=g))


def custom_problem(function, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CustomFunctionNet(function).to(DT)
    return pbrf_fast.Problem(model, "mse", torch.randn(n, 3, generator=g, dtype=DT),
                             torch.randn(n, 2, generator=g, dtype=DT))


# ------------------------------------------------------------------------ item 1: the GNH product
@pytest.mark.parametrize("make,expected", [
    (lambda: tokens_problem(TransformerClassifier()), "torch.func-unfused"),
    (lambda: tokens_problem(GRUClassifier()), "torch.func"),
    (lambda: custom_problem(OldStyleSquare), "reverse"),
    (lambda: custom_problem(NoVmapSquare), "reverse"),
], ids=["transformer-eval", "gru", "old-style-function", "function-without-vmap"])
def test_gnh_product_of_any_differentiable_model_matches_dense(make, expected):
    problem = make()
    op = pbrf_fast.GaussNewton(problem)
    V = torch.randn(problem.dim, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = op.plan_product(problem.inputs, V)
    assert plan.implementation == expected, str(plan)
    fallbacks = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    if expected == "torch.func":
        assert not fallbacks
    else:  # said once, with the reason, and in the plan
        assert len(fallbacks) == 1 and "torch.func fails" in str(fallbacks[0].message)
        assert "torch.func fails" in plan.reason
    G = dense_gnh(problem)
    assert rel_err(op.data_matvec(V), G @ V) < 1e-10
    assert rel_err(op.data_matvec(V[:, 0]), G @ V[:, 0]) < 1e-10


@pytest.mark.parametrize("make", [lambda: tokens_problem(TransformerClassifier()),
                                  lambda: custom_problem(OldStyleSquare)], ids=["transformer-eval", "old-style-function"])
def test_hessian_product_falls_back_and_matches_dense(make):
    problem = make()
    x, t = problem.inputs, problem.targets

    def objective(th):
        return problem.loss.value(problem.forward(th, x), t).mean()

    with plain_attention():
        H = torch.autograd.functional.hessian(objective, problem.theta.clone())
    V = torch.randn(problem.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    with pytest.warns(SlowPathWarning, match="Hessian product"):
        HV = pbrf_fast.Hessian(problem).data_matvec(V)
    assert rel_err(HV, H @ V) < 1e-10


# ----------------------------------------------------- item 2: a forward pass that is not one function
class DropoutInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(nn.functional.dropout(self.a(x), 0.5))   # training=True by default: random


class DropoutModule(nn.Module):
    """An nn.Dropout forced into training mode (its train() ignores eval())."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)

    def train(self, mode=True):
        super().train(mode)
        self.drop.training = True
        return self

    def forward(self, x):
        return self.b(self.drop(self.a(x)))


class BatchStatisticsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        n = self.norm
        return self.b(nn.functional.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, training=True))


class TrainingBatchNorm2d(nn.Module):
    """An nn.BatchNorm2d forced into training mode: a batch of one runs (spatial positions), but
    every example's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Linear(8, 2)

    def train(self, mode=True):
        super().train(mode)
        self.norm.training = True
        return self

    def forward(self, x):
        return self.head(self.norm(self.conv(x.reshape(-1, 1, 3, 1).expand(-1, 1, 3, 3))).flatten(1))


@pytest.mark.parametrize("model,words", [
    (DropoutInForward, ["random", "'<model>'", "training=self.training"]),
    (DropoutModule, ["random", "'drop' (Dropout)", "model.eval()"]),
    (BatchStatisticsNorm, ["interact", "batch of two examples but not on one", "model.eval()"]),
], ids=["F.dropout", "nn.Dropout", "F.batch_norm"])
def test_a_forward_that_is_not_one_function_of_each_example_is_named(model, words):
    torch.manual_seed(0)
    m = model().to(DT)
    running = m.state_dict()
    x, t = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    rng = torch.random.get_rng_state()
    with pytest.raises(pbrf_fast.errors.NondeterministicModelError) as caught:
        pbrf_fast.Problem(m, "mse", x, t)
    for word in words:
        assert word in str(caught.value)
    assert torch.equal(torch.random.get_rng_state(), rng)          # the check consumed no randomness
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in running.items())  # nor moved statistics


def test_examples_that_interact_in_a_batch_are_warned_about_naming_the_module():
    """The batch objective's curvature is still one operator (a warning, not an error)."""
    torch.manual_seed(0)
    m = TrainingBatchNorm2d().to(DT)
    running = m.state_dict()
    with pytest.warns(pbrf_fast.errors.ExamplesInteractWarning, match="'norm' \\(BatchNorm2d\\)"):
        pbrf_fast.Problem(m, "mse", torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in running.items())


# ------------------------------------------- item 3: per-example gradients, EK-FAC, score contraction
class FunctionalProjection(nn.Module):
    """A Linear whose weight is used functionally (as nn.MultiheadAttention uses out_proj): its
    forward, and so any hook on it, never runs."""

    def __init__(self):
        super().__init__()
        self.a, self.proj = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.a(x)), self.proj.weight, self.proj.bias)


SEQUENCE_MODELS = {
    "transformer-eval": lambda: tokens_problem(TransformerClassifier()),
    "gru": lambda: tokens_problem(GRUClassifier()),
    "lstm": lambda: tokens_problem(GRUClassifier(cell=nn.LSTM)),
}


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
def test_per_example_gradients_of_attention_and_recurrent_models(name):
    problem = SEQUENCE_MODELS[name]()
    x, t = problem.inputs, problem.targets
    assert rel_err(problem.per_example_gradients(x, t), dense_gradients(problem, x, t)) < 1e-10
    from pbrf_fast.scale.measurement import measurement_gradients
    assert rel_err(measurement_gradients(problem, problem.loss.value, x[:3], t[:3]).T,
                   dense_gradients(problem, x[:3], t[:3])) < 1e-10


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
def test_ekfac_on_attention_and_recurrent_models_against_dense(name):
    """Attention: its query / key / value / output blocks are Kronecker-factored; recurrent
    weights and embeddings get the exact GNH diagonal, and .reasons names their module."""
    problem = SEQUENCE_MODELS[name]()
    with pytest.warns(UserWarning, match="has no layer adapter"):
        op = pbrf_fast.KroneckerCurvature(problem, 1e-2, "ekfac")
    if name == "transformer-eval":
        assert op.coverage["kronecker"][:4] == ["enc.self_attn.in_proj[q]", "enc.self_attn.in_proj[k]",
                                                "enc.self_attn.in_proj[v]", "enc.self_attn.out_proj"]
        assert not [n for n in op.others if "self_attn" in n]
    else:
        others = [n for n in problem.param_names if n.startswith("rnn")]
        assert set(others) <= set(op.coverage["diagonal"]) and "head" in op.coverage["kronecker"]
        assert all(f"{name.upper()} 'rnn'" in op.reasons[n] for n in others)
    assert "Embedding 'emb'" in op.reasons["emb.weight"]
    rows = torch.cat([torch.arange(*problem.param_ranges[n]) for n in op.others])
    G = dense_gnh(problem)
    assert rel_err(op.factors.diagonal, torch.diagonal(G)[rows]) < 1e-10
    # the quadratic form g^T (K + damping)^{-1} g per example, against the dense operator: each
    # block's tokens and output gradients rebuild the per-example gradients exactly
    grads = dense_gradients(problem, problem.inputs, problem.targets)
    expected = (grads.T * torch.linalg.solve(op.dense(), grads.T)).sum(0)
    assert rel_err(op.quadratic_form_per_example(problem.inputs, problem.targets), expected) < 1e-10


def block_indices(layer):
    """(o, i') positions in theta of a Kronecker layer's matrix (bias as the last column)."""
    lo, hi = layer.weight
    index = torch.arange(lo, hi).reshape(layer.out_dim, -1)
    if layer.bias is not None:
        index = torch.cat([index, torch.arange(*layer.bias).unsqueeze(1)], 1)
    return index


class SequenceFirstAttention(nn.Module):
    """nn.MultiheadAttention in its (T, b, E) layout, cross-attention, a key padding mask (token 0)."""

    def __init__(self, vocab=7, width=4, classes=3):
        super().__init__()
        self.emb, self.memory = nn.Embedding(vocab, width), nn.Linear(width, width)
        self.attention = nn.MultiheadAttention(width, 2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        e = self.emb(x)
        h, memory = e.transpose(0, 1), self.memory(e).transpose(0, 1)  # (T, b, E)
        padding = x == 0
        padding[:, 0] = False                                        # every query sees one key
        out, _ = self.attention(h, memory, h, key_padding_mask=padding)
        return self.head(out.mean(0))


@pytest.mark.parametrize("make", [SEQUENCE_MODELS["transformer-eval"],
                                  lambda: tokens_problem(SequenceFirstAttention())],
                         ids=["transformer-eval", "sequence-first-cross-attention"])
def test_ekfac_eigenvalues_of_attention_blocks_are_the_exact_gnh_in_their_eigenbasis(make):
    """With exact pseudo-gradients EK-FAC's corrected eigenvalues are the diagonal of the exact
    GNH block in the Kronecker eigenbasis: for each attention block too."""
    problem = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        op = pbrf_fast.KroneckerCurvature(problem, 1e-2, "ekfac", pseudo_gradients="exact")
    G = dense_gnh(problem)
    for layer in op.layers:
        index = block_indices(layer).reshape(-1)
        _, Q_A, _, Q_S = op.factors.eigen[layer.name]
        basis = torch.kron(Q_S, Q_A)                        # row-major vec of Q_S[:, a] Q_A[:, c]^T
        exact = torch.einsum("pa,pq,qa->a", basis, G[index][:, index], basis).reshape(layer.out_dim, -1)
        assert rel_err(op.factors.corrected[layer.name], exact) < 1e-10, layer.name
    assert any("in_proj[k]" in layer.name for layer in op.layers)
    grads = dense_gradients(problem, problem.inputs, problem.targets)
    expected = (grads.T * torch.linalg.solve(op.dense(), grads.T)).sum(0)
    assert rel_err(op.quadratic_form_per_example(problem.inputs, problem.targets), expected) < 1e-10


def test_ekfac_is_exact_on_the_factored_head_of_a_gru_for_one_example():
    """One example, one token per Linear: the head's K-FAC and EK-FAC blocks are the exact GNH block."""
    problem = tokens_problem(GRUClassifier(), n=1)
    G = dense_gnh(problem)
    head = torch.arange(*problem.param_ranges["head.weight"])
    head = torch.cat([head, torch.arange(*problem.param_ranges["head.bias"])])
    for kind in ("kfac", "ekfac"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            op = pbrf_fast.KroneckerCurvature(problem, 0.0, kind)
        assert rel_err(op.dense()[head][:, head], G[head][:, head]) < 1e-10


def test_a_layer_used_functionally_is_not_factored_and_says_why():
    torch.manual_seed(0)
    problem = pbrf_fast.Problem(FunctionalProjection().to(DT), "mse", torch.randn(5, 3, dtype=DT),
                                torch.randn(5, 2, dtype=DT))
    with pytest.warns(UserWarning, match="forward never runs"):
        op = pbrf_fast.KroneckerCurvature(problem, 1e-2, "ekfac")
    assert op.coverage["kronecker"] == ["a"] and op.coverage["diagonal"] == ["proj.weight", "proj.bias"]
    assert "Linear 'proj': its forward never runs" in op.reasons["proj.weight"]
    rows = torch.cat([torch.arange(*problem.param_ranges[n]) for n in op.others])
    assert rel_err(op.factors.diagonal, torch.diagonal(dense_gnh(problem))[rows]) < 1e-10
    with pytest.raises(pbrf_fast.errors.UnsupportedModelError, match="forward never runs"):
        pbrf_fast.KroneckerCurvature(problem, 1e-2, "ekfac", other="error")


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS) + ["functional-projection"])
def test_score_contraction_of_attention_and_recurrent_models(name):
    from pbrf_fast.scale import LayerScorer
    if name == "functional-projection":
        torch.manual_seed(0)
        problem = pbrf_fast.Problem(FunctionalProjection().to(DT), "mse", torch.randn(5, 3, dtype=DT),
                                    torch.randn(5, 2, dtype=DT))
    else:
        problem = SEQUENCE_MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scorer = LayerScorer(problem)
    x, t = problem.inputs, problem.targets
    S = torch.randn(problem.dim, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    grads = dense_gradients(problem, x, t)
    assert rel_err(scorer.scores(x, t, S), grads @ S) < 1e-10
    assert rel_err(scorer.norms_squared(x, t), grads.pow(2).sum(1)) < 1e-10


@pytest.mark.parametrize("make", [lambda: tokens_problem(TransformerClassifier()),
                                  lambda: tokens_problem(GRUClassifier()),
                                  lambda: custom_problem(OldStyleSquare)], ids=["transformer-eval", "gru", "old-style"])
@pytest.mark.parametrize("solver", ["auto", "cg", "kernel"])
def test_influence_on_models_beyond_the_layer_wise_family_matches_dense(make, solver):
    problem = make()
    x, t = problem.inputs[:2], problem.targets[:2]
    grads, test_grads = dense_gradients(problem, problem.inputs, problem.targets), dense_gradients(problem, x, t)
    expected = grads @ torch.linalg.solve(dense_gnh(problem, 0.1), test_grads.T) / problem.n
    options = {"tol": 1e-12, "max_iter": 500} if solver == "cg" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        influence = pbrf_fast.Influence(problem, damping=0.1, solver=solver, solver_options=options)
        scores = influence.scores(x, t)
        self_influence = influence.self_influence()
    assert rel_err(scores, expected) < 1e-8
    own = (grads.T * torch.linalg.solve(dense_gnh(problem, 0.1), grads.T)).sum(0) / problem.n
    assert rel_err(self_influence, own) < 1e-8


def test_a_linear_layer_on_sequence_first_tensors_is_not_read_across_examples():
    """Its rows are positions, not examples: K-FAC gives it the exact GNH diagonal and says why,
    the score contraction its exact fallback."""
    from pbrf_fast.scale import LayerScorer

    class SequenceFirstLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.mix(self.emb(x).transpose(0, 1)).mean(0))

    problem = tokens_problem(SequenceFirstLinear(), n=5, length=5)   # T == b: no shape error would say it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        op = pbrf_fast.KroneckerCurvature(problem, 1e-2, "ekfac")
        scorer = LayerScorer(problem)
    assert op.coverage["kronecker"] == ["head"] and "example dimension first" in op.reasons["mix.weight"]
    rows = torch.cat([torch.arange(*problem.param_ranges[n]) for n in op.others])
    assert rel_err(op.factors.diagonal, torch.diagonal(dense_gnh(problem))[rows]) < 1e-10
    x, t = problem.inputs, problem.targets
    S = torch.randn(problem.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    assert rel_err(scorer.scores(x, t, S), dense_gradients(problem, x, t) @ S) < 1e-10


# ------------------------------------------ the model families through the scale pipeline
class DepthwiseSeparable(nn.Module):
    """Depthwise (groups = channels) + pointwise convolutions with SiLU: outside the layer-wise
    product and K-FAC's Conv2d (groups != 1), so torch.func and the exact GNH diagonal."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.depthwise, self.pointwise = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = nn.functional.silu(self.stem(x))
        h = nn.functional.silu(self.pointwise(self.depthwise(h)))
        return self.head(h.mean((2, 3)))


def image_problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return pbrf_fast.Problem(DepthwiseSeparable().to(DT), "cross_entropy", torch.randn(n, 1, 5, 5, generator=g, dtype=DT),
                             torch.randint(0, 3, (n,), generator=g))


FAMILIES = {"transformer-eval": SEQUENCE_MODELS["transformer-eval"], "gru": SEQUENCE_MODELS["gru"],
            "depthwise-silu": image_problem}


@pytest.mark.parametrize("curvature", ["gnh", "ekfac"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_families_through_the_scale_pipeline_match_dense(tmp_path, family, curvature):
    from pbrf_fast.scale import compute_scores
    import numpy as np

    problem = FAMILIES[family]()
    x, t = problem.inputs, problem.targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        compute_scores(problem.model, "cross_entropy", x, t, x[:2], t[:2], tmp_path, progress=False, damping=0.1,
                       solver="direct" if curvature == "gnh" else "auto", curvature=curvature, self_influence=False)
        if curvature == "gnh":
            operator = dense_gnh(problem, 0.1)
        else:
            factors = pbrf_fast.curvatures.KroneckerFactors.from_state_dict(torch.load(tmp_path / "factors_ekfac.pt"))
            operator = pbrf_fast.KroneckerCurvature(problem, 0.1, "ekfac", factors=factors).dense()
    grads = dense_gradients(problem, x, t)
    expected = grads @ torch.linalg.solve(operator, grads[:2].T) / problem.n
    scores = torch.from_numpy(np.load(tmp_path / "scores.npy")).to(DT)
    assert rel_err(scores, expected) < 1e-5                                   # float32 on disk
