"""The divergence check of the LiSSA recursion, shared by the Python loop
(:func:`pbrf_fast.inverses.lissa.lissa`) and the native engines
(:mod:`pbrf_fast.kernels.lissa_engine`, CPU and CUDA), so that all three stop at
the same step with the same message.

A recursion h_t = v + (I - A/sigma) h_{t-1} that converges (A PSD, below 2 sigma)
keeps ||h_t|| <= min(t + 1, sigma / shift) ||v||. Past that bound, or non-finite,
it is diverging: real divergence overshoots geometrically, so a small slack
(folded into ``limits``) absorbs rounding without missing it.
"""
from __future__ import annotations

import torch

from .errors import DivergenceError

__all__ = ["check_lissa_step"]


def check_lissa_step(norms: torch.Tensor, nonfinite: bool, limits: torch.Tensor, bound: float, step: int,
                     repeat: int, scale: float, damping: float) -> None:
    """Raise :class:`DivergenceError` if any column's iterate left its bound.

    ``norms``: ||h_k|| per column (float64); ``limits``: ||v_k|| * slack per column;
    ``bound``: min(step + 2, scale / shift), the growth a convergent recursion allows;
    ``nonfinite``: whether the update produced a NaN or Inf anywhere.
    """
    limit = limits * bound + 1e-30
    bad = torch.nonzero(~torch.isfinite(norms) | (norms > limit)).reshape(-1)
    if len(bad) == 0 and not nonfinite:
        return
    j = int(bad[0]) if len(bad) else 0
    raise DivergenceError(
        f"LiSSA diverged in column {j} at step {step} of repeat {repeat}: ||h|| = "
        f"{float(norms[j]):.3g} exceeds {float(limit[j]):.3g}, the most a convergent "
        f"recursion reaches. The scale {scale:.4g} is too small for the mini-batch "
        f"curvature: use scale='auto', a larger scale, a larger batch_size, or more damping "
        f"(now {damping})."
    )
