import pytest
import torch

import pbrf_fast
from pbrf_fast.losses import AutogradLoss, get_loss

from factories import LOSSES, make_targets, output_hessian, rel_err


def _data(loss, b=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, c, generator=g, dtype=torch.float64)
    t = get_loss(loss).prepare_targets(make_targets(loss, b, c, g), c)
    return y, t, g


@pytest.mark.parametrize("loss", LOSSES)
def test_grad_matches_autograd(loss):
    spec = get_loss(loss)
    y, t, _ = _data(loss)
    y_req = y.clone().requires_grad_(True)
    expected = torch.autograd.grad(spec.value(y_req, t).sum(), y_req)[0]
    assert rel_err(spec.grad(y, t), expected) < 1e-12


@pytest.mark.parametrize("loss", LOSSES)
def test_hvp_matches_closed_form_with_leading_dims(loss):
    spec = get_loss(loss)
    y, t, g = _data(loss)
    u = torch.randn(2, 3, *y.shape, generator=g, dtype=torch.float64)
    expected = torch.einsum("bce,...be->...bc", output_hessian(loss, y), u)
    got = spec.hvp(y, t, u)
    assert got.shape == u.shape
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("loss", LOSSES)
def test_hvp_matches_autograd_hessian(loss):
    spec = get_loss(loss)
    y, t, g = _data(loss, b=3)
    u = torch.randn(*y.shape, generator=g, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda yy: spec.value(yy, t).sum(), y)  # (b,C,b,C)
    expected = torch.einsum("bcde,de->bc", H, u)
    assert rel_err(spec.hvp(y, t, u), expected) < 1e-12


@pytest.mark.parametrize("loss", LOSSES)
def test_bregman_matches_definition_and_is_nonnegative(loss):
    spec = get_loss(loss)
    y, t, g = _data(loss)
    y_ref = torch.randn(*y.shape, generator=g, dtype=torch.float64)
    expected = spec.value(y, t) - spec.value(y_ref, t) - (spec.grad(y_ref, t) * (y - y_ref)).sum(-1)
    got = spec.bregman(y, y_ref, t)
    assert rel_err(got, expected) < 1e-10
    assert (got >= -1e-12).all()
    assert spec.bregman(y, y, t).abs().max() < 1e-12


def test_soft_targets_equal_hard_targets_for_cross_entropy():
    spec = get_loss("cross_entropy")
    y, t, _ = _data("cross_entropy")
    soft = torch.nn.functional.one_hot(t, y.shape[1]).double()
    assert rel_err(spec.value(y, soft), spec.value(y, t)) < 1e-14
    assert rel_err(spec.value(y, t), torch.nn.functional.cross_entropy(y, t, reduction="none")) < 1e-12


def test_autograd_loss_matches_builtin_mse():
    custom = AutogradLoss(lambda y, t: 0.5 * (y - t).pow(2).sum(-1), name="my_mse")
    y, t, g = _data("mse")
    u = torch.randn(2, *y.shape, generator=g, dtype=torch.float64)
    assert rel_err(custom.grad(y, t), get_loss("mse").grad(y, t)) < 1e-12
    assert rel_err(custom.hvp(y, t, u), u) < 1e-12


def test_target_validation_errors_name_the_problem():
    with pytest.raises(ValueError, match="class targets must lie"):
        get_loss("cross_entropy").prepare_targets(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        get_loss("mse").prepare_targets(torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_loss("bce").prepare_targets(torch.full((2, 1), 2.0), 1)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")


def test_gauss_newton_refuses_nonconvex_loss():
    from factories import make_mlp

    nonconvex = AutogradLoss(lambda y, t: torch.cos(y - t).sum(-1), name="cosine", convex_in_outputs=False)
    problem = pbrf_fast.Problem(make_mlp(2, (3,), 1), nonconvex, torch.randn(4, 2).double(), torch.randn(4, 1).double())
    with pytest.raises(pbrf_fast.NonConvexLossError, match="not convex"):
        pbrf_fast.GaussNewton(problem, 1e-3)
    pbrf_fast.Hessian(problem, 1e-3)  # the Hessian makes no such assumption


def test_sequence_cross_entropy_matches_autograd_and_tokenwise_mean():
    from pbrf_fast.losses import SequenceCrossEntropyLoss

    spec = SequenceCrossEntropyLoss(vocab=5)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4 * 5, generator=g, dtype=torch.float64)
    t = spec.prepare_targets(torch.randint(5, (3, 4), generator=g), 20)
    expected = torch.nn.functional.cross_entropy(y.reshape(12, 5), t.reshape(12), reduction="none").reshape(3, 4).mean(1)
    assert rel_err(spec.value(y, t), expected) < 1e-12
    y_req = y.clone().requires_grad_(True)
    assert rel_err(spec.grad(y, t), torch.autograd.grad(spec.value(y_req, t).sum(), y_req)[0]) < 1e-12
    u = torch.randn(2, *y.shape, generator=g, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda yy: spec.value(yy, t).sum(), y)
    assert rel_err(spec.hvp(y, t, u), torch.einsum("bcde,mde->mbc", H, u)) < 1e-12
    y_ref = torch.randn(*y.shape, generator=g, dtype=torch.float64)
    definition = spec.value(y, t) - spec.value(y_ref, t) - (spec.grad(y_ref, t) * (y - y_ref)).sum(-1)
    assert rel_err(spec.bregman(y, y_ref, t), definition) < 1e-10
