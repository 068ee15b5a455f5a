"""Scores g_i^T s_q for a batch of training points without per-example gradients.

One forward pass with hooks records each covered layer's inputs, one backward
pass (to the layer outputs only, not the parameters) their output gradients
delta; then each layer with an adapter (:mod:`pbrf_fast.layers`) contributes its
``scores`` -- Linear / Conv2d by the score-contraction op (convolutions through
conv2d_score_contraction, which on CPU never unfolds the whole batch's patches) plus
the bias part (sum_t delta_t)^T s_bias; eval BatchNorm by its per-channel gradients.

Any other trainable parameter falls back (with a warning) to the exact jvp
identity g_i^T s = (dL_i/dy_i)^T (J_i s), pushing s restricted to those
parameters through the network with torch.func.jvp.

Everything is in the flat parameter order of the :class:`~pbrf_fast.Problem`.
"""
from __future__ import annotations

import warnings

import torch

from ..layers import adapter_for, parameter_slots

__all__ = ["LayerScorer"]


class LayerScorer:
    """Per-layer score contraction for a :class:`~pbrf_fast.Problem`'s model.

    ``scores(x, t, S)`` with S (d, m) returns (b, m) = per-example-gradient^T S
    (no 1/N factor); ``norms_squared(x, t)`` returns ||g_i||^2 (for the
    low-rank self-influence remainder).
    """

    def __init__(self, problem, backend: str = "auto"):
        self.problem = problem
        self.model = problem.model.eval()
        self.backend = backend
        self.offsets = offsets = problem.param_ranges
        self.layers = []  # (adapter, {"weight": (lo, hi), "bias": (lo, hi)}), trainable roles only
        covered = set()
        for mod_name, module in self.model.named_modules():
            adapter, _ = adapter_for(module)
            slots = parameter_slots(mod_name, module, offsets) if adapter is not None else {}
            if slots:
                self.layers.append((adapter, slots))
                covered.update(f"{mod_name}.{role}" if mod_name else role for role in slots)
        self.fallback = [n for n in problem.param_names if n not in covered]
        if self.fallback:
            warnings.warn(f"LayerScorer: no hook for parameters {self.fallback}; their share of each score "
                          "is computed exactly by jvp (one forward-mode pass per test vector)", stacklevel=2)

    # ------------------------------------------------------------------ capture
    def _capture(self, x, t):
        records = {id(a.module): [] for a, _ in self.layers}
        handles = []

        def hook(module, inputs, output):
            records[id(module)].append([inputs[0].detach(), output])

        for adapter, _ in self.layers:
            handles.append(adapter.module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                y = self.model(x)
                y = y.reshape(y.shape[0], -1)
                losses = self.problem.loss.value(y, t)
                outs = [rec[1] for recs in records.values() for rec in recs]
                grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        k = 0
        for recs in records.values():
            for rec in recs:
                g = grads[k]
                rec[1] = torch.zeros_like(rec[1]) if g is None else g.detach()
                k += 1
        return records, y.detach()

    # ------------------------------------------------------------------- scores
    def scores(self, x, t, S: torch.Tensor) -> torch.Tensor:
        """(b, m): rows are per-example loss gradients dotted with the columns of S (d, m)."""
        S = S.reshape(S.shape[0], -1)
        m = S.shape[1]
        records, y = self._capture(x, t)
        total = torch.zeros(x.shape[0], m, dtype=S.dtype, device=S.device)
        for adapter, slots in self.layers:
            vectors = {role: S[lo:hi] for role, (lo, hi) in slots.items()}
            for inputs, grad_out in records[id(adapter.module)]:
                total += adapter.scores(inputs, grad_out, vectors, backend=self.backend)
        if self.fallback:
            total += self._fallback_scores(x, t, y, S)
        return total

    def _fallback_scores(self, x, t, y, S):
        problem = self.problem
        names = self.fallback
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        primals = tuple(params[n] for n in names)
        tangents = [S[self.offsets[n][0]:self.offsets[n][1]].T.reshape(S.shape[1], *params[n].shape)
                    for n in names]

        def outputs(*fallback_values):
            values = dict(params, **dict(zip(names, fallback_values)))
            out = torch.func.functional_call(self.model, (values, buffers), (x,))
            return out.reshape(out.shape[0], -1)

        def push(*tangent):
            return torch.func.jvp(outputs, primals, tangent)[1]

        JS = torch.func.vmap(push)(*tangents)                    # (m, b, C)
        dldy = problem.loss.grad(y, t).reshape(y.shape[0], -1)   # (b, C)
        return torch.einsum("bc,mbc->bm", dldy, JS)

    # ------------------------------------------------------------ squared norms
    def norms_squared(self, x, t, chunk: int = 64) -> torch.Tensor:
        """||g_i||^2 per example. Conv layers form per-example weight gradients in
        transient chunks of ``chunk`` examples (never the whole batch)."""
        records, y = self._capture(x, t)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for adapter, slots in self.layers:
            for inputs, grad_out in records[id(adapter.module)]:
                total += adapter.gradient_norms_squared(inputs, grad_out, tuple(slots), chunk=chunk)
        if self.fallback:
            names = self.fallback
            params = {n: p.detach() for n, p in self.model.named_parameters()}
            buffers = dict(self.model.named_buffers())

            def loss_one(fb, xi, ti):
                values = dict(params, **fb)
                out = torch.func.functional_call(self.model, (values, buffers), (xi.unsqueeze(0),))
                return self.problem.loss.value(out.reshape(1, -1), ti.unsqueeze(0)).sum()

            fb = {n: params[n] for n in names}
            grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(fb, x, t)
            for g in grads.values():
                total += g.reshape(g.shape[0], -1).double().pow(2).sum(1)
        return total
