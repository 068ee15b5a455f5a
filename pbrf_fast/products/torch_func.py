"""The GNH product of any model: jvp -> output-Hessian product -> vjp, vmapped over the columns."""
from __future__ import annotations

import torch


def torch_func_gnh_product(problem, output_hessian, theta, x, targets, V) -> torch.Tensor:
    """sum over the batch x of J_i^T H_i J_i V for V (d, m), as (d, m). ``output_hessian(y, t, u)``:
    the loss's output-Hessian product."""

    def outputs(th):
        return problem.forward(th, x)

    def tangent(v):
        return torch.func.jvp(outputs, (theta,), (v,))[1]

    with torch.enable_grad():
        y, pullback = torch.func.vjp(outputs, theta)
        JV = torch.func.vmap(tangent)(V.T)                         # (m, b, C)
        HJV = output_hessian(y.detach(), targets, JV.detach())     # (m, b, C)
        (JtHJV,) = torch.func.vmap(pullback)(HJV)                   # (m, d)
    return JtHJV.detach().T
