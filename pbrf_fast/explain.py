"""What runs, and why: every op's plan for one model and batch, without running it.

``pbrf_fast.explain(model, loss, inputs)`` asks each op's planning function the
question its caller would ask for this model: the GNH product of
``GaussNewton.matvec`` (:meth:`GaussNewton.plan_product`: a fused MLP kernel, the
layer-wise product of a conv net, or torch.func), the LiSSA recursion
(:func:`pbrf_fast.inverses.plan_lissa`), the fused LiSSA update, the
output-Hessian product and Bregman divergence on the model's outputs, and the
score contraction of every layer whose adapter has one (Linear, Conv2d: the
scale pipeline's hooks). ``pbrf-fast backends --explain`` prints the same.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .curvatures import GaussNewton
from .kernels import Plan, plan_bregman_divergence, plan_lissa_update, plan_output_hessian_product
from .layers import adapter_for
from .layers.base import zeros
from .losses import get_loss
from .problem import Problem
from .inverses import plan_lissa
from .errors import InputError

__all__ = ["explain", "format_plans"]


def _placeholder_targets(loss, outputs: torch.Tensor) -> torch.Tensor:
    """Targets of the right kind for the loss; their values never enter a plan."""
    if loss.kernel_kind == "cross_entropy":
        return torch.zeros(len(outputs), dtype=torch.long, device=outputs.device)
    return torch.zeros_like(outputs)


def _layer_shapes(model: nn.Module, inputs: torch.Tensor) -> list:
    """(name, adapter, input shape, output shape) of every weight-matrix layer in one forward pass."""
    seen, handles = [], []
    for name, module in model.named_modules():
        adapter, _ = adapter_for(module)
        if adapter is not None and adapter.kronecker:
            def hook(mod, args, out, name=name, adapter=adapter):
                seen.append((name, adapter, args[0].shape, out.shape))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _layer_plan(name, adapter, in_shape, out_shape, columns, like, backend) -> Plan:
    plan = adapter.plan_scores(in_shape, out_shape, columns, like, backend)
    return dataclasses.replace(plan, op=f"{plan.op} [{name}]")


def explain(model: nn.Module, loss, inputs: torch.Tensor, *, columns: int = 1, backend: str = "auto",
            lissa_batch_size: int = 128) -> list[Plan]:
    """The plan of every op pbrf_fast would run for ``model`` on the batch ``inputs``.

    ``columns``: vectors per GNH product (test points solved together); ``backend``:
    what the user would pass (``GaussNewton(backend=...)``, ``backend=`` of the ops).
    Nothing is computed but one forward pass (to learn the layer shapes).
    """
    if not isinstance(columns, int) or columns < 1:
        raise InputError(f"columns must be a positive integer, got {columns!r}")
    loss = get_loss(loss)
    with torch.no_grad():
        outputs = model(inputs)
    outputs2 = outputs.reshape(len(outputs), -1)
    problem = Problem(model, loss, inputs, _placeholder_targets(loss, outputs2))
    op = GaussNewton(problem, 1e-3, backend=backend if backend in ("auto", "torch", "cpu", "cuda") else "auto")
    like = problem.theta
    V = zeros((problem.dim, columns), like)
    plans = [op.plan_product(inputs, V), plan_lissa(op, V, batch_size=lissa_batch_size),
             plan_lissa_update(V, backend),
             plan_output_hessian_product(outputs2, zeros((columns, *outputs2.shape), outputs2), backend),
             plan_bregman_divergence(outputs2, outputs2, backend)]
    plans += [_layer_plan(*shapes, columns, like, backend) for shapes in _layer_shapes(model, inputs)]
    return plans


def format_plans(plans: list[Plan]) -> str:
    """The plans as an aligned text table (op, implementation, backend, reason)."""
    rows = [("op", "runs", "backend", "why")] + [(p.op, p.implementation, p.backend, p.reason) for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)
