"""Scores g_i^T s_q for a batch of training points without per-example gradients.

One forward pass with hooks records each covered layer's inputs, one backward
pass (to the layer outputs only, not the parameters) their output gradients
delta; then each layer contributes

- ``nn.Linear`` / ``nn.Conv2d`` (groups = 1, zero padding): weight part by the
  score-contraction op (a = inputs, delta = output grads; convolutions through
  conv2d_score_contraction, which on CPU never unfolds the whole batch's patches),
  bias part (sum_t delta_t)^T s_bias;
- ``nn.BatchNorm{1,2}d`` in eval mode (a fixed per-channel affine map):
  gamma part (sum_t delta_t * xhat_t)^T s_gamma, beta part (sum_t delta_t)^T s_beta.

Any other trainable parameter falls back (with a warning) to the exact jvp
identity g_i^T s = (dL_i/dy_i)^T (J_i s), pushing s restricted to those
parameters through the network with torch.func.jvp.

Everything is in the flat parameter order of the :class:`~pbrf_fast.Problem`.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.score_contraction import (conv2d_score_contraction, conv2d_weight_gradient_blocks,
                                         score_contraction)

__all__ = ["LayerScorer"]


def _covered(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return module.affine and module.track_running_stats
    return False


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
        self.layers = []  # (module, {"weight": (lo, hi), "bias": (lo, hi) or None})
        covered = set()
        for mod_name, module in self.model.named_modules():
            if not _covered(module):
                continue
            slots = {}
            for pname in ("weight", "bias"):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if getattr(module, pname, None) is not None and full in offsets:
                    slots[pname] = offsets[full]
                    covered.add(full)
            if slots:
                self.layers.append((module, slots))
        self.fallback = [n for n in problem.param_names if n not in covered]
        if self.fallback:
            warnings.warn(f"LayerScorer: no hook for parameters {self.fallback}; their share of each score "
                          "is computed exactly by jvp (one forward-mode pass per test vector)", stacklevel=2)

    # ------------------------------------------------------------------ capture
    def _capture(self, x, t):
        records = {id(m): [] for m, _ in self.layers}
        handles = []

        def hook(module, inputs, output):
            records[id(module)].append([inputs[0].detach(), output])

        for module, _ in self.layers:
            handles.append(module.register_forward_hook(hook))
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

    @staticmethod
    def _tokens(module, inputs, grad_out):
        """(a, delta) as (b, t, i) and (b, t, o) for Linear (Conv2d has its own path)."""
        b = inputs.shape[0]
        return inputs.reshape(b, -1, inputs.shape[-1]), grad_out.reshape(b, -1, grad_out.shape[-1])

    @staticmethod
    def _bn_parts(module, inputs, grad_out):
        """Per-example gamma and beta gradients (b, C): tiny, so formed directly."""
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        xhat = (inputs - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
        dims = tuple(range(2, inputs.dim()))
        gamma = (grad_out * xhat).sum(dims) if dims else grad_out * xhat
        beta = grad_out.sum(dims) if dims else grad_out
        return {"weight": gamma, "bias": beta}

    # ------------------------------------------------------------------- scores
    def scores(self, x, t, S: torch.Tensor) -> torch.Tensor:
        """(b, m): rows are per-example loss gradients dotted with the columns of S (d, m)."""
        S = S.reshape(S.shape[0], -1)
        m = S.shape[1]
        records, y = self._capture(x, t)
        total = torch.zeros(x.shape[0], m, dtype=S.dtype, device=S.device)
        for module, slots in self.layers:
            for inputs, grad_out in records[id(module)]:
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    parts = self._bn_parts(module, inputs, grad_out)
                    for pname, (lo, hi) in slots.items():
                        total += parts[pname] @ S[lo:hi]
                    continue
                if isinstance(module, nn.Conv2d):
                    # straight from the layer input: on CPU the patches are never
                    # unfolded for the whole batch (k*k times the input)
                    if "weight" in slots:
                        lo, hi = slots["weight"]
                        s_w = S[lo:hi].T.reshape(m, module.out_channels, -1)
                        total += conv2d_score_contraction(
                            inputs, grad_out, s_w, kernel_size=module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, backend=self.backend)
                    if "bias" in slots:
                        lo, hi = slots["bias"]
                        total += grad_out.flatten(2).sum(2) @ S[lo:hi]
                    continue
                a, delta = self._tokens(module, inputs, grad_out)
                if "weight" in slots:
                    lo, hi = slots["weight"]
                    s_w = S[lo:hi].T.reshape(m, delta.shape[2], a.shape[2])
                    total += score_contraction(a, delta, s_w, backend=self.backend)
                if "bias" in slots:
                    lo, hi = slots["bias"]
                    total += delta.sum(1) @ S[lo:hi]
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
        for module, slots in self.layers:
            for inputs, grad_out in records[id(module)]:
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    for pname, part in self._bn_parts(module, inputs, grad_out).items():
                        if pname in slots:
                            total += part.double().pow(2).sum(1)
                    continue
                if isinstance(module, nn.Conv2d):
                    if "weight" in slots:  # ||G||^2 = sum over kernel-offset blocks of ||G_block||^2
                        for k, n, _, G in conv2d_weight_gradient_blocks(
                                inputs, grad_out, kernel_size=module.kernel_size, stride=module.stride,
                                padding=module.padding, dilation=module.dilation):
                            total[k:k + n] += G.double().pow(2).sum((1, 2))
                    if "bias" in slots:
                        total += grad_out.flatten(2).sum(2).double().pow(2).sum(1)
                    continue
                a, delta = self._tokens(module, inputs, grad_out)
                if "weight" in slots:
                    if a.shape[1] == 1:
                        total += (a.double().pow(2).sum((1, 2)) * delta.double().pow(2).sum((1, 2)))
                    else:
                        for k in range(0, a.shape[0], chunk):
                            g = torch.bmm(delta[k:k + chunk].transpose(1, 2), a[k:k + chunk])
                            total[k:k + chunk] += g.double().pow(2).sum((1, 2))
                if "bias" in slots:
                    total += delta.sum(1).double().pow(2).sum(1)
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
