"""Fused kernels with a pure-torch reference and cpu / cuda / triton backends.

Each op lives in its own module (reference = spec, wrappers, triton kernel);
:mod:`.registry` picks the backend. See pbrf_fast.backends() for what is
available on this machine.
"""
from .registry import BackendUnavailable, resolve
from .output_hessian import output_hessian_product, output_hessian_product_reference
from .bregman_divergence import bregman_divergence, bregman_divergence_reference
from .lissa_update import lissa_update_, lissa_update_reference_

__all__ = [
    "BackendUnavailable",
    "bregman_divergence",
    "bregman_divergence_reference",
    "lissa_update_",
    "lissa_update_reference_",
    "output_hessian_product",
    "output_hessian_product_reference",
    "resolve",
]
