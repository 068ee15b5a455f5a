"""Native stochastic LiSSA (Eq. 52) for MLP models: the whole recursion in one call.

For each repeat r and step t, with the batch schedule[r, t] (drawn in Python by
``solvers.lissa_batches``, so a seed gives the same batches as the Python loop):

    gh = 1/|B| sum_{i in B} J_i^T H_i J_i h + weight_decay h
    h <- v + (1 - damping/scale) h - gh / scale

with the divergence check of ``solvers._check_lissa_step``: ||h_k|| must stay
below min(t + 2, scale / (weight_decay + damping)) * ||v_k|| * slack (and finite).
Returns sum over repeats of h_depth, shape (d, m); the caller divides by
repeats * scale. :func:`lissa_engine_reference` is the spec (a torch loop over
:func:`~pbrf_fast.kernels.mlp_gnh.mlp_gnh_product_reference`); the cpu backend
runs everything inside ``pbrf_fast._C`` with no Python per step, the cuda
backend inside ``pbrf_fast._C_cuda`` (one C++ loop of launches on the current
stream; it reads m + 1 numbers back per step for the divergence check).
"""
from __future__ import annotations

import math

import torch

from ..errors import DivergenceError
from . import registry
from .mlp_gnh import MlpSpec, mlp_gnh_product_reference

OP_NAME = "mlp_lissa"
# Cache the forward pass of all n training inputs when it fits in this many bytes.
FORWARD_CACHE_BYTES = 1 << 30


def divergence_message(column: int, step: int, repeat: int, norm: float, limit: float, scale: float,
                       damping: float) -> str:
    """The message of solvers._check_lissa_step, word for word."""
    return (f"LiSSA diverged in column {column} at step {step} of repeat {repeat}: ||h|| = "
            f"{norm:.3g} exceeds {limit:.3g}, the most a convergent "
            f"recursion reaches. The scale {scale:.4g} is too small for the mini-batch "
            f"curvature: use scale='auto', a larger scale, a larger batch_size, or more damping "
            f"(now {damping}).")


def _raise_divergence(norms: torch.Tensor, nonfinite: bool, limits: torch.Tensor, bound: float,
                      step: int, repeat: int, scale: float, damping: float) -> None:
    limit = limits * bound + 1e-30
    bad = torch.nonzero(~torch.isfinite(norms) | (norms > limit)).reshape(-1)
    j = int(bad[0]) if len(bad) else 0
    if len(bad) or nonfinite:
        raise DivergenceError(divergence_message(j, step, repeat, float(norms[j]), float(limit[j]),
                                                 scale, damping))


def _check(spec, loss_kind, theta, inputs, V, schedule, weight_decay, damping, scale, limits):
    registry.loss_kind_code(loss_kind)
    registry.check_same_dtype_and_device(OP_NAME, theta=theta, inputs=inputs, V=V)
    if V.dim() != 2 or V.shape[0] != spec.num_params or theta.shape != (spec.num_params,):
        raise ValueError(f"{OP_NAME}: need theta ({spec.num_params},) and V ({spec.num_params}, m)")
    if inputs.dim() < 2 or inputs[0].numel() != spec.dims[0]:
        raise ValueError(f"{OP_NAME}: inputs must have {spec.dims[0]} features per example")
    if schedule.dim() != 3 or schedule.dtype != torch.int64 or schedule.numel() == 0:
        raise ValueError(f"{OP_NAME}: schedule must be a non-empty int64 (repeats, depth, batch) tensor")
    if int(schedule.min()) < 0 or int(schedule.max()) >= len(inputs):
        raise IndexError(f"{OP_NAME}: schedule indexes outside the {len(inputs)} inputs")
    if limits.shape != (V.shape[1],):
        raise ValueError(f"{OP_NAME}: limits must have shape ({V.shape[1]},)")
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(damping) and weight_decay >= 0):
        raise ValueError(f"{OP_NAME}: need a positive finite scale, finite damping, weight_decay >= 0")


def lissa_engine_reference(spec: MlpSpec, loss_kind: str, theta, inputs, V, schedule, *,
                           weight_decay: float, damping: float, scale: float, limits, ceiling: float,
                           check_every: int = 1) -> torch.Tensor:
    """The recursion as a plain torch loop (the spec). limits: ||v_k|| * slack, float64 (m,)."""
    total = torch.zeros_like(V)
    for r in range(schedule.shape[0]):
        h = V.clone()
        for t in range(schedule.shape[1]):
            idx = schedule[r, t].to(inputs.device)
            S = mlp_gnh_product_reference(spec, loss_kind, theta, inputs[idx], h)
            gh = S / len(idx) + weight_decay * h
            h = V + (1 - damping / scale) * h - gh / scale
            nonfinite = not bool(torch.isfinite(h).all())
            if nonfinite or (t + 1) % check_every == 0:
                norms = torch.linalg.vector_norm(h, dim=0, dtype=torch.float64).cpu()
                _raise_divergence(norms, nonfinite, limits, min(t + 2, ceiling), t, r, scale, damping)
        total += h
    return total


def mlp_lissa(spec: MlpSpec, loss_kind: str, theta: torch.Tensor, inputs: torch.Tensor,
              V: torch.Tensor, schedule: torch.Tensor, *, weight_decay: float, damping: float,
              scale: float, limits: torch.Tensor, ceiling: float, check_every: int = 1,
              backend: str = "auto") -> torch.Tensor:
    """Sum over repeats of the final LiSSA iterate, (d, m); raises DivergenceError."""
    scale, damping, weight_decay = float(scale), float(damping), float(weight_decay)
    limits = limits.to(dtype=torch.float64, device="cpu")
    _check(spec, loss_kind, theta, inputs, V, schedule, weight_decay, damping, scale, limits)
    if check_every < 1:
        raise ValueError(f"{OP_NAME}: check_every must be >= 1")
    chosen = registry.resolve(OP_NAME, theta, backend)
    if chosen == "torch":
        return lissa_engine_reference(spec, loss_kind, theta, inputs, V, schedule,
                                      weight_decay=weight_decay, damping=damping, scale=scale,
                                      limits=limits, ceiling=ceiling, check_every=check_every)
    return registry.implementation(OP_NAME, chosen)(
        spec, registry.loss_kind_code(loss_kind), theta.contiguous(),
        inputs.reshape(len(inputs), -1).contiguous(), V, schedule.contiguous(), weight_decay,
        damping, scale, limits.contiguous(), float(ceiling), int(check_every))


def _run_cpu(spec, code, theta, inputs, V, schedule, weight_decay, damping, scale, limits,
             ceiling, check_every):
    dims, acts, bias = spec.kernel_args()
    m = V.shape[1]
    v = V.T.contiguous()                                    # (m, d): one vector per row
    total = torch.empty_like(v)
    failure = torch.zeros(m, dtype=torch.float64)
    repeats, depth, batch = schedule.shape
    ext = registry.cpu_extension
    outcome = ext.mlp_lissa(registry.extension_args(
        ext.MlpLissaArgs, dtype=registry.dtype_name(theta), dims=dims, activations=acts,
        has_bias=bias, loss_kind=code, inputs=inputs.data_ptr(), num_examples=len(inputs),
        theta=theta.data_ptr(), v=v.data_ptr(), num_vectors=m, schedule=schedule.data_ptr(),
        repeats=repeats, depth=depth, batch=batch, weight_decay=weight_decay, damping=damping,
        scale=scale, limits=limits.data_ptr(), ceiling=ceiling if math.isfinite(ceiling) else math.inf,
        check_every=check_every, total=total.data_ptr(), failure_norms=failure.data_ptr(),
        cache_budget_bytes=FORWARD_CACHE_BYTES, threads=torch.get_num_threads()))
    if outcome.diverged:
        _raise_divergence(failure, outcome.nonfinite, limits, min(outcome.step + 2, ceiling),
                          outcome.step, outcome.repeat, scale, damping)
    return total.T


def _run_cuda(spec, code, theta, inputs, V, schedule, weight_decay, damping, scale, limits,
              ceiling, check_every):
    ext = registry.cuda_extension
    dims, acts, bias = spec.kernel_args()
    m = V.shape[1]
    v = V.T.contiguous()                                    # (m, d): one vector per row
    total = registry.cuda_scratch(v.shape, v)
    repeats, depth, batch = schedule.shape
    elements = 2 * m * spec.num_params + batch * dims[0] + ext.mlp_gnh_workspace_elements(dims, batch, m)
    workspace = registry.cuda_scratch(elements, theta)
    norms = torch.zeros(m, dtype=torch.float64, device=theta.device)
    flag = torch.zeros(1, dtype=torch.int32, device=theta.device)
    schedule = schedule.to(theta.device).contiguous()
    failure = torch.zeros(m, dtype=torch.float64)
    device, stream = registry.cuda_launch_args(theta)
    outcome = ext.mlp_lissa(registry.extension_args(
        ext.MlpLissaArgs, dtype=registry.dtype_name(theta), dims=dims, activations=acts,
        has_bias=bias, loss_kind=code, inputs=inputs.data_ptr(), num_examples=len(inputs),
        theta=theta.data_ptr(), v=v.data_ptr(), num_vectors=m, schedule=schedule.data_ptr(),
        repeats=repeats, depth=depth, batch=batch, weight_decay=weight_decay, damping=damping,
        scale=scale, limits=limits.data_ptr(), ceiling=ceiling if math.isfinite(ceiling) else math.inf,
        check_every=check_every, total=total.data_ptr(), failure_norms=failure.data_ptr(),
        workspace=workspace.data_ptr(), workspace_elements=elements, norms=norms.data_ptr(),
        flag=flag.data_ptr(), device=device, stream=stream))
    if outcome.diverged:
        _raise_divergence(failure, outcome.nonfinite, limits, min(outcome.step + 2, ceiling),
                          outcome.step, outcome.repeat, scale, damping)
    return total.T


registry.register(OP_NAME, "torch", lissa_engine_reference)
if registry.cpu_extension is not None and hasattr(registry.cpu_extension, "mlp_lissa"):
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)
