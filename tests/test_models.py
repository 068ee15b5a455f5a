"""Model builders: shapes for both image sizes, and exact curvature through convolutions."""
import pytest
import torch

import pbrf_fast
from pbrf_fast.paper.models import MODELS, build_model

from factories import dense_gnh, rel_err


@pytest.mark.parametrize("name", ["lenet", "alexnet", "vgg13"])
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_models_accept_both_image_sizes(name, in_shape):
    model = build_model(name, in_shape, 10, seed=0)
    assert model(torch.randn(2, *in_shape)).shape == (2, 10)


def test_resnet20_and_autoencoder_shapes():
    resnet = build_model("resnet20", (3, 32, 32), 10, seed=0)
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 0.26e6 < sum(p.numel() for p in resnet.parameters()) < 0.28e6
    auto = build_model("autoencoder", (784,), 784, seed=0)
    assert auto(torch.rand(2, 784)).shape == (2, 784)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer-xl", (8,), 1)
    assert "lenet" in MODELS


def test_gnh_through_a_small_convnet_matches_explicit_jacobians():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 3 * 3, 3)).double()
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    problem = pbrf_fast.Problem(model, "cross_entropy", x, torch.randint(3, (6,)), weight_decay=0.01)
    op = pbrf_fast.GaussNewton(problem, 0.1)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    assert rel_err(op.matvec(V), dense_gnh(problem, 0.1) @ V) < 1e-10
    B = torch.randn(problem.dim, 2, dtype=torch.float64)
    assert rel_err(pbrf_fast.solve(op, B, method="kernel").solution, torch.linalg.solve(dense_gnh(problem, 0.1), B)) < 1e-8


def test_transformer_language_model_gnh_matches_explicit_jacobians():
    from pbrf_fast.losses import SequenceCrossEntropyLoss
    from pbrf_fast.paper.models import transformer_lm

    model = transformer_lm(vocab=7, width=8, heads=2, layers=1, max_len=4, seed=0).double()
    tokens = torch.randint(7, (5, 4), generator=torch.Generator().manual_seed(1))
    problem = pbrf_fast.Problem(model, SequenceCrossEntropyLoss(7), tokens, torch.roll(tokens, -1, 1))
    assert problem.num_outputs == 4 * 7
    op = pbrf_fast.GaussNewton(problem, 0.1)
    V = torch.randn(problem.dim, 2, dtype=torch.float64)
    # dense reference: explicit Jacobian and the block-diagonal output Hessian
    J = torch.autograd.functional.jacobian(lambda th: problem.forward(th, tokens), problem.theta.clone())
    y = problem.forward(problem.theta, tokens).detach().reshape(5, 4, 7)
    p = torch.softmax(y, -1)
    H = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / 4  # (5, 4, 7, 7)
    JV = torch.einsum("bod,dm->bom", J, V).reshape(5, 4, 7, 2)
    expected = torch.einsum("bod,bom->dm", J, torch.einsum("btce,btem->btcm", H, JV).reshape(5, 28, 2)) / 5
    assert rel_err(op.matvec(V), expected + 0.1 * V) < 1e-10
