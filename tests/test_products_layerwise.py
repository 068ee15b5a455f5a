"""The layer-wise GNH product of conv nets (pbrf_fast.products.layerwise) against the
torch.func product (GaussNewton backend="torch"), float64, tight tolerances."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbrf_fast
from pbrf_fast.products import layerwise as layerwise_gnh
from pbrf_fast.paper.resnet import ResNetCIFAR

TOL = 1e-10


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomise_batchnorm(model, seed=0):
    """Running statistics and affine parameters away from their identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


class ProjectionBlock(nn.Module):
    """A residual block with a 1x1-conv + BatchNorm shortcut, biased convs, an unfolded
    BatchNorm (its input is used twice), a scaled branch and a view by x.size(0)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.project = nn.Conv2d(cin, cout, 1, 2, bias=False)
        self.bn_project = nn.BatchNorm2d(cout)

    def forward(self, x):
        h = self.conv1(x)
        out = torch.relu(self.bn1(h)) + 0.5 * h          # bn1 cannot be folded: h feeds two nodes
        out = self.conv2(out)
        return F.relu(out + self.bn_project(self.project(x)))


class MixedNet(nn.Module):
    def __init__(self, channels=3, outputs=4):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(channels, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)         # overlapping windows
        self.block = ProjectionBlock(5, 6)
        self.avg = nn.AvgPool2d(2, ceil_mode=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 7), nn.BatchNorm1d(7),
                                  nn.Tanh(), nn.Linear(7, outputs))

    def forward(self, x):
        out = self.pool(torch.sigmoid(self.conv(self.pad(x))))
        out = self.avg(self.block(out))
        out = F.pad(out, (1, 0, 0, 1), value=2.0)
        return self.head(out.view(out.size(0), 6, out.shape[2], -1))


def lenet_like(channels=1, outputs=3):
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, outputs))


MODELS = {
    # ResNet-20's blocks at small widths: identity shortcut in stage 1, zero-pad (option A) after
    "resnet-blocks": (lambda: ResNetCIFAR(1, (3, 4, 6), num_classes=5), (3, 9, 9)),
    "resnet-2-per-stage": (lambda: ResNetCIFAR(2, (2, 3, 4), num_classes=3), (3, 7, 7)),
    "mixed": (lambda: MixedNet(), (3, 11, 9)),
    "lenet-like": (lambda: lenet_like(), (1, 9, 9)),
}


def conv_problem(name, loss="cross_entropy", n=9, weight_decay=0.0, batch_size=512, seed=0):
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomise_batchnorm(build(), seed).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, dtype=torch.float64, generator=g)
    with torch.no_grad():
        outputs = model.eval()(x).shape[-1]
    if loss == "cross_entropy":
        t = torch.randint(outputs, (n,), generator=g)
    elif loss == "bce":
        t = torch.randint(2, (n, outputs), generator=g).double()
    else:
        t = torch.randn(n, outputs, dtype=torch.float64, generator=g)
    return pbrf_fast.Problem(model, loss, x, t, weight_decay=weight_decay, batch_size=batch_size)


def pair(problem, damping=0.0):
    return pbrf_fast.GaussNewton(problem, damping), pbrf_fast.GaussNewton(problem, damping, backend="torch")


@pytest.mark.parametrize("name,loss", [("resnet-blocks", "cross_entropy"), ("resnet-2-per-stage", "mse"),
                                       ("mixed", "bce"), ("mixed", "cross_entropy"), ("lenet-like", "mse")])
def test_matches_torch_func(name, loss):
    problem = conv_problem(name, loss, weight_decay=0.03)
    op, reference = pair(problem, damping=0.2)
    assert op.plan_product(problem.inputs, torch.zeros(problem.dim, 3)).implementation == "layerwise"
    g = torch.Generator().manual_seed(1)
    for V in (torch.randn(problem.dim, dtype=torch.float64, generator=g),
              torch.randn(problem.dim, 3, dtype=torch.float64, generator=g)):
        out = op.matvec(V)
        assert out.shape == V.shape
        assert rel_err(out, reference.matvec(V)) < TOL


def test_index_subsets_chunks_and_kept_forward(monkeypatch):
    problem = conv_problem("resnet-blocks", n=7, batch_size=3)
    op, reference = pair(problem, damping=1e-3)
    V = torch.randn(problem.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for idx in ([3, 0, 6], torch.tensor([-1, 4])):
        assert rel_err(op.matvec(V, idx), reference.matvec(V, idx)) < TOL
    # a tiny tangent budget: one row per chunk, same answer
    monkeypatch.setattr(layerwise_gnh, "TANGENT_CHUNK_BYTES", 1)
    assert layerwise_gnh.tangent_rows(op.layerwise_spec()[0], 4, 8) == 1
    expected = reference.matvec(V)
    assert rel_err(op.matvec(V), expected) < TOL
    slices = op._cache["mlp_forward"]
    assert sorted(k[1] for k in slices) == [0, 3, 6]  # each data slice's primal pass is kept
    assert rel_err(op.with_damping(1e-3).matvec(V), expected) < TOL
    # new parameters: the kept states are stale and must not be used
    problem.set_theta(problem.theta * 0.9)
    assert rel_err(op.matvec(V), reference.matvec(V)) < TOL


def test_frozen_parameters_and_bias_only_layers():
    problem_model = randomise_batchnorm(ResNetCIFAR(1, (2, 3, 4), num_classes=3)).double()
    problem_model.conv.weight.requires_grad_(False)           # the first conv frozen
    problem_model.blocks[1].bn1.weight.requires_grad_(False)  # a folded BatchNorm's gamma frozen
    problem_model.fc.weight.requires_grad_(False)             # the classifier's bias trainable alone
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=g)
    problem = pbrf_fast.Problem(problem_model, "cross_entropy", x, torch.randint(3, (6,), generator=g))
    op, reference = pair(problem)
    assert op.plan_product(x, torch.zeros(problem.dim)).implementation == "layerwise"
    V = torch.randn(problem.dim, 2, dtype=torch.float64, generator=g)
    assert rel_err(op.matvec(V), reference.matvec(V)) < TOL


def test_float32_and_channels_last_inputs():
    problem64 = conv_problem("resnet-blocks", "mse")
    model = problem64.model.float()
    x = problem64.inputs.float().contiguous(memory_format=torch.channels_last)
    problem = pbrf_fast.Problem(model, "mse", x, problem64.targets.float())
    op, reference = pair(problem)
    V = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(0))
    assert rel_err(op.matvec(V), reference.matvec(V)) < 1e-4


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        out = self.conv(x)
        if out.sum() > 0:  # data-dependent control flow
            out = out * 2
        return self.fc(out.mean((2, 3)))


class BatchMixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x + x.mean(0))  # examples interact


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h * h


@pytest.mark.parametrize("model,shape,reason", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 2)), (1, 4, 4), "LayerNorm"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)), (2, 4, 4), "groups"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                   nn.Linear(8, 2)), (1, 4, 4), "batch statistics"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(32, 2)),
     (1, 4, 4), "padding_mode"),
    (Untraceable(), (1, 4, 4), "torch.fx cannot trace"),
    (BatchMixing(), (4,), "example dimension"),
    (Bilinear(), (4,), "multiplies two tensors"),
])
def test_unsupported_models_keep_torch_func(model, shape, reason):
    torch.manual_seed(0)
    x = torch.randn(5, *shape, dtype=torch.float64)
    problem = pbrf_fast.Problem(model.double(), "mse", x, torch.randn(5, 2 if not isinstance(model, Bilinear) else 4,
                                                                     dtype=torch.float64))
    op = pbrf_fast.GaussNewton(problem, 0.1)
    spec, why = op.layerwise_spec()
    assert spec is None and reason in why
    plan = op.plan_product(x, torch.zeros(problem.dim))
    assert plan.implementation == "torch.func" and reason in plan.reason


def test_inputs_of_another_shape_are_planned_for_torch_func():
    problem = conv_problem("lenet-like")
    op = pbrf_fast.GaussNewton(problem, 0.1)
    plan = op.plan_product(torch.zeros(2, 1, 10, 10, dtype=torch.float64), torch.zeros(problem.dim))
    assert plan.implementation == "torch.func" and "do not fit the traced network" in plan.reason


@pytest.mark.gpu
def test_matches_torch_func_on_cuda():
    problem_cpu = conv_problem("resnet-2-per-stage", n=11)
    model = problem_cpu.model.cuda()
    problem = pbrf_fast.Problem(model, "cross_entropy", problem_cpu.inputs.cuda(), problem_cpu.targets.cuda())
    op, reference = pair(problem, damping=1e-3)
    assert op.plan_product(problem.inputs, torch.zeros(problem.dim, device="cuda")).implementation == "layerwise"
    V = torch.randn(problem.dim, 3, dtype=torch.float64, device="cuda")
    assert rel_err(op.matvec(V), reference.matvec(V)) < TOL
    assert rel_err(op.matvec(V, [0, 3, 5]), reference.matvec(V, [0, 3, 5])) < TOL


@pytest.mark.parametrize("group_columns", [True, False])
@pytest.mark.parametrize("name,loss", [("resnet-blocks", "cross_entropy"), ("resnet-2-per-stage", "mse"),
                                       ("mixed", "bce"), ("lenet-like", "mse")])
def test_channels_last_layout_matches_torch_func(name, loss, group_columns, monkeypatch):
    """The NHWC product (float32 images get it by default) in float64, forced: m = 1 and
    m > 1, the columns as channel groups (grouped convolutions) or folded into the batch
    (the stacked weight-tangent convolution refolded by a copy)."""
    monkeypatch.setattr(layerwise_gnh, "LAYOUT", "channels_last")
    monkeypatch.setattr(layerwise_gnh, "GROUP_COLUMNS", group_columns)
    made = []
    monkeypatch.setattr(layerwise_gnh._Grouped, "__init__",
                        lambda self, t: (made.append(1), setattr(self, "t", t))[0] and None)
    problem = conv_problem(name, loss)
    op, reference = pair(problem, damping=1e-3)
    spec = op.layerwise_spec()[0]
    assert spec.channels_last
    g = torch.Generator().manual_seed(4)
    for m in (1, 3):
        V = torch.randn(problem.dim, m, dtype=torch.float64, generator=g)
        assert rel_err(op.matvec(V), reference.matvec(V)) < TOL
    assert bool(made) == group_columns  # the grouped layout ran (only) when asked
    # the kept primal state is NHWC: the tangent pass runs in it
    y, saved, _ = op._cache["mlp_forward"][("layerwise", 0, problem.batch_size)][1]
    images = [t for t in saved.values() if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1]
    assert images and all(t.is_contiguous(memory_format=torch.channels_last) for t in images)


def test_layout_rule():
    images32 = torch.zeros(2, 3, 4, 4)
    assert layerwise_gnh.choose_layout(images32)
    assert not layerwise_gnh.choose_layout(images32.double())  # no NHWC fast path in float64
    assert not layerwise_gnh.choose_layout(torch.zeros(2, 8))
    problem = conv_problem("resnet-blocks")
    assert not pbrf_fast.GaussNewton(problem).layerwise_spec()[0].channels_last


def test_stacked_to_folded_keeps_layout():
    g = torch.Generator().manual_seed(0)
    rows, m, c = 2, 3, 4
    stacked = torch.randn(rows, m * c, 5, 6, dtype=torch.float64, generator=g)
    expected = stacked.reshape(rows * m, c, 5, 6)
    nhwc = stacked.contiguous(memory_format=torch.channels_last)
    folded = layerwise_gnh._stacked_to_folded(nhwc, rows, m)
    assert torch.equal(folded, expected) and folded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(layerwise_gnh._stacked_to_folded(stacked, rows, m), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("group_columns", [True, False])
def test_channels_last_on_cuda(group_columns, monkeypatch):
    monkeypatch.setattr(layerwise_gnh, "LAYOUT", "channels_last")
    monkeypatch.setattr(layerwise_gnh, "GROUP_COLUMNS", group_columns)
    problem_cpu = conv_problem("resnet-blocks", n=7)
    problem = pbrf_fast.Problem(problem_cpu.model.cuda(), "cross_entropy", problem_cpu.inputs.cuda(),
                                problem_cpu.targets.cuda())
    op, reference = pair(problem, damping=1e-3)
    assert op.layerwise_spec()[0].channels_last
    V = torch.randn(problem.dim, 3, dtype=torch.float64, device="cuda")
    assert rel_err(op.matvec(V), reference.matvec(V)) < TOL
