"""K-FAC and EK-FAC: Kronecker-factored approximations of the Gauss-Newton Hessian.

For a layer ``y = W a`` (``nn.Linear``; ``nn.Conv2d`` with its input unfolded into
patches, one token per output position) the bias is folded in as a last input
coordinate equal to 1, so the layer's parameters are one (o x i') matrix and
example n's gradient with respect to them is ``G_n = sum_t s_{n,t} a_{n,t}^T``.
The GNH block of the layer is ``1/N sum_n sum_k vec(G_nk) vec(G_nk)^T`` where
``G_nk`` is the gradient for the pseudo-gradient ``q_nk`` at the outputs, with
``sum_k q_nk q_nk^T = H_n`` the output Hessian of example n:

* ``pseudo_gradients="exact"``: the columns of a square root of H_n (MSE: the unit
  vectors; softmax cross-entropy: ``sqrt(p_k) (e_k - p)``, whose outer products sum
  to ``diag(p) - p p^T``; BCE: ``sqrt(p (1 - p))``; other losses: eigh of H_n),
  C backward passes per batch;
* ``"sampled"``: ``samples`` draws from the model's predictive distribution (the
  gradient of the loss at a sampled label: ``E[q q^T] = H``), seeded; one backward
  pass per draw. ``"auto"``: exact for at most ``EXACT_MAX_OUTPUTS`` outputs.

K-FAC replaces the block by ``A (x) S`` with ``A = 1/N sum_{n,t} a a^T`` and
``S = 1/(N T) sum_{n,k,t} s s^T`` (for T = 1 tokens these are the block's factors
exactly when the per-example terms factorise; for convolutions this is the KFC
scaling of Grosse and Martens, 2016). With ``A = Q_A diag(l_A) Q_A^T`` and
``S = Q_S diag(l_S) Q_S^T`` the block is ``(Q_A (x) Q_S) diag(l_S l_A^T) (...)^T``;
EK-FAC keeps the eigenbasis and replaces ``l_S l_A^T`` by the second moments of
the pseudo-gradients in it, ``Lambda = 1/N sum_{n,k} (Q_S^T G_nk Q_A)^2`` (George
et al., 2018) -- with exact pseudo-gradients that is the diagonal of the exact GNH
block in that basis.

Parameters outside covered layers (BatchNorm, embeddings, ...) get a diagonal
block, the diagonal of the GNH (``other="diagonal"``, computed exactly from
per-example pseudo-gradients of those parameters only), or damping only
(``other="damping"``), or are refused (``other="error"``); which parameters went
where is in :attr:`KroneckerCurvature.coverage` and is warned about.

Damping. The operator is ``K + (weight_decay + damping) I`` like every curvature
in the library (absolute damping, added to every eigenvalue). With
``relative_damping=r`` each block also adds ``r * mean(its eigenvalues)``
(kronfluence's heuristic when its ``damping_factor`` is None is r = 0.1).

Factors are accumulated batch by batch (``batch_size`` examples at a time), and
summed over torch.distributed ranks when ``distributed=True`` (each rank holding
its shard of the data). :meth:`KroneckerFactors.state_dict` /
:meth:`KroneckerFactors.from_state_dict` store and restore them.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import autodiff
from .operators import CurvatureOperator
from ..errors import InputError, InputTypeError, UnsupportedModelError
from ..layers import LayerAdapter, adapter_for, attention, unreadable_modules

__all__ = ["KRONECKER_KINDS", "PSEUDO_GRADIENTS", "KroneckerCurvature", "KroneckerFactors", "KroneckerLayer",
           "kronecker_layers", "kronecker_layout", "output_hessian_factors", "compute_factors"]

KRONECKER_KINDS = ("kfac", "ekfac")
PSEUDO_GRADIENTS = ("auto", "exact", "sampled")
OTHER_PARAMETERS = ("diagonal", "damping", "error")
# "auto" pseudo-gradients are exact (C backward passes per batch) up to this many outputs.
EXACT_MAX_OUTPUTS = 16
# Elements of a transient per-example gradient block in the eigenvalue-correction pass.
_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------ layers
@dataclasses.dataclass
class KroneckerLayer:
    """One covered layer: where its weight and bias sit in the flat parameter vector."""

    name: str
    adapter: LayerAdapter
    weight: tuple[int, int] | None
    bias: tuple[int, int] | None

    @property
    def module(self):
        return self.adapter.module

    @property
    def out_dim(self) -> int:
        return self.adapter.out_features

    @property
    def in_dim(self) -> int:
        """Columns of the layer's parameter matrix: inputs (x kernel) plus one for the bias."""
        return self.adapter.in_features + (self.bias is not None)

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer input as (b, T, i'): patches for a convolution, a ones column for the bias."""
        return self.adapter.input_tokens(inputs, bias=self.bias is not None)

    def output_tokens(self, grads: torch.Tensor, batch: int) -> torch.Tensor:
        """Output gradients (K, b, ...) as (K, b, T, o)."""
        return self.adapter.output_tokens(grads, (grads.shape[0], batch))

    def block(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of the (d, m) block V that belong to this layer, as (m, o, i')."""
        m = V.shape[1]
        lo, hi = self.weight
        W = V[lo:hi].T.reshape(m, self.out_dim, -1)
        if self.bias is None:
            return W
        lo, hi = self.bias
        return torch.cat([W, V[lo:hi].T.unsqueeze(2)], 2)

    def write(self, block: torch.Tensor, out: torch.Tensor) -> None:
        """Store a (m, o, i') block into this layer's rows of out (d, m)."""
        m = block.shape[0]
        lo, hi = self.weight
        if self.bias is None:
            out[lo:hi] = block.reshape(m, -1).T
            return
        out[lo:hi] = block[:, :, :-1].reshape(m, -1).T
        lo, hi = self.bias
        out[lo:hi] = block[:, :, -1].T


def kronecker_layers(problem) -> tuple[list[KroneckerLayer], list[str]]:
    """The covered layers of the problem's model and the names of every other parameter."""
    layers, others, _ = kronecker_layout(problem)
    return layers, others


def kronecker_layout(problem) -> tuple[list[KroneckerLayer], list[str], dict]:
    """(covered layers, every other parameter's name, why each other parameter is not in a
    Kronecker-factored layer). A layer whose forward never runs -- its weight used functionally,
    as ``nn.MultiheadAttention`` uses ``out_proj`` -- has no hook to see its inputs: it is not
    covered (found by one probe forward pass on one example)."""
    layers = _candidate_layers(problem)
    unreadable = unreadable_modules(problem, list({id(layer.module): layer.module for layer in layers}.values()))
    silent = set(unreadable) | _unreproduced_attention(problem, layers)
    layers = [layer for layer in layers if id(layer.module) not in silent]
    covered = _covered(layers, problem)
    others = [n for n in problem.param_names if n not in covered]
    return layers, others, {n: _why_not_factored(problem, n, unreadable) for n in others}


def _unreproduced_attention(problem, layers) -> set:
    """ids of the attention modules whose output the blocks' recomputation does not reproduce
    on one example (their parameters then keep the exact GNH diagonal)."""
    modules = {id(layer.module): layer.module for layer in layers if isinstance(layer.adapter, attention.AttentionPart)}
    if not modules:
        return set()
    calls = {}

    def hook(module, args, kwargs, output):
        calls[id(module)] = (attention.capture(module, args, kwargs), output[0].detach())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        with torch.no_grad(), autodiff.unfused_attention():
            problem.forward(problem.theta, problem.inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    return {key for key, module in modules.items()
            if key not in calls or not attention.reproduces(module, *calls[key])}


def _why_not_factored(problem, name: str, unreadable: dict) -> str:
    """Why parameter ``name`` is not in a Kronecker-factored layer, naming its module."""
    module_name = name.rpartition(".")[0]
    module = dict(problem.model.named_modules()).get(module_name)
    if module is None:
        return "a parameter of the model itself, outside any layer"
    label = f"{type(module).__name__} {module_name!r}"
    if isinstance(module, nn.MultiheadAttention):
        why = attention.unsupported_reason(module) or ("its query / key / value / output blocks cannot be "
                                                       "recomputed from its inputs (unbatched inputs or another "
                                                       "call than nn.MultiheadAttention's)")
        return f"{label}: {why}"
    if id(module) in unreadable:
        return f"{label}: {unreadable[id(module)]}"
    adapter, why = adapter_for(module)
    if adapter is None:
        return f"{label}: {why}"
    if not adapter.kronecker:
        return f"{label}: per-channel parameters, no Kronecker factors"
    return f"{label}: its weight is frozen"


def _candidate_layers(problem) -> list[KroneckerLayer]:
    """Every module with a Kronecker adapter and a trainable weight, and the query / key / value /
    output blocks of every nn.MultiheadAttention (:mod:`pbrf_fast.layers.attention`)."""
    offsets = problem.param_ranges
    layers, covered = [], set()
    for mod_name, module in problem.model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not attention.unsupported_reason(module):
            for name, part, weight, bias in attention.attention_parts(mod_name, module, offsets):
                layers.append(KroneckerLayer(name, part, weight, bias))
            continue
        adapter, _ = adapter_for(module)
        if adapter is None or not adapter.kronecker:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        weight = offsets.get(prefix + "weight")
        if weight is None:  # frozen weight: nothing of this layer to approximate
            continue
        bias = offsets.get(prefix + "bias") if adapter.has("bias") else None
        layers.append(KroneckerLayer(mod_name, adapter, weight, bias))
    return layers


def _covered(layers, problem) -> set:
    """The parameter names the layers' weight and bias slices lie in."""
    ranges, covered = problem.param_ranges, set()
    for layer in layers:
        for piece in (layer.weight, layer.bias):
            if piece is not None:
                covered.update(n for n, (lo, hi) in ranges.items() if lo <= piece[0] < hi)
    return covered


# ------------------------------------------------------------------------- pseudo-gradients
def output_hessian_factors(loss, y: torch.Tensor, t: torch.Tensor, mode: str = "exact", samples: int = 1,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Q (K, b, C) with ``sum_k Q[k, n] Q[k, n]^T = H_n`` (``"exact"``), or K = ``samples``
    draws with that expectation (``"sampled"``: loss gradients at labels drawn from the
    model's predictive distribution, scaled by 1/sqrt(samples))."""
    kind = loss.kernel_kind
    b, C = y.shape
    if mode == "exact":
        if kind == "mse":
            return torch.eye(C, dtype=y.dtype, device=y.device).unsqueeze(1).expand(C, b, C)
        if kind == "cross_entropy":
            p = torch.softmax(y, -1)
            eye = torch.eye(C, dtype=y.dtype, device=y.device)
            return p.T.sqrt().unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))
        if kind == "bce":
            p = torch.sigmoid(y)
            root = (p * (1 - p)).sqrt()
            return torch.diag_embed(root).permute(1, 0, 2)
        return _hessian_root(loss, y, t).permute(2, 0, 1)
    scale = 1.0 / math.sqrt(samples)
    if kind == "cross_entropy":
        p = torch.softmax(y, -1)
        draws = torch.multinomial(p.cpu().double(), samples, replacement=True, generator=generator).T
        onehot = F.one_hot(draws.to(y.device), C).to(y.dtype)           # (K, b, C)
        return (p.unsqueeze(0) - onehot) * scale
    if kind == "bce":
        p = torch.sigmoid(y)
        u = torch.rand(samples, b, C, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
        return (p.unsqueeze(0) - (u < p).to(y.dtype)) * scale
    z = torch.randn(samples, b, C, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    if kind == "mse":
        return z * scale
    root = _hessian_root(loss, y, t)                                      # (b, C, C)
    return torch.einsum("bcr,kbr->kbc", root, z) * scale


def _hessian_root(loss, y, t):
    """R (b, C, C) with R R^T = H_n, from the loss's Hessian-vector product (any loss)."""
    b, C = y.shape
    eye = torch.eye(C, dtype=y.dtype, device=y.device).unsqueeze(1).expand(C, b, C)
    H = loss.hvp(y, t, eye.contiguous()).permute(1, 2, 0)                 # (b, C, C): column k = H e_k
    evals, evecs = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)


class _LayerCapture:
    """Forward hooks recording each covered layer's input and output for one batch."""

    def __init__(self, layers):
        self.layers = layers
        self.records = {}

    def __enter__(self):
        self.handles = []
        for layer in self.layers:
            def hook(module, args, kwargs, output, name=layer.name, part=isinstance(layer.adapter,
                                                                                    attention.AttentionPart)):
                if name in self.records:
                    raise InputError(f"layer {name!r} ({type(module).__name__}) runs more than once per forward "
                                     "pass (a shared layer); K-FAC needs each covered layer called once")
                # an attention block keeps the whole call (its inputs are derived from it)
                self.records[name] = ((attention.capture(module, args, kwargs), output[0]) if part
                                      else (args[0].detach(), output))
            self.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _pseudo_gradient_pass(problem, layers, x, Q_fn, diagonal=None):
    """One forward pass over x; backpropagate every pseudo-gradient Q[k] (from
    ``Q_fn(y) -> (K, b, C)``) to the layer outputs. Returns per layer (tokens (b, T, i'),
    output gradients (K, b, T, o)), Q, and (with a :class:`_Diagonal`) sum_k g_nk^2 of the
    other parameters, (b, their numel)."""
    extra = [] if diagonal is None else diagonal.batchnorms
    layers = list(layers)
    with _LayerCapture(layers + extra) as capture, torch.enable_grad():
        # theta requires grad only so that the layer outputs are in a graph; the backward
        # pass below stops at them (no parameter gradient is formed)
        y = problem.forward(problem.theta.detach().requires_grad_(), x)
        Q = Q_fn(y.detach())
        outs = [capture.records[layer.name][1] for layer in layers + extra]
        try:
            grads = torch.autograd.grad(y, outs, grad_outputs=Q, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one backward pass per pseudo-gradient
            per_k = [torch.autograd.grad(y, outs, grad_outputs=Q[k], retain_graph=True, allow_unused=True)
                     for k in range(Q.shape[0])]
            grads = [None if g[0] is None else torch.stack(g) for g in zip(*per_k)]
    b = x.shape[0]
    grads = [torch.zeros(Q.shape[0], *out.shape, dtype=out.dtype, device=out.device) if g is None else g.detach()
             for out, g in zip(outs, grads)]
    parts, shared = [], {}
    for layer, g in zip(layers, grads):
        inputs = capture.records[layer.name][0]
        if isinstance(layer.adapter, attention.AttentionPart):  # inputs and gradients of the block
            inputs, g = layer.adapter.part_data(inputs, g, shared)
        elif inputs.shape[0] != b:  # tokens would be read across examples: refuse, never mix them
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer.module).__name__}) gets inputs of shape {tuple(inputs.shape)} "
                f"for a batch of {b}: its example dimension is not first (a sequence-first layout?), which "
                "K-FAC cannot read per example; apply it batch-first or use curvature='gnh'")
        parts.append((layer.tokens(inputs), layer.output_tokens(g, b)))
    if diagonal is None:
        return parts, Q, None
    bn_parts = [(capture.records[layer.name][0], g) for layer, g in zip(extra, grads[len(layers):])]
    return parts, Q, diagonal.squares(problem, x, Q, bn_parts)


class _Diagonal:
    """The parameters outside the Kronecker-factored layers, for their diagonal block:
    eval-mode BatchNorm gamma / beta from the same hooks (per-example gradients
    sum_t g x_hat and sum_t g, as in pbrf_fast.scale.layer_scores), anything else by
    torch.func per-example pseudo-gradients restricted to those parameters."""

    def __init__(self, problem, others: list[str]):
        self.others = list(others)
        self.sizes = dict(zip(problem.param_names, problem.param_sizes))
        wanted, self.batchnorms = set(others), []
        for mod_name, module in problem.model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            names = [prefix + p for p in ("weight", "bias") if prefix + p in wanted]
            adapter, _ = adapter_for(module)
            # per-channel layers (eval BatchNorm): per-example gradients straight from the hooks
            if adapter is not None and not adapter.kronecker and names:
                self.batchnorms.append(KroneckerLayer(mod_name, adapter, None, None))
                wanted -= set(names)
        self.by_torch_func = [n for n in others if n in wanted]

    def squares(self, problem, x, Q, bn_parts) -> torch.Tensor:
        columns = {}
        for layer, (inputs, g) in zip(self.batchnorms, bn_parts):
            prefix = f"{layer.name}." if layer.name else ""
            # g (K, b, ...) seen as (b, K, ...): each pseudo-gradient is one output vector
            rows = layer.adapter.jacobian_rows(inputs, g.transpose(0, 1), layer.adapter.roles)
            for role, block in rows.items():
                columns[prefix + role] = block.pow(2).sum(1)
        if self.by_torch_func:
            squares = _other_gradient_squares(problem, self.by_torch_func, x, Q)
            pieces = squares.split([self.sizes[n] for n in self.by_torch_func], 1)
            columns.update(zip(self.by_torch_func, pieces))
        return torch.cat([columns[n] for n in self.others], 1)


def _other_gradient_squares(problem, names, x, Q):
    """sum_k g_nk^2 (b, numel) for the parameters ``names`` (per-example pseudo-gradients by
    torch.func restricted to those parameters: cheap for BatchNorm-sized tensors)."""
    params = problem.unflatten(problem.theta)
    fixed = {k: v for k, v in params.items() if k not in names}
    chosen = {k: params[k] for k in names}

    def outputs(sub, x_row):
        out = torch.func.functional_call(problem.model, ({**fixed, **sub}, problem.buffers), (x_row.unsqueeze(0),))
        return out.reshape(-1)

    def one(x_row, q_rows):
        _, pullback = torch.func.vjp(lambda sub: outputs(sub, x_row), chosen)
        (g,) = torch.func.vmap(pullback)(q_rows)
        return torch.cat([g[k].reshape(q_rows.shape[0], -1) for k in names], 1).pow(2).sum(0)

    try:
        with torch.enable_grad():
            return torch.func.vmap(one)(x, Q.transpose(0, 1)).detach()
    except autodiff.TRANSFORM_ERRORS as exc:
        if not autodiff.transform_failure(exc):
            raise
    # torch.func cannot vmap this model over examples (GRU / LSTM; fused attention; a custom
    # Function): the same squares from one batched forward pass, pulled back along cotangent
    # (n, k) = Q[k, n] in row n and zeros elsewhere (the examples do not interact; Problem checks)
    shapes = [chosen[k].shape for k in names]
    flat = torch.cat([chosen[k].reshape(-1) for k in names])
    K, b = Q.shape[0], x.shape[0]

    def batched(values):
        sub = {k: c.reshape(shape) for k, c, shape in zip(names, values.split([s.numel() for s in shapes]), shapes)}
        out = torch.func.functional_call(problem.model, ({**fixed, **sub}, problem.buffers), (x,))
        return out.reshape(b, -1)

    def cotangents(y):
        rows = torch.zeros(b, K, *y.shape, dtype=y.dtype, device=y.device)
        index = torch.arange(b, device=y.device)
        rows[index, :, index] = Q.transpose(0, 1).to(y.dtype)
        return rows.reshape(b * K, *y.shape)

    return autodiff.pullback_rows(batched, flat, cotangents).reshape(b, K, -1).pow(2).sum(1)


# ------------------------------------------------------------------------------------ factors
@dataclasses.dataclass
class KroneckerFactors:
    """Per-layer factors of one model: covariances, their eigenpairs, EK-FAC's corrected
    eigenvalues, the diagonal of the other parameters, and how they were made."""

    kind: str
    num_examples: int
    pseudo_gradients: str
    A: dict
    S: dict
    eigen: dict = dataclasses.field(default_factory=dict)   # name -> (l_A, Q_A, l_S, Q_S)
    corrected: dict = dataclasses.field(default_factory=dict)  # name -> (o, i') EK-FAC eigenvalues
    diagonal: torch.Tensor | None = None                    # other parameters' GNH diagonal (or None)
    seconds: dict = dataclasses.field(default_factory=dict)

    def eigenvalues(self, name: str) -> torch.Tensor:
        """The (o, i') eigenvalues of layer ``name``'s block in its Kronecker eigenbasis."""
        if self.kind == "ekfac":
            return self.corrected[name]
        l_A, _, l_S, _ = self.eigen[name]
        return l_S.unsqueeze(1) * l_A.unsqueeze(0)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "KroneckerFactors":
        state = dict(state)
        state["eigen"] = {k: tuple(v) for k, v in state.get("eigen", {}).items()}
        return cls(**state)


def _accumulate(total: dict, key, value):
    total[key] = value if key not in total else total[key].add_(value)


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor)


def compute_factors(problem, kind: str = "ekfac", *, pseudo_gradients: str = "auto", samples: int = 1,
                    seed: int = 0, batch_size: int | None = None, other: str = "diagonal",
                    distributed: bool = False, progress: bool = False) -> KroneckerFactors:
    """K-FAC / EK-FAC factors of the problem's GNH over all its examples (see the module
    docstring). With ``distributed=True`` every rank passes its shard and all get the
    factors of the union (sums all-reduced)."""
    layers, others = kronecker_layers(problem)
    mode = _resolve_mode(pseudo_gradients, problem.num_outputs)
    rank = _rank() if distributed else 0
    generator = torch.Generator().manual_seed(int(seed) + 1_000_003 * rank)
    step = batch_size or problem.batch_size
    diagonal_block = _Diagonal(problem, others) if other == "diagonal" and others else None

    def q_for(t):
        return lambda y: output_hessian_factors(problem.loss, y, t, mode, samples, generator)

    # pass 1: covariances (and the other parameters' diagonal)
    start = time.perf_counter()
    A, S, count, diagonal = {}, {}, 0, None
    for s in _batches(problem.n, step, progress, f"{kind} covariances"):
        x, t = problem.inputs[s], problem.targets[s]
        parts, Q, squares = _pseudo_gradient_pass(problem, layers, x, q_for(t), diagonal_block)
        for layer, (a, g) in zip(layers, parts):
            _accumulate(A, layer.name, torch.einsum("bti,btj->ij", a, a))
            _accumulate(S, layer.name, torch.einsum("kbto,kbtp->op", g, g) / a.shape[1])
        if squares is not None:
            diagonal = squares.sum(0) if diagonal is None else diagonal.add_(squares.sum(0))
        count += x.shape[0]
    names = [layer.name for layer in layers]
    totals = [A[n] for n in names] + [S[n] for n in names] + ([diagonal] if diagonal is not None else [])
    count_t = torch.tensor([float(count)], dtype=torch.float64)
    if distributed:
        _all_reduce(totals + [count_t])
    N = int(count_t.item())
    for n in names:
        A[n] = A[n] / N
        S[n] = S[n] / N
    diagonal = None if diagonal is None else diagonal / N
    factors = KroneckerFactors(kind, N, mode, A, S, diagonal=diagonal)
    factors.seconds["covariances"] = time.perf_counter() - start

    start = time.perf_counter()
    for n in names:
        l_A, Q_A = _eigh(A[n])
        l_S, Q_S = _eigh(S[n])
        dtype = A[n].dtype
        factors.eigen[n] = (l_A.clamp_min(0).to(dtype), Q_A.to(dtype), l_S.clamp_min(0).to(dtype), Q_S.to(dtype))
    factors.seconds["eigendecomposition"] = time.perf_counter() - start
    if kind == "ekfac":
        start = time.perf_counter()
        _eigenvalue_corrections(problem, layers, factors, step, progress, q_for, distributed)
        factors.seconds["corrections"] = time.perf_counter() - start
    return factors


def _eigenvalue_corrections(problem, layers, factors, step, progress, q_for_targets, distributed):
    corrected = {}
    for s in _batches(problem.n, step, progress, "ekfac eigenvalue corrections"):
        x, t = problem.inputs[s], problem.targets[s]
        parts, _, _ = _pseudo_gradient_pass(problem, layers, x, q_for_targets(t))
        for layer, (a, g) in zip(layers, parts):
            _, Q_A, _, Q_S = factors.eigen[layer.name]
            _accumulate(corrected, layer.name, rotated_gradient_squares(a @ Q_A, g @ Q_S))
    names = [layer.name for layer in layers]
    if distributed:
        _all_reduce([corrected[n] for n in names])
    factors.corrected = {n: corrected[n] / factors.num_examples for n in names}


def rotated_gradient_squares(a_rot: torch.Tensor, g_rot: torch.Tensor, weights: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Squares of the pseudo-gradients in the eigenbasis, ``G = sum_t g_rot[k, n, t] a_rot[n, t]^T``:
    without ``weights`` their sum over k and the examples n, (o, i'); with ``weights`` (o, i')
    the per-example ``sum_k sum(G^2 * weights)``, (b,). Per-example gradients exist only in
    bounded chunks, and not at all for one token (the square of a rank-one matrix is the
    outer product of the squares)."""
    K, b, T, o = g_rot.shape
    i = a_rot.shape[2]
    if T == 1:
        s2, a2 = g_rot[:, :, 0].pow(2).sum(0), a_rot[:, 0].pow(2)    # (b, o), (b, i')
        return s2.T @ a2 if weights is None else ((s2 @ weights) * a2).sum(1)
    out = a_rot.new_zeros(o, i) if weights is None else a_rot.new_zeros(b)
    rows = max(1, _CHUNK_ELEMENTS // max(K * o * i, 1))
    for n in range(0, b, rows):
        squares = torch.einsum("kbto,bti->kboi", g_rot[:, n:n + rows], a_rot[n:n + rows]).pow(2).sum(0)
        if weights is None:
            out += squares.sum(0)
        else:
            out[n:n + rows] = (squares * weights).sum((1, 2))
    return out


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetrised factor in float64. Small factors are decomposed on one
    thread: LAPACK's threaded path is ~1000x slower at these sizes on a busy machine
    (measured 1.8 s against 1.8 ms for 129 x 129 with 2 threads on the shared box)."""
    M = 0.5 * (M + M.T).double()
    threads = torch.get_num_threads()
    if M.shape[0] > 4096 or threads == 1:
        return torch.linalg.eigh(M)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(M)
    finally:
        torch.set_num_threads(threads)


def _resolve_mode(pseudo_gradients, num_outputs):
    if pseudo_gradients not in PSEUDO_GRADIENTS:
        raise InputError(f"pseudo_gradients must be one of {PSEUDO_GRADIENTS}, got {pseudo_gradients!r}")
    if pseudo_gradients == "auto":
        return "exact" if num_outputs <= EXACT_MAX_OUTPUTS else "sampled"
    return pseudo_gradients


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _batches(n, step, progress, desc):
    slices = [slice(s, min(n, s + step)) for s in range(0, n, step)]
    if not progress:
        return slices
    from tqdm.auto import tqdm

    return tqdm(slices, desc=desc, leave=False)


# ----------------------------------------------------------------------------------- operator
class KroneckerCurvature(CurvatureOperator):
    """``K + (weight_decay + damping) I`` with K the K-FAC or EK-FAC approximation of the GNH.

    ``kind``: ``"kfac"`` or ``"ekfac"``. ``relative_damping``: r adds ``r * mean``
    of each block's eigenvalues to that block (kronfluence's heuristic: r = 0.1).
    ``pseudo_gradients`` (``"auto"`` / ``"exact"`` / ``"sampled"``), ``samples``,
    ``seed``: how the output Hessian enters (module docstring). ``other``: what the
    parameters outside covered layers get (``"diagonal"``, ``"damping"``, ``"error"``).
    ``factors``: precomputed :class:`KroneckerFactors` (e.g. loaded from disk).

    :meth:`solve` applies the exact inverse of this operator (two small matrix
    products per layer and column); :meth:`matvec` its product, so the generic
    solvers and :meth:`dense` work too. :attr:`coverage` reports what each parameter got.
    """

    kind = "ekfac"

    def __init__(self, problem, damping: float = 0.0, kind: str = "ekfac", *, relative_damping: float | None = None,
                 pseudo_gradients: str = "auto", samples: int = 1, seed: int = 0, batch_size: int | None = None,
                 other: str = "diagonal", distributed: bool = False, factors: KroneckerFactors | None = None,
                 progress: bool = False, _cache: dict | None = None):
        if kind not in KRONECKER_KINDS:
            raise InputError(f"kind must be one of {KRONECKER_KINDS}, got {kind!r}")
        if other not in OTHER_PARAMETERS:
            raise InputError(f"other must be one of {OTHER_PARAMETERS}, got {other!r}")
        problem.loss.require_convex(f"the {kind} approximation of the Gauss-Newton Hessian")
        if relative_damping is not None:
            if isinstance(relative_damping, bool) or not isinstance(relative_damping, (int, float)):
                raise InputTypeError(f"relative_damping must be a number or None, got {relative_damping!r}")
            if not math.isfinite(relative_damping) or relative_damping < 0:
                raise InputError(f"relative_damping must be finite and >= 0, got {relative_damping!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise InputError(f"samples must be a positive integer, got {samples!r}")
        _resolve_mode(pseudo_gradients, problem.num_outputs)
        super().__init__(problem, damping, batch_size=batch_size, _cache=_cache)
        self.kind = kind
        self.options = {"relative_damping": relative_damping, "pseudo_gradients": pseudo_gradients,
                        "samples": samples, "seed": seed, "other": other, "distributed": distributed,
                        "progress": progress}
        self.layers, self.others, self.reasons = kronecker_layout(problem)
        if not self.layers:
            raise InputError(f"{kind}: the model has no nn.Linear or nn.Conv2d (groups=1, zero padding) layer "
                             "with a trainable weight to factorise")
        if self.others and other == "error":
            why = "; ".join(sorted(set(self.reasons.values())))
            raise UnsupportedModelError(f"{kind}: parameters {self.others} are not in an nn.Linear / nn.Conv2d "
                                        f"layer ({why}) (other='error'); use other='diagonal' or other='damping'")
        if self.others:
            treatment = "the exact GNH diagonal" if other == "diagonal" else "damping only"
            why = "; ".join(sorted(set(self.reasons.values())))
            warnings.warn(f"{kind}: parameters {self.others} are outside Linear/Conv2d layers and get "
                          f"{treatment} (see .coverage and .reasons): {why}", stacklevel=2)
        if factors is not None:
            self._cache["kronecker_factors"] = (problem.version, factors)

    # -------------------------------------------------------------------- factors
    @property
    def factors(self) -> KroneckerFactors:
        """The factors (computed on first use, cached with the operator and its damping copies)."""
        o = self.options
        return self._cached("kronecker_factors", lambda: compute_factors(
            self.problem, self.kind, pseudo_gradients=o["pseudo_gradients"], samples=o["samples"], seed=o["seed"],
            batch_size=self.batch_size, other=o["other"], distributed=o["distributed"], progress=o["progress"]))

    def state_dict(self) -> dict:
        """The factors: saved beside a long job's results, passed back as ``factors=``."""
        return self.factors.state_dict()

    @property
    def coverage(self) -> dict:
        """Which parameters each treatment covers: Kronecker-factored layers (weight with bias
        folded in) and the other parameters (diagonal GNH block, or damping only)."""
        other = self.options["other"]
        return {"kronecker": [layer.name or "<model>" for layer in self.layers],
                "diagonal": list(self.others) if other == "diagonal" else [],
                "damping_only": list(self.others) if other == "damping" else []}

    @property
    def num_examples(self) -> int:
        return self.factors.num_examples if "kronecker_factors" in self._cache else self.problem.n

    def with_damping(self, damping: float) -> "KroneckerCurvature":
        o = dict(self.options)
        return type(self)(self.problem, damping, self.kind, batch_size=self.batch_size, _cache=self._cache, **o)

    def eigenvalues(self) -> torch.Tensor:
        """Every eigenvalue of the approximation K (relative damping included, weight decay and
        damping not): each layer's block, then the other parameters' diagonal (zeros where
        they get damping only). ``damping="auto"`` reads its scale from them."""
        blocks, (rows, diag) = self._blocks()
        parts = [values.reshape(-1) for _, _, _, values in blocks]
        if rows is not None:
            parts.append(diag.reshape(-1).to(self.dtype))
        return torch.cat(parts)

    def _other_slices(self):
        offsets = self.problem.param_ranges
        return [offsets[n] for n in self.others]

    def _blocks(self):
        """Per layer (layer, Q_A, Q_S, eigenvalues + relative damping); and the other
        parameters' (rows, diagonal + relative damping)."""
        key = ("kronecker_blocks", self.options["relative_damping"])

        def build():
            f, r = self.factors, self.options["relative_damping"]
            blocks = []
            for layer in self.layers:
                _, Q_A, _, Q_S = f.eigen[layer.name]
                values = f.eigenvalues(layer.name)
                if r:
                    values = values + r * values.mean()
                blocks.append((layer, Q_A, Q_S, values))
            rows = torch.cat([torch.arange(lo, hi) for lo, hi in self._other_slices()]) if self.others else None
            diag = None
            if rows is not None:
                diag = f.diagonal if f.diagonal is not None else torch.zeros(len(rows), dtype=self.dtype)
                if r and f.diagonal is not None:
                    diag = diag + r * diag.mean()
            return blocks, (rows, diag)

        return self._cached(key, build)

    # -------------------------------------------------------------------- products
    def _apply(self, V2: torch.Tensor, power: int, shift: float) -> torch.Tensor:
        """(K + shift I)^power V2 for power 1 or -1, block by block."""
        out = torch.empty_like(V2)
        blocks, (rows, diag) = self._blocks()
        for layer, Q_A, Q_S, values in blocks:
            Vb = layer.block(V2)
            rotated = Q_S.T @ Vb @ Q_A
            scale = (values + shift) if power == 1 else 1.0 / (values + shift)
            layer.write(Q_S @ (rotated * scale) @ Q_A.T, out)
        if rows is not None:
            d = (diag + shift).to(V2.dtype).unsqueeze(1)
            out[rows] = V2[rows] * d if power == 1 else V2[rows] / d
        return out

    def data_matvec(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        """K V (relative damping included: it is part of each block). No mini-batches: the
        approximation is one fixed matrix."""
        if idx is not None:
            raise InputError(f"{self.kind}: the Kronecker approximation has no mini-batch products (idx must be None)")
        V2 = self.check_vectors(V)
        with torch.no_grad():
            return self._apply(V2, 1, 0.0).reshape(V.shape)

    def inverse_matvec(self, V: torch.Tensor) -> torch.Tensor:
        """(K + (weight_decay + damping) I)^{-1} V for V (d,) or (d, m)."""
        V2 = self.check_vectors(V)
        shift = self.shift
        if shift <= 0 and (self.options["relative_damping"] or 0) <= 0:
            raise InputError(f"{self.kind}: the inverse needs damping > 0, weight decay or relative_damping "
                             "(the Kronecker factors may be singular)")
        with torch.no_grad():
            return self._apply(V2, -1, shift).reshape(V.shape)

    def quadratic_form_per_example(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """g_n^T (K + shift I)^{-1} g_n for each example's loss gradient g_n (b,), layer by
        layer in the eigenbasis (no per-example gradient for the whole network)."""
        blocks, (rows, diag) = self._blocks()
        layers = [b[0] for b in blocks]
        shift = self.shift
        x, t = self.problem.check_data(x, t)
        diagonal = _Diagonal(self.problem, self.others) if rows is not None else None
        parts, _, squares = _pseudo_gradient_pass(self.problem, layers, x,
                                                  lambda y: self.problem.loss.grad(y, t).unsqueeze(0), diagonal)
        total = torch.zeros(x.shape[0], dtype=self.dtype, device=x.device)
        for (layer, Q_A, Q_S, values), (a, g) in zip(blocks, parts):
            total += rotated_gradient_squares(a @ Q_A, g @ Q_S, 1.0 / (values + shift))
        if rows is not None:
            total += (squares / (diag + shift)).sum(1)
        return total

    def __repr__(self) -> str:
        return (f"KroneckerCurvature(kind={self.kind!r}, d={self.dim}, damping={self.damping}, "
                f"relative_damping={self.options['relative_damping']}, weight_decay={self.problem.weight_decay})")
