"""LayerScorer (hooks + score contraction + jvp fallback) against explicit
per-example gradients, and ResNet-20's shape."""
import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.paper.resnet import resnet20
from pbrf_fast.scale.layer_scores import LayerScorer


class ChannelScale(nn.Module):  # a parameter no hook covers: exercises the jvp fallback
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return x * self.w.view(1, -1, 1, 1)


def small_convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), ChannelScale(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, bias=False), nn.Flatten(), nn.Linear(45, 3)).double()
    bn = model[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    return model


def test_layer_scores_match_per_example_gradients():
    model = small_convnet()
    x = torch.randn(7, 3, 9, 9, dtype=torch.float64)
    t = torch.randint(3, (7,))
    problem = pbrf_fast.Problem(model, "cross_entropy", x, t)
    with pytest.warns(UserWarning, match="jvp"):
        scorer = LayerScorer(problem)
    S = torch.randn(problem.dim, 4, dtype=torch.float64)
    G = problem.per_example_gradients(x, t)
    torch.testing.assert_close(scorer.scores(x, t, S), G @ S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scorer.norms_squared(x, t), G.pow(2).sum(1), rtol=1e-10, atol=1e-10)


def test_resnet20_is_covered_by_hooks_and_exact():
    model = resnet20(seed=0, widths=(4, 8, 8)).double().eval()
    assert sum(p.numel() for p in resnet20(seed=0).parameters()) == 269722
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    t = torch.randint(10, (3,))
    problem = pbrf_fast.Problem(model, "cross_entropy", x, t)
    scorer = LayerScorer(problem)
    assert scorer.fallback == []
    S = torch.randn(problem.dim, 2, dtype=torch.float64)
    torch.testing.assert_close(scorer.scores(x, t, S), problem.per_example_gradients(x, t) @ S,
                               rtol=1e-10, atol=1e-10)
