"""Small random problems and independent dense float64 references for the tests.

The references build Jacobians and Hessians explicitly with torch.autograd.functional,
so they share no code path with the operators under test.
"""
import pytest
import torch
from torch import nn

import pbrf_fast

LOSSES = ["mse", "cross_entropy", "bce"]
# The (backend, device) case that runs the CUDA kernels on CPU tensors under the
# emulator (pbrf_fast.testing.cuda_emulation); conftest enters it for the marker.
CUDA_EMULATED = pytest.param("cuda", "cpu", id="cuda-emulated", marks=pytest.mark.cuda_emulated)


def make_mlp(d_in, hidden, d_out, seed=0, activation=nn.Tanh):
    torch.manual_seed(seed)
    layers, width = [], d_in
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers).double()


def make_targets(loss, n, outputs, generator):
    if loss == "cross_entropy":
        return torch.randint(outputs, (n,), generator=generator)
    if loss == "bce":
        return torch.randint(2, (n, outputs), generator=generator).double()
    return torch.randn(n, outputs, generator=generator, dtype=torch.float64)


def make_problem(loss="mse", weight_decay=0.0, n=13, d_in=3, hidden=(5, 4), outputs=3, seed=0,
                 batch_size=5):
    g = torch.Generator().manual_seed(seed + 1)
    model = make_mlp(d_in, hidden, outputs, seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    t = make_targets(loss, n, outputs, g)
    return pbrf_fast.Problem(model, loss, x, t, weight_decay=weight_decay, batch_size=batch_size)


def output_hessian(loss, y):
    """Dense per-example output Hessians (b, C, C) from closed forms."""
    b, c = y.shape
    if loss == "mse":
        return torch.eye(c, dtype=y.dtype).expand(b, c, c)
    if loss == "cross_entropy":
        p = torch.softmax(y, -1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    p = torch.sigmoid(y)
    return torch.diag_embed(p * (1 - p))


def dense_gnh(problem, damping=0.0, idx=None):
    theta = problem.theta.clone()
    x, t = problem.batch(range(problem.n) if idx is None else idx)
    J = torch.autograd.functional.jacobian(lambda th: problem.forward(th, x), theta)  # (b, C, d)
    H = output_hessian(problem.loss.name, problem.forward(theta, x).detach())
    G = torch.einsum("bcd,bce,bef->df", J, H, J) / len(x)
    return G + (problem.weight_decay + damping) * torch.eye(problem.dim, dtype=G.dtype)


def dense_hessian(problem, damping=0.0):
    x, t = problem.batch(range(problem.n))

    def objective(th):
        return problem.loss.value(problem.forward(th, x), t).mean() + 0.5 * problem.weight_decay * th.pow(2).sum()

    H = torch.autograd.functional.hessian(objective, problem.theta.clone())
    return H + damping * torch.eye(problem.dim, dtype=H.dtype)


def dense_gradients(problem, x, t):
    """Per-example gradients by a Python loop of autograd.grad: (b, d)."""
    rows = []
    for i in range(len(x)):
        th = problem.theta.clone().requires_grad_(True)
        value = problem.loss.value(problem.forward(th, x[i : i + 1]), t[i : i + 1]).sum()
        rows.append(torch.autograd.grad(value, th)[0])
    return torch.stack(rows)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def shared_data_dir():
    """The offline data sets beside the checkout (../shared/data), or $PBRF_DATA."""
    import os
    from pathlib import Path

    env = os.environ.get("PBRF_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None
