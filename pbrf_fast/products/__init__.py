"""The exact Gauss-Newton product sum_i J_i^T H_i J_i V: every implementation, and the one
planner that picks among them and says why.

:data:`IMPLEMENTATIONS` lists them in the order they are asked; the first whose
``applies`` accepts the batch runs. All are exact; they differ in speed.

- ``mlp-blas``: :func:`pbrf_fast.products.mlp.mlp_gnh_product_blas`, a few large GEMMs on
  torch's BLAS ("auto" from :data:`~pbrf_fast.products.mlp.BLAS_MIN_COLUMNS` columns on);
- ``mlp-matmul``: :func:`pbrf_fast.products.mlp.mlp_gnh_product_matmul`, one column at a time
  on torch's BLAS ("auto" for few columns on big layers, more than
  :data:`~pbrf_fast.kernels.mlp_gnh.AUTO_MAX_WORK` multiply-adds; or no fused kernel here);
- ``mlp-fused``: the compiled kernel :func:`pbrf_fast.kernels.mlp_gnh.mlp_gnh_product` (forward,
  tangent, output Hessian and backward in one call): "auto" for small products, or the
  explicit ``backend="cpu"`` / ``"cuda"``;
- ``layerwise``: :func:`pbrf_fast.products.layerwise.layerwise_gnh_product`, a conv net's product
  layer by layer (one kept primal pass, one tangent pass over all columns, one backward):
  "auto" for a model that is not a supported MLP but whose traced graph has only supported layers;
- ``torch.func``: jvp -> output-Hessian product -> vjp (any model torch.func can transform;
  the only one for ``backend="torch"``);
- ``torch.func-unfused``: the same with the fused attention fast paths switched off, for a model
  whose fused attention kernels have no forward-mode rule (``nn.TransformerEncoderLayer`` in
  eval mode);
- ``reverse``: :func:`pbrf_fast.autodiff.reverse_gnh_product`, reverse mode only (J v as a
  backward pass of a backward pass), for a model torch.func cannot transform at all (a custom
  ``autograd.Function`` without ``setup_context``, ``jvp`` or a vmap rule).

Which of the last three runs is probed once per model on one example
(:func:`pbrf_fast.autodiff.choose_mode`); a fallback is said in the plan's reason and in one
:class:`~pbrf_fast.errors.SlowPathWarning`.

An explicit compiled backend that cannot serve the product raises BackendUnavailable.
The forward states the MLP and layer-wise paths keep between products (a solver applies
the operator hundreds of times to the same data) stay under :data:`FORWARD_CACHE_BYTES`.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from .. import autodiff
from ..errors import SlowPathWarning
from ..kernels import mlp_gnh, registry
from ..kernels.output_hessian import bind_output_hessian_product
from . import layerwise, mlp
from .torch_func import torch_func_gnh_product

__all__ = ["FORWARD_CACHE_BYTES", "GNH_PRODUCT", "IMPLEMENTATIONS", "GnhProducts", "Implementation"]

GNH_PRODUCT = "gnh_product"
# Memory for forward states kept between products, every kind (MLP, layer-wise) together:
# at few columns the forward pass is a quarter of a product's flops.
FORWARD_CACHE_BYTES = 512 << 20


@dataclass
class _Case:
    """What a plan depends on: the operator's products, the batch and the number of columns."""

    products: "GnhProducts"
    x: torch.Tensor
    columns: int

    @property
    def backend(self) -> str:
        return self.products.backend

    @cached_property
    def mlp(self) -> tuple:
        """(MlpSpec, "") if the MLP paths serve this batch, else (None, why not)."""
        spec, reason = self.products.mlp_spec()
        theta, x = self.products.problem.theta, self.x
        if spec is not None and (x.dim() < 2 or x[0].numel() != spec.dims[0] or x.dtype != theta.dtype):
            return None, f"inputs of shape {tuple(x.shape)} and dtype {x.dtype} do not fit the MLP"
        return spec, reason

    @cached_property
    def layerwise(self) -> tuple:
        """(LayerwiseSpec, "") if the layer-wise path serves this batch, else (None, why not)."""
        network, why = self.products.layerwise_spec()
        x = self.x
        if network is not None and (tuple(x.shape[1:]) != network.input_shape
                                    or x.dtype != self.products.problem.theta.dtype):
            return None, f"inputs of shape {tuple(x.shape)} and dtype {x.dtype} do not fit the traced network"
        return network, why

    @cached_property
    def fused_kernel(self) -> registry.Plan:
        theta = self.products.problem.theta
        return registry.plan_backend(mlp_gnh.OP_NAME, theta.dtype, theta.device, self.backend)

    @property
    def work(self) -> int:
        return len(self.x) * self.columns * self.mlp[0].num_params


# ---- which implementation applies, and why: (backend or None, reason) -----------------------------

def _mlp_blas_applies(case: _Case):
    if case.backend != "auto" or case.mlp[0] is None:
        return None, "not an MLP with backend='auto'"
    if case.columns >= mlp.BLAS_MIN_COLUMNS:
        return "torch", f"{case.columns} columns >= {mlp.BLAS_MIN_COLUMNS}: a few large GEMMs beat the fused kernel"
    return None, f"{case.columns} columns < {mlp.BLAS_MIN_COLUMNS}"


def _mlp_matmul_applies(case: _Case):
    if case.backend == "torch" or case.mlp[0] is None:
        return None, "not an MLP"
    if case.backend == "auto" and not mlp_gnh.fused_pays_off(case.mlp[0], len(case.x), case.columns):
        return "torch", (f"{case.work:.3g} multiply-adds > {mlp_gnh.AUTO_MAX_WORK:.0e} with {case.columns} "
                         "column(s): per-column GEMMs on torch's BLAS beat the fused kernel's")
    if case.fused_kernel.backend == "torch":
        return "torch", f"no fused kernel here ({case.fused_kernel.reason})"
    return None, "the fused kernel runs here"


def _mlp_fused_applies(case: _Case):
    if case.backend == "torch" or case.mlp[0] is None:
        return None, "not an MLP"
    if case.backend != "auto":
        return case.fused_kernel.backend, case.fused_kernel.reason
    return case.fused_kernel.backend, (f"{case.work:.3g} multiply-adds <= {mlp_gnh.AUTO_MAX_WORK:.0e}: "
                                       "per-call overhead dominates, fusing it away pays")


def _layerwise_applies(case: _Case):
    if case.backend != "auto" or case.mlp[0] is not None:
        return None, "an MLP, or not backend='auto'"
    if case.layerwise[0] is None:
        return None, case.layerwise[1]
    return "torch", (f"not an MLP ({case.mlp[1]}); every traced layer is supported: one kept primal "
                     f"pass, one tangent pass for all {case.columns} column(s), one backward")


def _generic_reason(case: _Case) -> str:
    if case.backend == "torch":
        return "backend='torch' requested"
    return f"not a supported MLP: {case.mlp[1]}; not a layer-wise network: {case.layerwise[1]}"


def _torch_func_applies(case: _Case):
    mode, why = case.products.autodiff_mode(case.x)
    if mode != "torch.func":
        return None, why
    return "torch", _generic_reason(case)


def _unfused_applies(case: _Case):
    mode, why = case.products.autodiff_mode(case.x)
    if mode != "torch.func-unfused":
        return None, "torch.func runs as is" if mode == "torch.func" else why
    return "torch", f"{_generic_reason(case)}; {why}"


def _reverse_applies(case: _Case):
    # last in the table: every model with a backward pass has this product
    return "torch", f"{_generic_reason(case)}; {case.products.autodiff_mode(case.x)[1]}"


# ---- running the chosen one ----------------------------------------------------------------------

def _run_mlp(products, plan, V, x, t, slot):
    spec = products.mlp_spec()[0]
    theta, kind = products.problem.theta, products.problem.loss.kernel_kind
    if plan.implementation == "mlp-fused":
        # the operator has checked V, theta and x (and planned): straight to the kernel
        return mlp_gnh.fused_product(spec, registry.LOSS_KIND_CODES[kind], theta, x, V, plan.backend)
    forward = products.kept_forward("mlp", lambda: mlp_gnh.mlp_forward_reference(spec, theta, x),
                                    mlp.forward_state_bytes, x, slot)
    product = mlp.mlp_gnh_product_blas if plan.implementation == "mlp-blas" else mlp.mlp_gnh_product_matmul
    return product(spec, kind, theta, x, V, forward=forward)


def _run_layerwise(products, plan, V, x, t, slot):
    spec, theta = products.layerwise_spec()[0], products.problem.theta
    forward = products.kept_forward("layerwise", lambda: layerwise.layerwise_forward(spec, theta, x),
                                    layerwise.forward_state_bytes, x, slot)
    return layerwise.layerwise_gnh_product(spec, products.output_hessian(theta), theta, x, t, V, forward)


def _run_torch_func(products, plan, V, x, t, slot):
    theta = products.problem.theta
    return torch_func_gnh_product(products.problem, products.output_hessian(theta), theta, x, t, V)


def _run_unfused(products, plan, V, x, t, slot):
    with autodiff.unfused_attention():
        return _run_torch_func(products, plan, V, x, t, slot)


def _run_reverse(products, plan, V, x, t, slot):
    problem, theta = products.problem, products.problem.theta
    return autodiff.reverse_gnh_product(lambda th: problem.forward(th, x), products.output_hessian(theta),
                                        theta, t, V)


@dataclass(frozen=True)
class Implementation:
    name: str
    applies: Callable   # (_Case) -> (backend or None, reason)
    run: Callable       # (GnhProducts, Plan, V (d, m), x, targets, slot) -> (d, m)


IMPLEMENTATIONS = (
    Implementation("mlp-blas", _mlp_blas_applies, _run_mlp),
    Implementation("mlp-matmul", _mlp_matmul_applies, _run_mlp),
    Implementation("mlp-fused", _mlp_fused_applies, _run_mlp),
    Implementation("layerwise", _layerwise_applies, _run_layerwise),
    Implementation("torch.func", _torch_func_applies, _run_torch_func),
    Implementation("torch.func-unfused", _unfused_applies, _run_unfused),
    Implementation("reverse", _reverse_applies, _run_reverse),
)
_BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}


def _current(runtime) -> bool:
    """Whether a plan made under ``runtime`` (None: one that did not read it) still holds."""
    return runtime is None or runtime is registry.cuda_runtime()


class GnhProducts:
    """The GNH product of one Problem's model and loss: what serves it, for which batch, and
    the forward states kept for it. ``GaussNewton`` holds one and calls :meth:`product`.

    ``backend``: "auto" (the fastest exact product by size), "torch" (always torch.func) or
    "cpu" / "cuda" (the fused MLP kernel or an error). ``cache``: the operator's cache dict,
    shared with its damped copies; forward states live under its "mlp_forward" key.
    """

    def __init__(self, problem, backend: str, batch_size: int, cache: dict):
        self.problem, self.backend, self.batch_size, self.cache = problem, backend, batch_size, cache
        self._mlp = self._layerwise = self._autodiff = None
        self._plans, self._last_plan, self._output_hessians = {}, None, {}

    def mlp_spec(self) -> tuple:
        """(MlpSpec, "") if the model with this loss is an MLP the MLP paths serve, else
        (None, why not). Parsed once: the model's structure never changes."""
        if self._mlp is None:
            model, loss = self.problem.model, self.problem.loss
            spec = mlp.parse_mlp(model)
            reason = "" if spec is not None else mlp.mlp_unsupported_reason(model)
            if spec is not None and loss.kernel_kind not in registry.LOSS_KIND_CODES:
                spec, reason = None, f"loss {loss.name!r} has no compiled output-Hessian"
            self._mlp = (spec, reason)
        return self._mlp

    def layerwise_spec(self) -> tuple:
        """(LayerwiseSpec, "") if the layer-wise product serves the model exactly, else
        (None, why not). Traced once, on the first plan that asks."""
        if self._layerwise is None:
            self._layerwise = layerwise.parse_layerwise(self.problem)
        return self._layerwise

    def autodiff_mode(self, x: torch.Tensor) -> tuple[str, str]:
        """(mode, why) of :func:`pbrf_fast.autodiff.choose_mode` for this model's torch.func
        product, probed once on the first example of ``x`` with two columns (the model's
        structure decides it, not the batch). A fallback is warned about once."""
        if self._autodiff is None:
            problem = self.problem
            theta = problem.theta
            x1 = x[:1]
            V = torch.zeros(theta.numel(), 2, dtype=theta.dtype, device=theta.device)
            identity = lambda y, t, u: u  # noqa: E731 - the probe needs no loss, only the transforms
            self._autodiff = autodiff.choose_mode(
                lambda: torch_func_gnh_product(problem, identity, theta, x1, None, V),
                lambda: problem.forward(theta, x1))
            if self._autodiff[0] != "torch.func":
                warnings.warn(f"GNH product: {self._autodiff[1]}", SlowPathWarning, stacklevel=4)
        return self._autodiff

    def output_hessian(self, like: torch.Tensor):
        """The loss's output-Hessian product ``(y, t, u) -> H_y u`` for tensors like ``like``:
        a built-in loss's op bound once (checks and backend choice made here), else its hvp."""
        loss = self.problem.loss
        if loss.kernel_kind not in registry.LOSS_KIND_CODES:
            return loss.hvp
        key = (like.dtype, like.device)
        bound = self._output_hessians.get(key)
        if bound is None:
            sample = torch.zeros(1, 1, dtype=like.dtype, device=like.device)
            bound = self._output_hessians[key] = bind_output_hessian_product(loss.kernel_kind, sample, sample)
        return bound

    def plan(self, x: torch.Tensor, V: torch.Tensor) -> registry.Plan:
        """Which implementation computes the product over inputs ``x`` for the block ``V``, and why."""
        columns = 1 if V.dim() == 1 else V.shape[1]
        # The same batch tensor product after product (a solver's kept index rows): its plan
        # without building the key (shape, dtype and device of one tensor object are fixed).
        last = self._last_plan
        if last is not None and last[0] is x and last[1] == columns and _current(last[2]):
            return last[3]
        # Plans depend only on these (the model, loss and backend are fixed) and, a fused-kernel
        # plan, on the CUDA runtime it was planned under: kept, so a solver's hundreds of small
        # products neither re-plan nor (but for a fused-kernel plan) ask the registry anything.
        key = (tuple(x.shape), x.dtype, x.device, columns)
        kept = self._plans.get(key)
        if kept is None or not _current(kept[1]):
            case = _Case(self, x, columns)
            plan = self._choose(case)
            # _Case.fused_kernel is the only part of a choice that reads the runtime
            kept = self._plans[key] = (plan, registry.cuda_runtime() if "fused_kernel" in vars(case) else None)
        self._last_plan = (x, columns, kept[1], kept[0])
        return kept[0]

    def _choose(self, case: _Case) -> registry.Plan:
        if self.backend not in ("auto", "torch") and case.mlp[0] is None:
            raise registry.BackendUnavailable(f"fused MLP product: {case.mlp[1]}")
        for implementation in IMPLEMENTATIONS:
            backend, reason = implementation.applies(case)
            if backend is not None:
                return registry.Plan(GNH_PRODUCT, implementation.name, backend, reason)
        raise AssertionError("the reverse-mode product applies to every model")

    def product(self, V: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, slot=None,
                plan: registry.Plan | None = None) -> torch.Tensor:
        """sum over the batch x of J_i^T H_i J_i V for V (d, m), as (d, m). ``slot``: which fixed
        slice of the training data x is (None: not one), so its forward state can be kept;
        ``plan``: the operator's plan for this batch (default :meth:`plan`)."""
        plan = plan or self.plan(x, V)
        return _BY_NAME[plan.implementation].run(self, plan, V, x, targets, slot)

    def kept_forward(self, kind: str, compute, nbytes, x: torch.Tensor, slot):
        """The forward state ``compute()`` of data slice ``slot`` (None: not a fixed slice), kept
        between products while the parameters and the data are unchanged, every kind's slices
        under FORWARD_CACHE_BYTES in all."""
        if slot is None:
            return compute()
        problem = self.problem
        theta = problem.theta
        stamp = (problem.version, theta.data_ptr(), theta._version, x.data_ptr(), x._version, tuple(x.shape))
        slices = self.cache.setdefault("mlp_forward", {})  # shared with with_damping copies
        key = (slot, self.batch_size) if kind == "mlp" else (kind, slot, self.batch_size)
        entry = slices.get(key)
        # The weak reference catches a reassigned problem.inputs even when the new
        # tensor reuses the freed one's address (same data_ptr, version 0 again).
        if entry is not None and entry[0] == stamp and entry[3]() is problem.inputs:
            return entry[1]
        state = compute()
        held = sum(value[2] for k, value in slices.items() if k != key)
        size = nbytes(state)
        if held + size <= FORWARD_CACHE_BYTES:
            slices[key] = (stamp, state, size, weakref.ref(problem.inputs))
        else:
            slices.pop(key, None)
        return state
