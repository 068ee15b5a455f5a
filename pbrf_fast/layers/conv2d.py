"""nn.Conv2d (groups = 1, zero padding given as numbers): y = W patches(a) + b, one token per
output position, the patches being the unfolded k x k neighbourhoods of the input."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.score_contraction import (conv2d_score_contraction, conv2d_weight_gradient_blocks,
                                         plan_conv2d_score_contraction)
from .base import LayerAdapter, zeros


class Conv2dAdapter(LayerAdapter):
    kind = "conv2d"
    module_types = (nn.Conv2d,)
    kronecker = True

    @classmethod
    def unsupported_reason(cls, module):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return (f"Conv2d with groups={module.groups}, padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r} (groups=1 and numeric zero padding are supported)")
        return ""

    def _geometry(self) -> dict:
        m = self.module
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation)

    def patches(self, inputs: torch.Tensor) -> torch.Tensor:
        """(b, C_in k k, positions): the unfolded input."""
        m = self.module
        return F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)

    def _tokens(self, inputs):
        return self.patches(inputs).transpose(1, 2)

    def output_tokens(self, grads, lead):
        return grads.reshape(*lead, self.out_features, -1).transpose(-1, -2)

    def jacobian_rows(self, inputs, grads, roles):
        b, c = grads.shape[:2]
        rows = {}
        if "weight" in roles:
            # the C outputs' deltas stacked as C x C_out channels: one (C C_out, P) @ (P, C_in k k) GEMM
            # per example, written in the rows' layout directly
            delta = grads.reshape(b, c * self.out_features, -1)
            rows["weight"] = torch.bmm(delta, self.patches(inputs).transpose(1, 2)).view(b, c, -1)
        if "bias" in roles:
            rows["bias"] = _position_sums(grads)
        return rows

    def scores(self, inputs, grads, vectors, backend="auto"):
        total = 0
        if "weight" in vectors:
            # straight from the layer input: on CPU the patches are never unfolded for the whole batch
            block = vectors["weight"]
            total = total + conv2d_score_contraction(
                inputs, grads, block.T.reshape(block.shape[1], self.out_features, -1), backend=backend,
                **self._geometry())
        if "bias" in vectors:
            total = total + grads.flatten(2).sum(2) @ vectors["bias"]
        return total

    def gradient_norms_squared(self, inputs, grads, roles, chunk=64):
        total = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
        if "weight" in roles:  # ||G||^2 = sum over kernel-offset blocks of ||G_block||^2, in transient chunks
            for k, n, _, G in conv2d_weight_gradient_blocks(inputs, grads, **self._geometry()):
                total[k:k + n] += G.double().pow(2).sum((1, 2))
        if "bias" in roles:
            total += grads.flatten(2).sum(2).double().pow(2).sum(1)
        return total

    def plan_scores(self, in_shape, out_shape, columns, like, backend):
        S = zeros((columns, self.out_features, self.in_features), like)
        return plan_conv2d_score_contraction(zeros(in_shape, like), zeros(out_shape, like), S,
                                             stride=self.module.stride, backend=backend)

    def functional(self):
        m = self.module
        # F.conv2d's own ``groups`` stays free: the product's grouped columns pass groups = m
        return functools.partial(F.conv2d, stride=m.stride, padding=m.padding, dilation=m.dilation)


def _position_sums(t: torch.Tensor) -> torch.Tensor:
    """(b, C, channels, *positions) summed over the positions: (b, C, channels). A reduction over
    the trailing dimensions, not a reshape: the output-space rows' gradients can be a (C, b) ->
    (b, C) transposed view, which a reshape would copy whole."""
    return t.sum(dim=tuple(range(3, t.dim()))) if t.dim() > 3 else t
