"""nn.Linear: y = a W^T + b on the last dimension, every leading position a token."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.score_contraction import plan_score_contraction, score_contraction
from .base import LayerAdapter, zeros


class LinearAdapter(LayerAdapter):
    kind = "linear"
    module_types = (nn.Linear,)
    kronecker = True
    supports_jacobian_gram = True

    def _tokens(self, inputs):
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def output_tokens(self, grads, lead):
        return grads.reshape(*lead, -1, self.out_features)

    def jacobian_rows(self, inputs, grads, roles):
        b, c = grads.shape[:2]
        out = self.out_features
        delta = grads.reshape(b, c, -1, out)                                  # (b, C, T, out)
        rows = {}
        if "weight" in roles:
            # the C outputs' deltas as C x out rows of one GEMM per example: (b, C out, T) @ (b, T, in)
            block = torch.bmm(delta.transpose(2, 3).reshape(b, c * out, -1), self._tokens(inputs))
            rows["weight"] = block.view(b, c, -1)
        if "bias" in roles:
            rows["bias"] = delta.sum(2)
        return rows

    def scores(self, inputs, grads, vectors, backend="auto"):
        a, delta = self._tokens(inputs), grads.reshape(grads.shape[0], -1, grads.shape[-1])
        total = 0
        if "weight" in vectors:
            block = vectors["weight"]
            total = total + score_contraction(a, delta, block.T.reshape(block.shape[1], delta.shape[2], a.shape[2]),
                                              backend=backend)
        if "bias" in vectors:
            total = total + delta.sum(1) @ vectors["bias"]
        return total

    def gradient_norms_squared(self, inputs, grads, roles, chunk=64):
        a, delta = self._tokens(inputs), grads.reshape(grads.shape[0], -1, grads.shape[-1])
        total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
        if "weight" in roles:
            if a.shape[1] == 1:  # one token: the gradient is an outer product, its norm a product of norms
                total += a.double().pow(2).sum((1, 2)) * delta.double().pow(2).sum((1, 2))
            else:  # per-example (out, in) gradients in transient chunks, never the whole batch's
                for k in range(0, a.shape[0], chunk):
                    g = torch.bmm(delta[k:k + chunk].transpose(1, 2), a[k:k + chunk])
                    total[k:k + chunk] += g.double().pow(2).sum((1, 2))
        if "bias" in roles:
            total += delta.sum(1).double().pow(2).sum(1)
        return total

    def plan_scores(self, in_shape, out_shape, columns, like, backend):
        # one token per example, or a token per position of a sequence
        a = zeros((in_shape[0], in_shape[1:-1].numel(), in_shape[-1]) if len(in_shape) > 2 else in_shape, like)
        delta = zeros((*a.shape[:-1], out_shape[-1]), like)
        return plan_score_contraction(a, delta, zeros((columns, out_shape[-1], in_shape[-1]), like), backend)

    def jacobian_gram(self, inputs, deltas, roles) -> torch.Tensor:
        """J J^T's (b, C, b, C) block of this layer in float64, inputs (b, in), deltas (b, C, out):
        row (i, c) of J is delta_{i,c} (x) a_i for the weight and delta_{i,c} for the bias, so
        the block is (delta_{i,c} . delta_{j,c'}) (a_i . a_j + 1)."""
        b, c = deltas.shape[:2]
        a = inputs.double()
        act = a @ a.T if "weight" in roles else torch.zeros(b, b, dtype=torch.float64, device=a.device)
        if "bias" in roles:
            act = act + 1.0
        flat = deltas.double().reshape(b * c, -1)
        return (flat @ flat.T).reshape(b, c, b, c) * act[:, None, :, None]

    def functional(self):
        return F.linear
