"""Native stochastic LiSSA (Eq. 52) for MLP models: the whole recursion in one call.

For each repeat r and step t, with the batch schedule[r, t] (drawn in Python by
``inverses.lissa.lissa_batches``, so a seed gives the same batches as the Python loop):

    gh = 1/|B| sum_{i in B} J_i^T H_i J_i h + weight_decay h
    h <- v + (1 - damping/scale) h - gh / scale

with the divergence check of :func:`pbrf_fast.lissa_divergence.check_lissa_step`: ||h_k|| must stay
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

from ..errors import InputError, InputIndexError
from ..lissa_divergence import check_lissa_step
from . import registry
from .mlp_gnh import MlpSpec, fused_pays_off, mlp_gnh_product_reference

OP_NAME = "mlp_lissa"
# Memory for the forward passes the engine keeps over a solve (all training inputs' layer
# activations when they fit): the engine's own budget, the same size as the GNH operator's
# kept forward states (pbrf_fast.products.FORWARD_CACHE_BYTES), which it never holds at
# the same time.
ENGINE_CACHE_BYTES = 512 << 20


def _check(spec, loss_kind, theta, inputs, V, schedule, weight_decay, damping, scale, limits):
    registry.loss_kind_code(loss_kind)
    registry.check_same_dtype_and_device(OP_NAME, theta=theta, inputs=inputs, V=V)
    if V.dim() != 2 or V.shape[0] != spec.num_params or theta.shape != (spec.num_params,):
        raise InputError(f"{OP_NAME}: need theta ({spec.num_params},) and V ({spec.num_params}, m)")
    if inputs.dim() < 2 or inputs[0].numel() != spec.dims[0]:
        raise InputError(f"{OP_NAME}: inputs must have {spec.dims[0]} features per example")
    if schedule.dim() != 3 or schedule.dtype != torch.int64 or schedule.numel() == 0:
        raise InputError(f"{OP_NAME}: schedule must be a non-empty int64 (repeats, depth, batch) tensor")
    if int(schedule.min()) < 0 or int(schedule.max()) >= len(inputs):
        raise InputIndexError(f"{OP_NAME}: schedule indexes outside the {len(inputs)} inputs")
    if limits.shape != (V.shape[1],):
        raise InputError(f"{OP_NAME}: limits must have shape ({V.shape[1]},)")
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(damping) and weight_decay >= 0):
        raise InputError(f"{OP_NAME}: need a positive finite scale, finite damping, weight_decay >= 0")


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
                check_lissa_step(norms, nonfinite, limits, min(t + 2, ceiling), t, r, scale, damping)
        total += h
    return total


LISSA_ENGINES = ("auto", "native", "python")


def plan_lissa_engine(mlp: tuple[MlpSpec | None, str], inputs: torch.Tensor, vectors: torch.Tensor,
                      batch_size: int, *, engine: str = "auto", backend: str = "auto") -> registry.Plan:
    """Where ``solve(..., method="lissa")`` runs its recursion, and why.

    ``native`` (backend cpu or cuda): the whole seeded recursion inside the extension
    (:func:`mlp_lissa`), no Python per step; ``python``: the loop in
    :func:`pbrf_fast.inverses.lissa.lissa`, one operator product and one fused update per step.
    Same seed, same batches, same answer.

    ``mlp``: the operator's ``(MlpSpec, "")``, or ``(None, why not)`` (not a GNH of a
    supported MLP); ``backend``: the operator's backend (its compiled backend pins the
    engine's; "torch" means the Python loop). ``engine="native"`` raises
    BackendUnavailable when the native engine cannot run.
    """
    if engine not in LISSA_ENGINES:
        raise InputError(f"unknown LiSSA engine {engine!r}; choose one of {LISSA_ENGINES}")
    if engine == "python":
        return registry.Plan(OP_NAME, "python", "torch", "engine='python' requested")
    spec, reason = mlp
    columns = vectors.shape[1] if vectors.dim() == 2 else 1
    if backend == "torch":
        reason = "the operator was built with backend='torch'"
    elif spec is not None and (inputs.dim() < 2 or not inputs.is_floating_point()):
        reason = "the training inputs are not a float (n, features) tensor"
    elif spec is not None and engine == "auto" and not fused_pays_off(spec, batch_size, columns):
        return registry.Plan(OP_NAME, "python", "torch",
                             f"batch {batch_size} x {columns} column(s) x {spec.num_params} parameters: "
                             "products this big run faster on torch's BLAS than in the engine")
    if not reason:
        # An operator built for one compiled backend runs its engine there too.
        requested = backend if backend in ("cpu", "cuda") else "auto"
        try:
            kernel = registry.plan_backend(OP_NAME, vectors.dtype, vectors.device, requested)
        except registry.BackendUnavailable as exc:
            kernel, reason = None, str(exc)
        if kernel is not None and kernel.backend != "torch":
            why = (f"the recursion of a {len(spec.dims) - 1}-layer MLP in the {kernel.backend} extension, "
                   "no Python per step")
            return registry.Plan(OP_NAME, "native", kernel.backend, why)
        reason = reason or f"no compiled LiSSA engine for {vectors.device.type} {vectors.dtype} tensors"
    if engine == "native":
        raise registry.BackendUnavailable(f"native LiSSA engine unavailable: {reason}")
    return registry.Plan(OP_NAME, "python", "torch", reason)


def mlp_lissa(spec: MlpSpec, loss_kind: str, theta: torch.Tensor, inputs: torch.Tensor,
              V: torch.Tensor, schedule: torch.Tensor, *, weight_decay: float, damping: float,
              scale: float, limits: torch.Tensor, ceiling: float, check_every: int = 1,
              backend: str = "auto") -> torch.Tensor:
    """Sum over repeats of the final LiSSA iterate, (d, m); raises DivergenceError."""
    scale, damping, weight_decay = float(scale), float(damping), float(weight_decay)
    limits = limits.to(dtype=torch.float64, device="cpu")
    _check(spec, loss_kind, theta, inputs, V, schedule, weight_decay, damping, scale, limits)
    if check_every < 1:
        raise InputError(f"{OP_NAME}: check_every must be >= 1")
    chosen = registry.plan_backend(OP_NAME, theta.dtype, theta.device, backend).backend
    if chosen == "torch":
        return lissa_engine_reference(spec, loss_kind, theta, inputs, V, schedule,
                                      weight_decay=weight_decay, damping=damping, scale=scale,
                                      limits=limits, ceiling=ceiling, check_every=check_every)
    return registry.implementation(OP_NAME, chosen)(
        spec, registry.loss_kind_code(loss_kind), theta.contiguous(),
        inputs.reshape(len(inputs), -1).contiguous(), V, schedule.contiguous(), weight_decay,
        damping, scale, limits.contiguous(), float(ceiling), int(check_every))


def _recursion_fields(spec, code, theta, inputs, v, schedule, weight_decay, damping, scale, limits, ceiling,
                      check_every, total, failure) -> dict:
    """The fields of MlpLissaArgs both backends share: the MLP, the data, the schedule,
    the recursion's coefficients and the divergence bounds."""
    dims, acts, bias = spec.kernel_args()
    repeats, depth, batch = schedule.shape
    return dict(dtype=registry.dtype_name(theta), dims=dims, activations=acts, has_bias=bias, loss_kind=code,
                inputs=inputs.data_ptr(), num_examples=len(inputs), theta=theta.data_ptr(), v=v.data_ptr(),
                num_vectors=v.shape[0], schedule=schedule.data_ptr(), repeats=repeats, depth=depth,
                batch=batch, weight_decay=weight_decay, damping=damping, scale=scale,
                limits=limits.data_ptr(), ceiling=ceiling if math.isfinite(ceiling) else math.inf,
                check_every=check_every, total=total.data_ptr(), failure_norms=failure.data_ptr())


def _check_outcome(outcome, failure, limits, ceiling, scale, damping) -> None:
    """A native engine's stop, through the same divergence check as the Python loop."""
    if outcome.diverged:
        check_lissa_step(failure, outcome.nonfinite, limits, min(outcome.step + 2, ceiling),
                         outcome.step, outcome.repeat, scale, damping)


def _run_cpu(spec, code, theta, inputs, V, schedule, weight_decay, damping, scale, limits,
             ceiling, check_every):
    v = V.T.contiguous()                                    # (m, d): one vector per row
    total = torch.empty_like(v)
    failure = torch.zeros(V.shape[1], dtype=torch.float64)
    ext = registry.cpu_extension
    outcome = ext.mlp_lissa(registry.extension_args(
        ext.MlpLissaArgs, **_recursion_fields(spec, code, theta, inputs, v, schedule, weight_decay, damping,
                                              scale, limits, ceiling, check_every, total, failure),
        cache_budget_bytes=ENGINE_CACHE_BYTES, threads=torch.get_num_threads()))
    _check_outcome(outcome, failure, limits, ceiling, scale, damping)
    return total.T


def _run_cuda(spec, code, theta, inputs, V, schedule, weight_decay, damping, scale, limits,
              ceiling, check_every):
    ext = registry.cuda_extension
    dims, acts, bias = spec.kernel_args()
    m = V.shape[1]
    v = V.T.contiguous()                                    # (m, d): one vector per row
    total = registry.cuda_scratch(v.shape, v)
    batch = schedule.shape[2]
    elements = 2 * m * spec.num_params + batch * dims[0] + ext.mlp_gnh_workspace_elements(dims, batch, m)
    workspace = registry.cuda_scratch(elements, theta)
    norms = torch.zeros(m, dtype=torch.float64, device=theta.device)
    flag = torch.zeros(1, dtype=torch.int32, device=theta.device)
    schedule = schedule.to(theta.device).contiguous()
    failure = torch.zeros(m, dtype=torch.float64)
    device, stream = registry.cuda_launch_args(theta)
    outcome = ext.mlp_lissa(registry.extension_args(
        ext.MlpLissaArgs, **_recursion_fields(spec, code, theta, inputs, v, schedule, weight_decay, damping,
                                              scale, limits, ceiling, check_every, total, failure),
        workspace=workspace.data_ptr(), workspace_elements=elements, norms=norms.data_ptr(),
        flag=flag.data_ptr(), device=device, stream=stream))
    _check_outcome(outcome, failure, limits, ceiling, scale, damping)
    return total.T


registry.register(OP_NAME, "torch", lissa_engine_reference)
if registry.cpu_extension is not None and hasattr(registry.cpu_extension, "mlp_lissa"):
    registry.register(OP_NAME, "cpu", _run_cpu)
registry.register(OP_NAME, "cuda", _run_cuda)
