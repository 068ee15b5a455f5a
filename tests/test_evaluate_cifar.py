"""The CIFAR-10 ResNet-20 recipe of the evaluate job: batch-norm calibration folded
into the weights, and the vectorised subset retraining under that recipe."""
import dataclasses

import pytest
import torch

from pbrf_fast import Problem
from pbrf_fast.errors import InputError
from pbrf_fast.paper.bn_calibration import calibrate_batchnorm
from pbrf_fast.paper.config import EvaluateConfig
from pbrf_fast.paper.evaluate_job import _resnet_recipe
from pbrf_fast.paper.ground_truth import train_on_subsets
from pbrf_fast.paper.resnet import resnet20
from pbrf_fast.paper.training import train


def _images(n, seed, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_calibrated_eval_net_equals_train_mode_batch_statistics():
    x = _images(12, 0)
    reference = resnet20(10, seed=3).double().train()
    expected = reference(x)  # batch statistics of x at every batch norm
    model = calibrate_batchnorm(resnet20(10, seed=3).double(), x)
    assert not model.training
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    # dense check of one layer: the first batch norm's output has zero mean, unit (biased) variance
    first = model.bn(model.conv(x))
    torch.testing.assert_close(first.mean((0, 2, 3)), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(first.var((0, 2, 3), unbiased=False), torch.ones(16, dtype=torch.float64),
                               rtol=0, atol=1e-4)  # eps = 1e-5 in the denominator


def test_calibration_leaves_running_statistics_at_their_defaults():
    model = calibrate_batchnorm(resnet20(10, seed=0).double(), _images(6, 1))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert int(m.num_batches_tracked) == 0


def test_calibration_rejects_bad_input():
    with pytest.raises(InputError, match="x must be a batch"):
        calibrate_batchnorm(resnet20(10, seed=0), torch.randn(3, 32, 32))
    with pytest.raises(InputError, match="no BatchNorm2d"):
        calibrate_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 8, 8))
    odd = torch.nn.Sequential()
    odd.add_module("conv", torch.nn.Conv2d(3, 4, 3, bias=True))
    odd.add_module("bn", torch.nn.BatchNorm2d(4))
    with pytest.raises(InputError, match="bias-free Conv2d"):
        calibrate_batchnorm(odd, torch.randn(2, 3, 8, 8))


def test_resnet_recipe_trains_subsets_like_one_model_at_a_time():
    """The recipe on a few random images: every model (base or subset) is calibrated on the same
    calibration images, shares the default buffers, and the vmapped subset training equals
    training each subset alone with ``train`` (float64)."""
    torch.set_default_dtype(torch.float64)
    try:
        config = EvaluateConfig(dataset="cifar10", model="resnet20", epochs=2, batch_size=4)
        make_model, recipe, wd = _resnet_recipe(config, _images(10, 2))
        x, y = _images(8, 3), torch.arange(8) % 10
        problem = Problem(make_model(0), "cross_entropy", x, y, weight_decay=wd)
        theta0 = lambda s: torch.cat([p.detach().reshape(-1) for p in make_model(s).parameters()])
        masks = torch.tensor([[1, 1, 0, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
        stack = train_on_subsets(problem, recipe, masks, torch.stack([theta0(5), theta0(6)]), [5, 6])
        assert torch.isfinite(stack).all()
        for row, seed in enumerate((5, 6)):
            keep = masks[row]
            alone = Problem(make_model(seed), "cross_entropy", x[keep], y[keep], weight_decay=wd)
            result = train(alone, dataclasses.replace(recipe, seed=seed))
            torch.testing.assert_close(stack[row], result.theta, rtol=1e-9, atol=1e-10)
        # the calibration changes the weights, not the buffers: one problem's buffers serve every replica
        for name, buffer in make_model(7).named_buffers():
            torch.testing.assert_close(buffer, problem.buffers[name])
    finally:
        torch.set_default_dtype(torch.float32)


def test_zero_residual_branches_make_every_block_the_identity():
    from pbrf_fast.paper.bn_calibration import zero_residual_branches

    model = zero_residual_branches(calibrate_batchnorm(resnet20(10, seed=1).double(), _images(6, 4)))
    h = torch.relu(model.bn(model.conv(_images(5, 5))))  # non-negative, as every block's input is
    for block in model.blocks:
        torch.testing.assert_close(block(h), torch.relu(block.shortcut(h)), rtol=0, atol=0)
        h = block(h)
    with pytest.raises(InputError, match="bn2"):
        zero_residual_branches(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
