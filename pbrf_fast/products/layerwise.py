"""Exact Gauss-Newton product of a convolutional network, layer by layer, all columns at once.

For a batch x and a block V (d, m), ``sum_i J_i^T H_i J_i V`` in three passes:

    primal   one forward pass at theta, keeping what the tangent pass needs per layer
             (each Conv2d / Linear input, eval-BatchNorm's normalised input, ReLU masks,
             max-pool argmax indices): computed once per batch and kept while a solver iterates;
    tangent  J V for all m columns as ONE pass over m x batch rows: per Conv2d
             ``conv(t, W) + conv(a, dW)``, the first a single convolution over the columns
             folded into the batch dimension, the second a single convolution of the shared
             input with the m columns' weights stacked as m x C_out output channels -- whose
             (B, m x C_out, H, W) result *is* the folded (B x m, C_out, H, W) tangent, no copy;
    output   u = H_y (J V) by the loss's output-Hessian product (the caller passes it);
    backward J^T u for all m columns by one reverse pass through the tangent pass (it is
             linear in V, so its vector-Jacobian product *is* J^T): per Conv2d, autograd
             runs exactly the transposed convolutions (``conv2d_input`` of the folded
             cotangents, ``conv2d_weight`` of the shared input against the m x C_out stacked
             cotangents), the ops a hand-written backward would call, with every other
             layer's transpose (pooling scatter, pads, slices, means) taken care of too.

All three run in the memory format :func:`choose_layout` picks (NHWC for float32 images, where
its convolutions measured faster); in NHWC the stacked result is refolded by one copy.

Which models: the graph of ``torch.fx.symbolic_trace(model)`` -- tracing rather than a list
of known block classes, so a residual block (``F.relu(out + shortcut(x))``, a zero-pad
"option A" shortcut made of slicing and ``F.pad``, or a projection shortcut) is recognised by
its dataflow, from any package, without the library importing model code -- whose every node
is one of: Conv2d (zero padding, groups = 1), Linear (2-D inputs), BatchNorm1d/2d in eval mode
with running statistics, ReLU, max/avg/adaptive-avg pooling, Flatten, Identity, eval Dropout,
zero pads, batch-preserving slices / reshapes / means / sums, additions and scalings by
constants. A model that does not trace, or has another node, keeps the torch.func product
(:func:`parse_layerwise` says why). How each Conv2d / Linear maps inputs and parameter
directions to outputs is its layer adapter's (:mod:`pbrf_fast.layers`): its
:meth:`~pbrf_fast.layers.base.LayerAdapter.functional`, bound once per layer at parse time
(``_Step.apply``), so a product calls torch directly and runs no adapter code. A probe forward on
three training inputs checks that every node keeps the example dimension first and that the
traced graph reproduces the model's outputs.

:func:`layerwise_gnh_product` is the entry point; its torch reference is the torch.func
product of ``GaussNewton(backend="torch")``, which the tests compare it with in float64.
It is plain torch ops, so it runs unchanged on CUDA tensors.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import ADAPTERS, LayerAdapter, adapter_for

__all__ = ["LayerwiseSpec", "parse_layerwise", "layerwise_forward", "layerwise_gnh_product"]

OP_NAME = "layerwise_gnh_product"
# Memory for one chunk of the tangent pass (tangents and their cotangents for m x rows):
# the batch is taken in as many rows at a time as fit, so m = 8 columns over 512
# CIFAR images stay within a few GiB.
TANGENT_CHUNK_BYTES = 1 << 30
_PROBE_ROWS = 3  # > 1 and odd, so a reshape that mixes examples cannot pass by accident
# The activations' memory format inside the product: "auto" (:func:`choose_layout`),
# "channels_last" or "contiguous"; read when a model is parsed (tests and benchmarks set it).
LAYOUT = "auto"
# In NHWC, m > 1 columns as channel groups (True, see _Grouped) or folded into the batch (False).
# Folded measured faster on CPU (ResNet-20, m = 8: 4.8 s vs 6.3 s; oneDNN's groups = 8
# convolutions ran ~1.3x slower than the batch-folded ones, bench/RESULTS.md, issue 15).
GROUP_COLUMNS = False

_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.ZeroPad2d)
_LINEAR_FUNCTIONS = (F.avg_pool2d, F.adaptive_avg_pool2d)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous")
_REDUCE_METHODS = ("mean", "sum")
_POINTWISE_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", torch.tanh: "tanh",
                        F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
_POINTWISE_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_POINTWISE_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_ADD = (operator.add, operator.iadd, torch.add)
_MUL = (operator.mul, operator.imul, torch.mul, operator.truediv, operator.neg)


@dataclass
class _Step:
    """One node of the traced graph and how its tangent is computed.

    kind: "input", "static" (a shape or other non-tensor value), "conv", "linear", "batchnorm",
    "folded" (an eval BatchNorm2d applied by the Conv2d before it, ``bn``), "pointwise"
    (``function``: relu, tanh or sigmoid), "maxpool", "linear_op" (the node's own function applied to the tangents),
    "pad" (zero pad; the tangent pads with zeros whatever the constant), "reshape"
    (tangent reshaped to the node's per-example shape), "add", "scale", "output".
    """

    node: fx.Node
    kind: str
    module: nn.Module | None = None
    adapter: LayerAdapter | None = None  # the layer adapter of a conv, linear or batchnorm step
    # role ("weight", "bias") -> (offset, numel) in the flat parameters; absent: frozen / none
    params: dict = field(default_factory=dict)
    example_shape: tuple = ()
    function: str = ""
    bn: "_Step | None" = None
    # a conv or linear step's layer as one torch function (inputs, weight, bias) -> output, bound
    # once at parse time from its adapter (LayerAdapter.functional): the passes call it, not the adapter
    apply: Callable | None = None

    @property
    def relu(self) -> bool:
        return self.function == "relu"


@dataclass
class LayerwiseSpec:
    """A traced network the layer-wise product serves, for inputs of ``input_shape``."""

    graph_module: fx.GraphModule
    steps: list
    input_shape: tuple
    example_numel: int  # numbers per example over every tensor the tangent pass makes
    param_names: tuple = ()
    # Memory format of the product's 4-D activations (primal, tangents, cotangents): chosen
    # per spec by :func:`choose_layout`; the user's model and inputs are never changed.
    channels_last: bool = False


class _Unsupported(Exception):
    pass


def _qualified_modules(gm: fx.GraphModule) -> dict:
    return dict(gm.named_modules())


def _classify(node: fx.Node, modules: dict) -> tuple[str, nn.Module | None]:
    """The step kind of one traced node (raises _Unsupported naming it)."""
    op, target = node.op, node.target
    if op == "placeholder":
        return "input", None
    if op == "output":
        return "output", None
    if op == "get_attr":
        raise _Unsupported(f"node {node.name} reads the parameter or buffer {target!r} outside a module call")
    if op == "call_module":
        module = modules[target]
        kind = type(module)
        if kind in ADAPTERS:
            return _parameterised_kind(target, module), module
        if kind in _POINTWISE_MODULES:
            return "pointwise", module
        if kind is nn.MaxPool2d:
            return "maxpool", module
        if kind in _POOL_MODULES:
            if kind is nn.Dropout and module.training:
                raise _Unsupported(f"Dropout {target} is in training mode (random)")
            if kind is nn.Flatten and module.start_dim == 0:
                raise _Unsupported(f"Flatten {target} merges the example dimension")
            return ("reshape" if kind is nn.Flatten else "pad" if kind is nn.ZeroPad2d else "linear_op"), module
        raise _Unsupported(f"{kind.__name__} ({target}) is not supported")
    if op == "call_function":
        if target in _POINTWISE_FUNCTIONS:
            return "pointwise", None
        if target is F.max_pool2d:
            return "maxpool", None
        if target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode != "constant":
                raise _Unsupported(f"F.pad with mode={mode!r} (only constant padding)")
            return "pad", None
        if target in _ADD:
            if "alpha" in node.kwargs:
                raise _Unsupported(f"torch.add with alpha at {node.name}")
            return "add", None
        if target in _MUL:
            return "scale", None
        if target is torch.flatten:
            return "reshape", None
        if target in _LINEAR_FUNCTIONS or target in (operator.getitem, getattr):
            return "linear_op", None  # getitem/getattr on shapes become "static" at the probe
        raise _Unsupported(f"function {getattr(target, '__name__', target)} ({node.name}) is not supported")
    if op == "call_method":
        if target in _POINTWISE_METHODS:
            return "pointwise", None
        if target in _RESHAPE_METHODS:
            return "reshape", None
        if target in _REDUCE_METHODS:
            return "linear_op", None
        if target in ("size", "dim"):
            return "static", None
        raise _Unsupported(f"method .{target}() ({node.name}) is not supported")
    raise _Unsupported(f"node {node.name} ({op}) is not supported")


_STEP_KINDS = {"conv2d": "conv", "linear": "linear", "batchnorm": "batchnorm"}


def _parameterised_kind(target: str, module: nn.Module) -> str:
    """The step kind of a module with a layer adapter (raises _Unsupported saying why not)."""
    adapter, why = adapter_for(module)
    why = why or adapter.batch_coupling_reason()
    if why or adapter.kind not in _STEP_KINDS:
        raise _Unsupported(f"{why or type(module).__name__ + ' has no layer-wise tangent'} ({target})")
    return _STEP_KINDS[adapter.kind]


def _module_params(module: nn.Module, qualified: str, offsets: dict) -> dict:
    roles = {}
    for role in ("weight", "bias"):
        name = f"{qualified}.{role}"
        if name in offsets:
            roles[role] = offsets[name]
    return roles


def parse_layerwise(problem) -> tuple[LayerwiseSpec | None, str]:
    """(LayerwiseSpec, "") if ``problem.model`` is a network the layer-wise product serves
    exactly, else (None, why not). Traces the model once and runs a three-row probe."""
    model = problem.model
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None, f"{type(m).__name__} has forward hooks"
    if problem.inputs.dim() < 2 or not problem.inputs.is_floating_point():
        return None, "inputs are not floating-point feature tensors"
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # any tracing failure: not a static graph
        return None, f"torch.fx cannot trace the model ({type(exc).__name__}: {str(exc)[:120]})"
    modules = _qualified_modules(gm)
    offsets = {name: (lo, hi - lo) for name, (lo, hi) in problem.param_ranges.items()}  # (start, size)
    steps, used = [], set()
    try:
        for node in gm.graph.nodes:
            kind, module = _classify(node, modules)
            parameterised = kind in _STEP_KINDS.values()
            params = _module_params(module, node.target, offsets) if parameterised else {}
            used.update(f"{node.target}.{role}" for role in params)
            adapter = adapter_for(module)[0] if parameterised else None
            steps.append(_Step(node, kind, module, adapter, params, function=_pointwise_function(node, module),
                               apply=adapter.functional() if kind in ("conv", "linear") else None))
    except _Unsupported as exc:
        return None, str(exc)
    _fold_batchnorms(steps)
    unused = [n for n in problem.param_names if n not in used]
    if unused:
        return None, f"trainable parameters used outside supported layers: {', '.join(unused[:3])}"
    if sum(s.kind == "input" for s in steps) != 1:
        return None, "the model takes more than one input"
    spec = LayerwiseSpec(gm, steps, tuple(problem.inputs.shape[1:]), 0, tuple(problem.param_names),
                         channels_last=choose_layout(problem.inputs))
    reason = _probe(spec, problem)
    return (spec, "") if not reason else (None, reason)


def choose_layout(inputs: torch.Tensor) -> bool:
    """Whether the product runs its 4-D activations in channels_last (NHWC).

    Measured (bench/RESULTS.md, issue 15): on CPU in float32 the ResNet-20 product ran 1.16x
    (256 images) to 2.4x (1,000 images) faster in NHWC than in NCHW, oneDNN's NHWC convolutions
    and their gradients being the faster kernels at 16-64 channels; on CUDA bench/gpu_check.sh's
    layerwise_nchw rows test the same choice. Float64 stays in the layout given (oneDNN
    has no float64 convolutions; the fallback has no NHWC fast path), as do inputs that are not
    images. ``LAYOUT`` forces a choice: "channels_last", "contiguous" or "auto" (this rule)."""
    if LAYOUT != "auto":
        return LAYOUT == "channels_last" and inputs.dim() == 4
    return inputs.dim() == 4 and inputs.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _pointwise_function(node: fx.Node, module) -> str:
    if module is not None:
        return _POINTWISE_MODULES.get(type(module), "")
    if node.op == "call_method":
        return _POINTWISE_METHODS.get(node.target, "")
    return _POINTWISE_FUNCTIONS.get(node.target, "") if node.op == "call_function" else ""


def _fold_batchnorms(steps: list) -> None:
    """A BatchNorm2d whose input is a Conv2d used nowhere else is applied by that conv's
    tangent (its per-channel slope scales the weights, not the activations)."""
    by_node = {s.node: s for s in steps}
    for step in steps:
        if step.kind == "batchnorm" and type(step.module) is nn.BatchNorm2d:
            source = step.node.args[0]
            conv = by_node.get(source)
            if conv is not None and conv.kind == "conv" and len(source.users) == 1:
                conv.bn, step.kind = step, "folded"


def _probe(spec: LayerwiseSpec, problem) -> str:
    """Run the primal pass on three training rows: every tensor keeps the example dimension
    first, and the result matches the model's own forward. Returns '' or why not."""
    rows = torch.arange(_PROBE_ROWS, device=problem.inputs.device) % problem.n
    x = problem.inputs[rows]
    try:
        with torch.no_grad():
            y, _, _, values = _primal(spec, problem.theta, x, keep_values=True)
            expected = problem.forward(problem.theta, x)
    except _Unsupported as exc:
        return str(exc)
    except Exception as exc:  # a node our interpreter runs differently from the model
        return f"the traced graph does not run as a layer-wise network ({type(exc).__name__}: {str(exc)[:120]})"
    numel = 0
    for step in spec.steps:
        value = values.get(step.node)
        if step.kind in ("input", "output"):
            continue
        if not isinstance(value, torch.Tensor):
            if step.kind not in ("linear_op", "static"):
                return f"node {step.node.name} does not give a tensor"
            step.kind = "static"
            continue
        if step.kind == "static":
            return f"node {step.node.name} ({step.node.target}) gives a tensor"
        if value.dim() == 0 or value.shape[0] != _PROBE_ROWS:
            return f"node {step.node.name} ({step.node.target}) does not keep the example dimension first"
        why = _batch_preserving(step, values)
        if why:
            return why
        step.example_shape = tuple(value.shape[1:])
        numel += value[0].numel()
    # rounding may differ (an unfolded eval BatchNorm is x_hat * gamma + beta): compare at the outputs' scale
    tolerance = (1e-4 if y.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-9) * \
        (1.0 + float(expected.abs().max()))
    if y.shape != expected.shape or float((y - expected).abs().max()) > tolerance:
        return "the traced graph does not reproduce the model's outputs"
    spec.example_numel = numel
    return ""


def _batch_preserving(step: _Step, values: dict) -> str:
    """Why a linear node's tangent rule would be wrong ('' if it is right): its tensor input
    must be its first argument, its other arguments constants (the tangent pass reuses them),
    and it must act on each example separately (no slicing or reducing over dimension 0)."""
    node = step.node
    if step.kind not in ("linear_op", "pad", "scale", "add", "reshape"):
        return ""
    tensors = [a for a in (*node.args, *node.kwargs.values())
               if isinstance(a, fx.Node) and isinstance(values.get(a), torch.Tensor)]
    if step.kind == "add":
        others = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a not in tensors]
        return f"{node.name} adds a non-tensor node" if others else ""
    if step.kind == "reshape":
        return ""  # the probe's leading-size check suffices: a row-major reshape keeping it keeps rows
    if step.kind == "scale":
        return "" if len(tensors) == 1 else f"{node.name} multiplies two tensors (not linear)"
    first = node.args[0] if node.args else None
    rest = [a for a in (*node.args[1:], *node.kwargs.values())]
    found = []
    fx.node.map_aggregate(rest, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    if node.op != "call_module" and (first not in tensors or found):
        return f"{node.name} ({node.target}) takes computed arguments besides its tensor input"
    if node.target is operator.getitem:
        index = node.args[1]
        lead = index[0] if isinstance(index, tuple) and index else index
        if lead != slice(None):
            return f"{node.name} indexes the example dimension (only x[:, ...] slices are supported)"
    if node.op == "call_method" and node.target in _REDUCE_METHODS:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        ndim = values[first].dim()
        dims = (dims,) if isinstance(dims, int) else dims
        if dims is None or any(d % ndim == 0 for d in dims):
            return f"{node.name} reduces over the example dimension"
    return ""


# ---- primal pass ---------------------------------------------------------------------------------

def _param(step: _Step, role: str, theta: torch.Tensor):
    """The primal value of a module parameter: a view of theta if trainable, else the module's own."""
    if role in step.params:
        offset, size = step.params[role]
        return theta[offset : offset + size].view(getattr(step.module, role).shape)
    value = getattr(step.module, role)
    return None if value is None else value.detach()


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def _maxpool_args(step: _Step, node_args, node_kwargs):
    if step.module is not None:
        m = step.module
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                    ceil_mode=m.ceil_mode)
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    kwargs = dict(zip(names, node_args[1:]), **node_kwargs)
    if kwargs.pop("return_indices", False):
        raise _Unsupported(f"max_pool2d with return_indices at {step.node.name}")
    return kwargs


def _primal_batchnorm(step, a, theta, saved, constants, keep_x_hat=True):
    """Eval BatchNorm = x_hat * gamma + beta with x_hat = (a - running_mean) / sqrt(running_var + eps).
    Keeps the per-channel slope gamma / sqrt(var + eps) and, unless the conv before it applies
    it (then no per-example state at all), x_hat: the tangent of gamma."""
    m = step.module
    inv_std = step.adapter.inverse_std(a.dtype)
    gamma, beta = _param(step, "weight", theta), _param(step, "bias", theta)
    constants[step.node] = inv_std * gamma if gamma is not None else inv_std
    if not keep_x_hat:  # folded into the conv before it: its tangent needs 1 / sqrt(var + eps) too
        constants[(step.node, "inverse_std")] = inv_std
    if not (keep_x_hat and "weight" in step.params):  # no x_hat to keep: torch's fused pass
        return F.batch_norm(a, m.running_mean, m.running_var, gamma, beta, False, 0.0, m.eps)
    x_hat = (a - _channel_view(m.running_mean.to(a.dtype), a.dim())) * _channel_view(inv_std, a.dim())
    saved[step.node] = x_hat
    out = x_hat * _channel_view(gamma, a.dim())
    return out + _channel_view(beta, a.dim()) if beta is not None else out


def _primal_pointwise(step, a, saved):
    """ReLU keeps its output (also the next layer's kept input: no extra memory) for
    threshold_backward; tanh and sigmoid keep their slope."""
    if step.function == "tanh":
        out = torch.tanh(a)
        saved[step.node] = 1 - out * out
    elif step.function == "sigmoid":
        out = torch.sigmoid(a)
        saved[step.node] = out * (1 - out)
    else:
        out = torch.relu(a)
        saved[step.node] = out
    return out


def _primal(spec: LayerwiseSpec, theta: torch.Tensor, x: torch.Tensor, keep_values: bool = False):
    """(outputs (B, C), per-example saved tensors, per-channel constants, all node values if asked)."""
    env, saved, constants = {}, {}, {}
    modules = _qualified_modules(spec.graph_module)

    def value_of(a):
        return fx.node.map_arg(a, lambda n: env[n])

    y = None
    if spec.channels_last and x.dim() == 4:
        # the primal pass in NHWC: every kept input, mask and the tangents that follow it inherit it
        x = x.contiguous(memory_format=torch.channels_last)
    for step in spec.steps:
        node, kind = step.node, step.kind
        if kind == "input":
            env[node] = x
            continue
        if kind == "output":
            y = value_of(node.args[0])
            break
        args, kwargs = value_of(node.args), value_of(node.kwargs)
        if kind == "conv":
            a = args[0]
            out = _in_layout(spec, step.apply(a, _param(step, "weight", theta), _param(step, "bias", theta)))
            if "weight" in step.params or (step.bn is not None and "weight" in step.bn.params):
                saved[node] = a
        elif kind == "linear":
            a = args[0]
            if a.dim() != 2:
                raise _Unsupported(f"Linear {node.target} gets {a.dim()}-D inputs (only (B, features))")
            out = step.apply(a, _param(step, "weight", theta), _param(step, "bias", theta))
            if "weight" in step.params:
                saved[node] = a
        elif kind in ("batchnorm", "folded"):
            out = _primal_batchnorm(step, args[0], theta, saved, constants, keep_x_hat=kind == "batchnorm")
        elif kind == "pointwise":
            out = _primal_pointwise(step, args[0], saved)
        elif kind == "maxpool":
            out, indices = F.max_pool2d(args[0], return_indices=True, **_maxpool_args(step, args, kwargs))
            saved[node] = indices
        else:  # linear ops, pads, reshapes, additions, scalings, shapes: the node's own code
            if node.op == "call_module":
                out = modules[node.target](*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        env[node] = out
    y = y.reshape(len(x), -1)
    return y, saved, constants, (env if keep_values else None)


def layerwise_forward(spec: LayerwiseSpec, theta: torch.Tensor, x: torch.Tensor):
    """The primal state the tangent pass needs: (outputs, per-example tensors, per-channel
    constants). Every per-example tensor has the example dimension first, so row chunks
    of the state are views."""
    with torch.no_grad():
        y, saved, constants, _ = _primal(spec, theta, x)
    return y, saved, constants


def forward_state_bytes(state) -> int:
    """Memory a kept state holds (a tensor kept for two layers counts once)."""
    y, saved, constants = state
    unique = {t.data_ptr(): t for t in [y, *saved.values(), *constants.values()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


# ---- tangent pass (and, through autograd, the backward pass) ------------------------------------

def _fold(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, m, ...) -> (rows * m, ...): tangents keep each example's m columns together."""
    return t.reshape(rows * t.shape[1], *t.shape[2:])


def _in_layout(spec: LayerwiseSpec, out: torch.Tensor) -> torch.Tensor:
    """A convolution's result in the spec's layout: a one-channel input (MNIST's first conv)
    is both NCHW and NHWC, and the convolution then returns NCHW."""
    if spec.channels_last and not out.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _stacked_to_folded(term: torch.Tensor, rows: int, m: int) -> torch.Tensor:
    """(rows, m * C, H, W) -> (rows * m, C, H, W), keeping the memory format.

    In NCHW (and for m = 1 in any format) this is a view. In NHWC the stacked result lies as
    (rows, H, W, m, C) while the folded tangent lies as (rows, m, H, W, C): one copy, measured
    cheaper than running the whole product in NCHW (bench/RESULTS.md, issue 15)."""
    channels = term.shape[1] // m
    if m == 1:
        return term
    if term.is_contiguous() or not term.is_contiguous(memory_format=torch.channels_last):
        return term.reshape(rows * m, channels, *term.shape[2:])
    nhwc = term.permute(0, 2, 3, 1).unflatten(3, (m, channels))           # (rows, H, W, m, C), a view
    folded = nhwc.permute(0, 3, 1, 2, 4).contiguous()                        # (rows, m, H, W, C)
    return folded.view(rows * m, *folded.shape[2:]).permute(0, 3, 1, 2)   # (rows * m, C, H, W), NHWC


class _Grouped:
    """A tangent held as (rows, m * C, H, W) in NHWC, the m columns as channel groups: the layout
    the stacked weight-tangent convolution returns, so a run of convolutions, ReLUs and residual
    additions needs no refolding copy per layer (a grouped convolution, groups = m, applies W to
    every column). Other nodes get the folded (rows * m, C, H, W) tangent (:func:`_folded`)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


def _folded(value, rows: int, m: int):
    return _stacked_to_folded(value.t, rows, m) if isinstance(value, _Grouped) else value


def _grouped(value, rows: int, m: int):
    """A folded (rows * m, C, H, W) tangent as :class:`_Grouped` (one copy; None stays None)."""
    if value is None or isinstance(value, _Grouped):
        return value
    _, channels, height, width = value.shape
    nhwc = value.permute(0, 2, 3, 1).reshape(rows, m, height, width, channels)
    stacked = nhwc.permute(0, 2, 3, 1, 4).contiguous()                      # (rows, H, W, m, C)
    return _Grouped(stacked.view(rows, height, width, m * channels).permute(0, 3, 1, 2))


def _per_example(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.view(rows, len(t) // rows, *t.shape[1:])


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _stacked(dW: torch.Tensor, db):
    """m parameter directions (m, out, ...) and (m, out) as one weight of m x out rows and its
    bias: the layer applied to them gives the m tangents as m x out output channels."""
    return dW.flatten(0, 1), None if db is None else db.flatten()


def _bias_tangent(db: torch.Tensor, rows: int, example_shape: tuple) -> torch.Tensor:
    """The tangent of a per-channel bias (m, C), broadcast over rows and positions, folded."""
    m = len(db)
    view = db.view(1, m, -1, *([1] * (len(example_shape) - 1)))
    return _fold(view.expand(rows, m, *example_shape), rows)


class _Tangents:
    """One chunk's tangent pass: the primal state of its rows and the m columns of V as
    one autograd leaf per parameter block (m, *shape), so the backward pass writes each
    parameter's block of J^T u and nothing else (slicing one (m, d) leaf would make the
    backward add a zero-padded (m, d) copy per parameter)."""

    def __init__(self, spec, theta, state, blocks, rows):
        self.spec, self.theta, self.rows = spec, theta, rows
        self.saved, self.constants = state[1], state[2]
        self.blocks = blocks
        self.m = next(iter(blocks.values())).shape[0]
        # m > 1 columns in NHWC: tangents as channel groups (_Grouped) through convs, ReLUs, adds
        self.grouped = spec.channels_last and self.m > 1 and GROUP_COLUMNS

    def block(self, step, role):
        return self.blocks.get((step.node, role))

    def conv(self, step, t_in):
        """conv(t, W) + conv(a, dW) + db, with a following eval BatchNorm folded in exactly.
        With z = conv(a, W) + b and BN(z) = (z - mu) r gamma + beta (r = 1/sqrt(var + eps)):

            dBN = conv(t, r gamma W) + conv(a, r gamma dW + r dgamma W) + r gamma db + r (b - mu) dgamma + dbeta

        so the whole BatchNorm tangent costs no pass over the activations: its slope scales
        the weights, its gamma columns join the weight columns, its beta columns the bias."""
        m, rows, conv, bn = self.m, self.rows, step.apply, step.bn
        W, b = _param(step, "weight", self.theta), _param(step, "bias", self.theta)
        dW, db = self.block(step, "weight"), self.block(step, "bias")
        scale = None
        if bn is not None:
            r = self.constants[(bn.node, "inverse_std")]                    # 1 / sqrt(var + eps)
            scale = self.constants[bn.node]                                  # r * gamma
            dgamma, dbeta = self.block(bn, "weight"), self.block(bn, "bias")
            if dW is not None:
                dW = dW * scale.view(1, -1, 1, 1, 1)
            if db is not None:
                db = db * scale
            if dgamma is not None:
                rdg = dgamma * r                                             # (m, C_out)
                dW = _add(dW, rdg.view(m, -1, 1, 1, 1) * W)
                shift = -bn.module.running_mean.to(W.dtype) if b is None else b - bn.module.running_mean
                db = _add(db, rdg * shift)
            db = _add(db, dbeta)
        if scale is not None:
            W = W * scale.view(-1, 1, 1, 1)
        if self.grouped and dW is not None:
            return self._grouped_conv(step, _grouped(t_in, rows, m), W, dW, db)
        t_in = _folded(t_in, rows, m)
        out = None
        if t_in is not None:
            out = conv(t_in, W, None)
        if dW is not None:
            # the m columns' weights as m x C_out output channels of one convolution of the shared input:
            # its (rows, m * C_out, H, W) result is the folded (rows * m, C_out, H, W) tangent
            term = conv(self.saved[step.node], *_stacked(dW, db))
            term = _stacked_to_folded(_in_layout(self.spec, term), rows, m)
            out = term if out is None else out.add_(term)
        elif db is not None:
            out = _add(out, _bias_tangent(db, rows, step.example_shape))
        return out

    def _grouped_conv(self, step, t_in, W, dW, db):
        """The m columns as channel groups: conv(t, W) as one grouped convolution (W repeated
        per group, groups = m) plus the stacked conv(a, dW), whose output is already grouped."""
        conv = step.apply
        out = _in_layout(self.spec, conv(self.saved[step.node], *_stacked(dW, db)))
        if t_in is not None:
            out = out.add_(conv(t_in.t, W.repeat(self.m, 1, 1, 1), None, groups=self.m))
        return _Grouped(out)

    def linear(self, step, t_in):
        out = None if t_in is None else step.apply(t_in, _param(step, "weight", self.theta), None)
        dW, db = self.block(step, "weight"), self.block(step, "bias")
        if dW is not None:
            term = step.apply(self.saved[step.node], *_stacked(dW, db))        # (rows, m * out)
            term = term.view(self.rows * self.m, -1)
            out = term if out is None else out.add_(term)
        elif db is not None:
            out = _add(out, _bias_tangent(db, self.rows, step.example_shape))
        return out

    def batchnorm(self, step, t_in):
        out = None if t_in is None else t_in * _channel_view(self.constants[step.node], t_in.dim())
        dgamma, dbeta = self.block(step, "weight"), self.block(step, "bias")
        if dgamma is not None:
            spatial = [1] * (len(step.example_shape) - 1)
            term = self.saved[step.node].unsqueeze(1) * dgamma.view(1, self.m, -1, *spatial)
            out = _add(out, _fold(term, self.rows))
        if dbeta is not None:
            out = _add(out, _bias_tangent(dbeta, self.rows, step.example_shape))
        return out

    def pointwise(self, step, t_in):
        kept = self.saved[step.node].unsqueeze(1)
        if isinstance(t_in, _Grouped):  # (rows, m * C, H, W) seen as (rows, m, C, H, W): views
            per = t_in.t.unflatten(1, (self.m, -1))
            out = torch.ops.aten.threshold_backward(per, kept, 0) if step.relu else per * kept
            return _Grouped(out.flatten(1, 2))
        per = _per_example(t_in, self.rows)
        if step.relu:
            return torch.ops.aten.threshold_backward(per, kept, 0).reshape(t_in.shape)
        return (per * kept).reshape(t_in.shape)

    def maxpool(self, step, t_in):
        indices = self.saved[step.node]
        per = _per_example(t_in, self.rows)                                   # (rows, m, C, H, W)
        idx = indices.flatten(2).unsqueeze(1).expand(-1, per.shape[1], -1, -1)
        return _fold(per.flatten(3).gather(3, idx), self.rows).reshape(len(t_in), *indices.shape[1:])


def _tangent(spec: LayerwiseSpec, tangents: _Tangents) -> torch.Tensor:
    """J V for the chunk's rows: (rows * m, C), each example's m columns together."""
    env = {}
    modules = None
    for step in spec.steps:
        node, kind = step.node, step.kind
        if kind in ("input", "static"):
            env[node] = None
            continue
        rows, m = tangents.rows, tangents.m
        if kind == "output":
            out = _folded(env[node.args[0]], rows, m)
            return out.reshape(len(out), -1)
        first = env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if kind == "folded":
            env[node] = first  # the conv before it applied it
            continue
        if kind == "conv" or (kind == "pointwise" and isinstance(first, _Grouped)):
            env[node] = getattr(tangents, kind)(step, first)
            continue
        if kind == "add":
            terms = [env[a] for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
            grouped = any(isinstance(t, _Grouped) for t in terms)
            out = None
            for t in terms:
                out = _add(out, _grouped(t, rows, m).t if grouped and t is not None else t)
            env[node] = _Grouped(out) if grouped and out is not None else out
            continue
        if kind == "scale":
            env[node] = _scaled(node, env, first)
            continue
        first = _folded(first, rows, m)  # every other node works on the folded tangent
        if kind in ("linear", "batchnorm"):
            out = getattr(tangents, kind)(step, first)
        elif first is None:
            out = None  # a zero tangent through a linear or masking op stays zero
        elif kind in ("pointwise", "maxpool"):
            out = getattr(tangents, kind)(step, first)
        elif kind == "reshape":
            out = first.reshape(len(first), *step.example_shape)
        elif kind == "pad":
            pad = step.module.padding if step.module is not None else \
                node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
            out = F.pad(first, pad)  # zeros, whatever constant the primal pads with
        elif node.op == "call_module":  # linear_op: the node's own linear, per-example function
            modules = modules or _qualified_modules(spec.graph_module)
            out = modules[node.target](first)
        elif node.op == "call_method":
            out = getattr(first, node.target)(*node.args[1:], **node.kwargs)
        else:
            out = node.target(first, *node.args[1:], **node.kwargs)
        env[node] = out
    raise RuntimeError("traced graph has no output")


def _scaled(node, env, first):
    """x * c, c * x, x / c, -x for a constant c (a product of two activations is refused)."""
    if isinstance(first, _Grouped) and node.target in (operator.neg, operator.truediv):
        return _Grouped(_scaled(node, {node.args[0]: first.t}, first.t))
    if node.target is operator.neg:
        return None if first is None else -first
    a, b = node.args[0], node.args[1]
    if node.target is operator.truediv:
        return None if first is None else first / b
    constant = b if isinstance(a, fx.Node) else a
    tangent = env[a] if isinstance(a, fx.Node) else env[b]
    if isinstance(tangent, _Grouped):
        return _Grouped(tangent.t * constant)
    return None if tangent is None else tangent * constant


def tangent_rows(spec: LayerwiseSpec, columns: int, element_size: int) -> int:
    """Rows per tangent chunk: tangents and cotangents of m columns fit TANGENT_CHUNK_BYTES."""
    per_row = max(1, 2 * columns * spec.example_numel * element_size)
    return max(1, TANGENT_CHUNK_BYTES // per_row)


def _parameter_blocks(spec: LayerwiseSpec, V2: torch.Tensor) -> dict:
    """(node, role) -> the m columns' block of that parameter, (m, *shape), an autograd leaf."""
    m = V2.shape[1]
    blocks = {}
    for step in spec.steps:
        for role, (offset, size) in step.params.items():
            shape = getattr(step.module, role).shape
            blocks[(step.node, role)] = V2[offset : offset + size].T.reshape(m, *shape).requires_grad_(True)
    return blocks


def layerwise_gnh_product(spec: LayerwiseSpec, output_hessian, theta: torch.Tensor, x: torch.Tensor,
                          targets: torch.Tensor, V: torch.Tensor, forward=None) -> torch.Tensor:
    """sum over the batch of J_i^T H_i J_i V for V (d,) or (d, m), same shape as V.

    ``output_hessian(y, targets, u)``: the loss's output-Hessian product (a Loss's ``hvp``);
    ``forward``: this batch's :func:`layerwise_forward` state, if kept. The tangent pass
    runs for all m columns at once, in row chunks of :func:`tangent_rows`.
    """
    V2 = (V.unsqueeze(1) if V.dim() == 1 else V).detach()
    m = V2.shape[1]
    state = forward if forward is not None else layerwise_forward(spec, theta, x)
    y, saved, constants = state
    rows = tangent_rows(spec, m, V2.element_size())
    blocks = _parameter_blocks(spec, V2)
    places = list(_block_offsets(spec))
    leaves = [blocks[key] for key, _ in places]
    out = torch.zeros_like(V2)
    with torch.enable_grad():
        for r0 in range(0, len(x), rows):
            r1 = min(len(x), r0 + rows)
            chunk = (None, {k: v[r0:r1] for k, v in saved.items()}, constants)
            JV = _tangent(spec, _Tangents(spec, theta, chunk, blocks, r1 - r0))   # (rows * m, C)
            JV3 = JV.reshape(r1 - r0, m, -1)
            HJV = output_hessian(y[r0:r1], targets[r0:r1], JV3.detach().transpose(0, 1).contiguous())  # (m, rows, C)
            grads = torch.autograd.grad(JV3, leaves, HJV.transpose(0, 1))
            for ((key, (offset, size)), g) in zip(places, grads):
                out[offset : offset + size].add_(g.reshape(m, size).T)
    return out.reshape(V.shape)


def _block_offsets(spec: LayerwiseSpec):
    for step in spec.steps:
        for role, place in step.params.items():
            yield (step.node, role), place
