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
    (TrainingBatchNorm2d, ["interact", "'norm' (BatchNorm2d)", "model.eval()"]),
], ids=["F.dropout", "nn.Dropout", "F.batch_norm", "nn.BatchNorm2d"])
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
