"""Fused kernels with a pure-torch reference and cpu / cuda / triton backends.

Each op lives in its own module: the reference (the spec), the wrapper that runs
it, the Triton kernel, and one ``plan_<op>`` function that says which
implementation a call runs and why (a :class:`Plan`). :mod:`.registry` holds the
backend rule they share. ``pbrf_fast.explain`` plans every op for a model;
``pbrf_fast.backends()`` says what is available on this machine.
"""
from .registry import BackendUnavailable, Plan, plan_backend
from .output_hessian import (output_hessian_product, output_hessian_product_reference,
                             plan_output_hessian_product)
from .bregman_divergence import bregman_divergence, bregman_divergence_reference, plan_bregman_divergence
from .lissa_update import lissa_update_, lissa_update_reference_, plan_lissa_update
# (the op score_contraction itself stays at pbrf_fast.kernels.score_contraction.score_contraction:
# exporting it here would shadow its module)
from .score_contraction import (conv2d_score_contraction, conv2d_weight_gradient_blocks,
                                plan_conv2d_score_contraction, plan_score_contraction,
                                score_contraction_lowrank, score_contraction_reference)
from .mlp_gnh import mlp_gnh_product, mlp_gnh_product_reference, plan_mlp_gnh_product
from .lissa_engine import lissa_engine_reference, mlp_lissa, plan_lissa_engine

__all__ = [
    "BackendUnavailable",
    "Plan",
    "bregman_divergence",
    "bregman_divergence_reference",
    "conv2d_score_contraction",
    "conv2d_weight_gradient_blocks",
    "lissa_engine_reference",
    "lissa_update_",
    "lissa_update_reference_",
    "mlp_gnh_product",
    "mlp_gnh_product_reference",
    "mlp_lissa",
    "output_hessian_product",
    "output_hessian_product_reference",
    "plan_backend",
    "plan_bregman_divergence",
    "plan_conv2d_score_contraction",
    "plan_lissa_engine",
    "plan_lissa_update",
    "plan_mlp_gnh_product",
    "plan_output_hessian_product",
    "plan_score_contraction",
    "score_contraction_lowrank",
    "score_contraction_reference",
]
