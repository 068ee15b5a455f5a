"""Fused kernels with a pure-torch reference and cpu / cuda / triton backends.

Each op lives in its own module (reference = spec, wrappers, triton kernel);
:mod:`.registry` picks the backend. See pbrf_fast.backends() for what is
available on this machine.
"""
from .registry import BackendUnavailable, cuda_emulation, resolve
from .output_hessian import output_hessian_product, output_hessian_product_reference
from .bregman_divergence import bregman_divergence, bregman_divergence_reference
from .lissa_update import lissa_update_, lissa_update_reference_
# (the op score_contraction itself stays at pbrf_fast.kernels.score_contraction.score_contraction:
# exporting it here would shadow its module)
from .score_contraction import (conv2d_score_contraction, conv2d_weight_gradient_blocks,
                                score_contraction_lowrank, score_contraction_reference)
from .mlp_gnh import (mlp_gnh_product, mlp_gnh_product_blas, mlp_gnh_product_matmul,
                      mlp_gnh_product_reference, parse_mlp)
from .lissa_engine import lissa_engine_reference, mlp_lissa

__all__ = [
    "BackendUnavailable",
    "bregman_divergence",
    "bregman_divergence_reference",
    "conv2d_score_contraction",
    "cuda_emulation",
    "conv2d_weight_gradient_blocks",
    "lissa_engine_reference",
    "lissa_update_",
    "lissa_update_reference_",
    "mlp_gnh_product",
    "mlp_gnh_product_blas",
    "mlp_gnh_product_matmul",
    "mlp_gnh_product_reference",
    "mlp_lissa",
    "output_hessian_product",
    "output_hessian_product_reference",
    "parse_mlp",
    "resolve",
    "score_contraction_lowrank",
    "score_contraction_reference",
]
