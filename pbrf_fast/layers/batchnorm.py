"""nn.BatchNorm1d / 2d with running statistics: per channel y = gamma x_hat + beta, where
x_hat = (a - running_mean) / sqrt(running_var + eps) is fixed once the statistics are (eval mode)."""
from __future__ import annotations

import torch
from torch import nn

from .base import LayerAdapter
from .conv2d import _position_sums


class BatchNormAdapter(LayerAdapter):
    kind = "batchnorm"
    module_types = (nn.BatchNorm1d, nn.BatchNorm2d)

    @classmethod
    def unsupported_reason(cls, module):
        if not module.track_running_stats or module.running_mean is None:
            return f"{type(module).__name__} without running statistics normalises by batch statistics"
        return ""

    def batch_coupling_reason(self):
        if self.module.training:
            return f"{type(self.module).__name__} in training mode normalises by batch statistics (examples interact)"
        return ""

    def inverse_std(self, dtype: torch.dtype) -> torch.Tensor:
        """1 / sqrt(running_var + eps) per channel."""
        return torch.rsqrt(self.module.running_var + self.module.eps).to(dtype)

    def normalized(self, inputs: torch.Tensor) -> torch.Tensor:
        """x_hat, the input normalised by the running statistics: the gradient of the output
        with respect to gamma, channel by channel."""
        m = self.module
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        return (inputs - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)

    def jacobian_rows(self, inputs, grads, roles):
        rows = {}
        if "weight" in roles:
            rows["weight"] = _position_sums(grads * self.normalized(inputs).unsqueeze(1))
        if "bias" in roles:
            rows["bias"] = _position_sums(grads)
        return rows
