"""Scores g_i^T s_q for a batch of training points without per-example gradients.

One forward pass with hooks records each covered layer's inputs, one backward
pass (to the layer outputs only, not the parameters) their output gradients
delta; then each layer with an adapter (:mod:`pbrf_fast.layers`) contributes its
``scores`` -- Linear / Conv2d by the score-contraction op (convolutions through
conv2d_score_contraction, which on CPU never unfolds the whole batch's patches) plus
the bias part (sum_t delta_t)^T s_bias; eval BatchNorm by its per-channel gradients.

Any other trainable parameter -- and those of a layer hooks cannot read per example: one whose
forward never runs (its weight used functionally) or whose input is not example-first -- falls
back (with a warning) to the exact jvp identity g_i^T s = (dL_i/dy_i)^T (J_i s), pushing s
restricted to those parameters through the network (torch.func, or reverse mode only where the
model has no forward-mode rule: :mod:`pbrf_fast.autodiff`).

Everything is in the flat parameter order of the :class:`~pbrf_fast.Problem`.
"""
from __future__ import annotations

import warnings

import torch

from .. import autodiff
from ..layers import adapter_for, parameter_slots, unreadable_modules

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
                self.layers.append((adapter, slots, mod_name))
        # a layer whose forward never runs (its weight used functionally) or whose inputs are not
        # example-first has no hook that reads it per example: its parameters take the fallback
        unreadable = unreadable_modules(problem, [adapter.module for adapter, _, _ in self.layers])
        kept = [(adapter, slots, name) for adapter, slots, name in self.layers if id(adapter.module) not in unreadable]
        for _, slots, mod_name in kept:
            covered.update(f"{mod_name}.{role}" if mod_name else role for role in slots)
        self.layers = [(adapter, slots) for adapter, slots, _ in kept]
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

    def _fallback_function(self):
        """(the fallback parameters as one flat vector, f(flat, inputs) -> outputs (b, C))."""
        names = self.fallback
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        shapes = [params[n].shape for n in names]
        flat = torch.cat([params[n].reshape(-1) for n in names])

        def outputs(values, x):
            chunks = values.split([s.numel() for s in shapes])
            own = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
            out = torch.func.functional_call(self.model, ({**params, **own}, buffers), (x,))
            return out.reshape(out.shape[0], -1)

        return flat, outputs

    def _fallback_rows(self, S):
        """S's rows of the fallback parameters, in their order, as (m, their numel)."""
        return torch.cat([S[self.offsets[n][0]:self.offsets[n][1]] for n in self.fallback]).T

    def _fallback_scores(self, x, t, y, S):
        # g_i^T s = (dL_i/dy_i)^T (J_i s): one tangent per column (forward mode, or reverse only
        # where the model has no forward-mode rule: pbrf_fast.autodiff)
        flat, outputs = self._fallback_function()
        rows = self._fallback_rows(S).to(flat.dtype)
        JS = autodiff.output_tangents(lambda values: outputs(values, x), flat, rows)           # (m, b, C)
        dldy = self.problem.loss.grad(y, t).reshape(y.shape[0], -1)                            # (b, C)
        return torch.einsum("bc,mbc->bm", dldy, JS.to(dldy.dtype))

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
            flat, outputs = self._fallback_function()
            loss = self.problem.loss

            def one(values, xi, ti):
                return loss.value(outputs(values, xi.unsqueeze(0)), ti.unsqueeze(0)).sum()

            grads = autodiff.per_example_gradients(one, lambda values: loss.value(outputs(values, x), t), flat, x, t)
            total += grads.double().pow(2).sum(1)
        return total
