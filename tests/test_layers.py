"""Every layer adapter (pbrf_fast.layers) against torch autograd / torch.func in float64, on
small odd shapes with and without bias; and every registered layer type has cases here."""
import pytest
import torch
from torch import nn

from pbrf_fast.layers import ADAPTERS, adapter_for

torch.manual_seed(0)


def eval_batchnorm(module):
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 2.0)
    return module.eval()


# (module factory, per-example input shape)
CASES = {
    nn.Linear: [(lambda: nn.Linear(5, 3), (5,)), (lambda: nn.Linear(5, 3, bias=False), (5,)),
                (lambda: nn.Linear(4, 7), (3, 4))],  # a token per position of a sequence
    nn.Conv2d: [(lambda: nn.Conv2d(3, 4, 3), (3, 7, 5)),
                (lambda: nn.Conv2d(2, 3, (3, 2), stride=2, padding=1, bias=False), (2, 7, 6)),
                (lambda: nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=2), (2, 9, 7))],
    nn.BatchNorm1d: [(lambda: eval_batchnorm(nn.BatchNorm1d(3)), (3,)),
                     (lambda: eval_batchnorm(nn.BatchNorm1d(3)), (3, 5))],
    nn.BatchNorm2d: [(lambda: eval_batchnorm(nn.BatchNorm2d(3)), (3, 5, 4))],
}
ALL = [(kind, i) for kind, cases in CASES.items() for i in range(len(cases))]


def build(kind, i, batch=5):
    factory, shape = CASES[kind][i]
    module = factory().double()
    return module, torch.randn(batch, *shape, dtype=torch.float64)


def reference_rows(module, x, C):
    """role -> (b, C, numel): d (u_c . module(x_i)) / d role for C random output vectors u_c."""
    out = module(x)
    U = torch.randn(x.shape[0], C, *out.shape[1:], dtype=torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}

    rows = {}
    for c in range(C):
        grads = torch.func.vmap(torch.func.grad(lambda p, xr, u: torch.func.functional_call(
            module, p, (xr.unsqueeze(0),))[0].mul(u).sum()), in_dims=(None, 0, 0))(params, x, U[:, c])
        for role, g in grads.items():
            rows.setdefault(role, []).append(g.reshape(x.shape[0], -1))
    return U, {role: torch.stack(blocks, 1) for role, blocks in rows.items()}


def test_every_registered_layer_type_has_cases():
    assert set(ADAPTERS) == set(CASES)


@pytest.mark.parametrize("kind,i", ALL)
def test_jacobian_rows_scores_and_norms_match_autograd(kind, i):
    module, x = build(kind, i)
    adapter, why = adapter_for(module)
    assert adapter is not None, why
    roles = tuple(role for role in adapter.roles if adapter.has(role))
    U, expected = reference_rows(module, x, C=3)
    got = adapter.jacobian_rows(x, U, roles)
    for role in roles:
        torch.testing.assert_close(got[role], expected[role], rtol=1e-10, atol=1e-12)
    vectors = {role: torch.randn(expected[role].shape[2], 2, dtype=torch.float64) for role in roles}
    per_example = {role: expected[role][:, 0] for role in roles}
    scores = adapter.scores(x, U[:, 0], vectors, backend="torch")
    torch.testing.assert_close(scores, sum(per_example[r] @ vectors[r] for r in roles), rtol=1e-10, atol=1e-12)
    norms = adapter.gradient_norms_squared(x, U[:, 0], roles)
    torch.testing.assert_close(norms, sum(per_example[r].pow(2).sum(1) for r in roles), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,i", [(k, i) for k, i in ALL if k in (nn.Linear, nn.Conv2d)])
def test_kronecker_tokens_and_tangents_match_autograd(kind, i):
    module, x = build(kind, i)
    adapter = adapter_for(module)[0]
    bias = module.bias is not None
    U, expected = reference_rows(module, x, C=1)
    # per-example gradient = sum over tokens of output token (x) input token, bias folded last
    a = adapter.input_tokens(x, bias=bias)                                # (b, T, in')
    s = adapter.output_tokens(U[:, 0], (x.shape[0],))                     # (b, T, out)
    G = torch.einsum("bto,bti->boi", s, a)
    flat = torch.cat([expected["weight"][:, 0].reshape(G.shape[0], G.shape[1], -1)]
                     + ([expected["bias"][:, 0].unsqueeze(2)] if bias else []), 2)
    torch.testing.assert_close(G, flat, rtol=1e-10, atol=1e-12)
    # layer-wise tangents: the adapter's functional form is the layer; jvp of it in its input,
    # and in m parameter directions stacked as m x out rows (the layer-wise product's rules)
    f = adapter.functional()
    W, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
    torch.testing.assert_close(f(x, W, b), module(x))
    t = torch.randn_like(x)
    dW = torch.randn(2, *W.shape, dtype=torch.float64)
    db = None if b is None else torch.randn(2, *b.shape, dtype=torch.float64)
    torch.testing.assert_close(f(t, W, None), torch.func.jvp(lambda z: f(z, W, b), (x,), (t,))[1])
    stacked = f(x, dW.flatten(0, 1), None if db is None else db.flatten())
    for k in range(2):
        expected_k = torch.func.jvp(lambda w, c: f(x, w, c), (W, b if b is not None else
                                    torch.zeros(W.shape[0], dtype=torch.float64)),
                                    (dW[k], db[k] if db is not None else torch.zeros(W.shape[0], dtype=torch.float64)))[1]
        part = stacked.unflatten(-1 if kind is nn.Linear else 1, (2, -1)).select(-2 if kind is nn.Linear else 1, k)
        torch.testing.assert_close(part, expected_k)


def test_linear_jacobian_gram_matches_rows():
    module, x = build(nn.Linear, 0)
    adapter = adapter_for(module)[0]
    U, rows = reference_rows(module, x, C=2)
    J = torch.cat([rows["weight"], rows["bias"]], 2).reshape(x.shape[0] * 2, -1)
    gram = adapter.jacobian_gram(x, U, ("weight", "bias")).reshape(J.shape[0], -1)
    torch.testing.assert_close(gram, J @ J.T)


@pytest.mark.parametrize("module,reason", [
    (nn.Conv2d(2, 2, 3, groups=2), "groups"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.BatchNorm2d(2, track_running_stats=False), "batch statistics"),
    (nn.LayerNorm(3), "no layer adapter"),
])
def test_unsupported_modules_say_why(module, reason):
    adapter, why = adapter_for(module)
    assert adapter is None and reason in why
    assert "training mode" in adapter_for(nn.BatchNorm1d(2).train())[0].batch_coupling_reason()
