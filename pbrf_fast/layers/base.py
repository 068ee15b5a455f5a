"""The interface every layer adapter implements, and the parts that hold for every layer type.

Shapes used throughout: ``inputs`` is the layer's input for a batch, (b, *in_shape);
``grads`` are gradients with respect to the layer's output for C output vectors per example,
(b, C, *out_shape) ("Jacobian rows" when C is the number of model outputs, per-example loss
gradients when C = 1). Parameter blocks are flat in each role's own row-major order, the
layout of the Problem's flat theta.
"""
from __future__ import annotations

import torch
from torch import nn


class LayerAdapter:
    """How one module's parameters relate to its inputs and output gradients."""

    kind = ""                      # short name used in plans and reasons ("linear", "conv2d", ...)
    module_types: tuple = ()       # the nn.Module classes this adapter serves (exact types)
    roles = ("weight", "bias")
    # whether the parameters read as one (out, in') matrix W with y = W a per token, the bias a
    # last input coordinate equal to one: what K-FAC, score contraction and the stacked tangents use
    kronecker = False
    # whether jacobian_gram (J J^T blocks straight from inputs and output gradients) is available
    supports_jacobian_gram = False

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str:
        """Why this module's parameters cannot be handled from its inputs and output gradients
        ('' if they can)."""
        return ""

    def batch_coupling_reason(self) -> str:
        """Why the layer's output for one example depends on others in the batch now ('' if
        it does not): per-example methods need examples to be independent."""
        return ""

    def has(self, role: str) -> bool:
        return getattr(self.module, role, None) is not None

    # ------------------------------------------------------------ weight-matrix layers
    @property
    def out_features(self) -> int:
        """Rows of the weight matrix."""
        return self.module.weight.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the weight matrix without the bias (inputs times kernel positions)."""
        return self.module.weight[0].numel()

    def input_tokens(self, inputs: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """The input as (b, T, in), one token per output position; with ``bias`` a last
        coordinate equal to one is appended (b, T, in + 1)."""
        tokens = self._tokens(inputs)
        if bias:
            tokens = torch.cat([tokens, tokens.new_ones(*tokens.shape[:2], 1)], 2)
        return tokens

    def _tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not a weight-matrix layer")

    def output_tokens(self, grads: torch.Tensor, lead: tuple) -> torch.Tensor:
        """Output gradients (*lead, *out_shape) as (*lead, T, out), tokens matching input_tokens."""
        raise NotImplementedError(f"{type(self).__name__} is not a weight-matrix layer")

    # ----------------------------------------------------------------- per example
    def jacobian_rows(self, inputs: torch.Tensor, grads: torch.Tensor, roles) -> dict:
        """role -> (b, C, numel): per example and output vector, the gradient of that vector's
        dot product with the layer output with respect to the role's parameters."""
        raise NotImplementedError

    def per_example_gradients(self, inputs: torch.Tensor, grads: torch.Tensor, roles) -> dict:
        """role -> (b, numel) for output gradients (b, *out_shape) (C = 1)."""
        rows = self.jacobian_rows(inputs, grads.unsqueeze(1), roles)
        return {role: block[:, 0] for role, block in rows.items()}

    def scores(self, inputs, grads, vectors: dict, backend: str = "auto") -> torch.Tensor:
        """(b, m): each example's parameter gradient (grads (b, *out_shape)) dotted with m
        vectors given per role as (numel, m) blocks."""
        parts = self.per_example_gradients(inputs, grads, tuple(vectors))
        return sum(parts[role] @ block for role, block in vectors.items())

    def gradient_norms_squared(self, inputs, grads, roles, chunk: int = 64) -> torch.Tensor:
        """(b,) float64: each example's squared gradient norm over ``roles``."""
        parts = self.per_example_gradients(inputs, grads, roles)
        return sum(part.double().pow(2).sum(1) for part in parts.values())

    def plan_scores(self, in_shape, out_shape, columns: int, like: torch.Tensor, backend: str):
        """The score-contraction op's plan for this layer's shapes, or None (no such op)."""
        return None

    # ------------------------------------------------------------ layer-wise product
    def functional(self):
        """The layer as one torch function ``(inputs, weight, bias) -> output`` with its geometry
        (stride, padding, ...) bound, so that calling it runs no Python of this package: the
        layer-wise product binds it once per layer when it parses the model and calls it per
        step. For a weight-matrix layer it is linear in the inputs at fixed parameters (the
        input tangent is ``f(t, W, None)``) and, the weight's rows being output channels, m
        parameter directions stacked as m x out rows (``dW.flatten(0, 1)``, ``db.flatten()``)
        give the m tangents stacked as m x out output channels."""
        raise NotImplementedError(f"{type(self).__name__} has no layer-wise functional form")


def zeros(shape, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` that costs no memory: plans read shapes, dtypes and devices."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(*shape)
