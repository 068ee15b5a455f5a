"""Derivatives of any differentiable model, with the fallbacks torch.func needs on some of them.

torch.func (vmap over jvp / vjp) is the fast, general path, but not every model runs under it:

- fused attention kernels (``nn.TransformerEncoderLayer``'s and ``nn.MultiheadAttention``'s eval
  fast path, the flash ``scaled_dot_product_attention`` on CPU) have no forward-mode rule and no
  double backward; switched off (:func:`unfused_attention`), the same layers run as plain
  differentiable ops with the same values;
- a custom ``torch.autograd.Function`` without ``setup_context`` cannot enter any torch.func
  transform, and one without ``jvp`` / a vmap rule cannot be pushed forward or vmapped;
- recurrent layers (``nn.GRU``, ``nn.LSTM``) fail inside ``vmap`` over examples (torch's rnn
  builds its initial state without the vmapped dimension).

:func:`choose_mode` probes the torch.func computation on a tiny case and returns which of
:data:`MODES` runs and why; the ``reverse`` mode uses ``torch.autograd`` only (reverse mode,
a backward pass of a backward pass for Jacobian-vector products: ``J v`` is the derivative of
the linear map ``u -> J^T u`` in direction ``v``), which every model with a backward pass has.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["MODES", "TRANSFORM_ERRORS", "batched_grad", "choose_mode", "describe", "example_jacobians",
           "output_tangents", "per_example_gradients", "per_example_rows", "pullback_rows", "reverse_gnh_product",
           "reverse_hessian_product", "reverse_output_tangents", "transform_failure", "unfused_attention",
           "vjp_rows"]

# torch.func as is; torch.func with fused attention switched off; torch.autograd reverse mode only
MODES = ("torch.func", "torch.func-unfused", "reverse")
# what torch raises when a transform meets an op or Function it has no rule for
TRANSFORM_ERRORS = (NotImplementedError, RuntimeError)


def transform_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (caught as one of TRANSFORM_ERRORS) may be a transform's failure, worth a
    fallback: running out of memory is not one (another path would only run out again)."""
    return not isinstance(exc, torch.OutOfMemoryError)


def _torch_func_then(run: Callable, fallback: Callable):
    """``run()`` (a torch.func computation) as is, then with fused attention off; ``fallback()``
    if torch.func fails both ways."""
    for context in (contextlib.nullcontext, unfused_attention):
        try:
            with torch.enable_grad(), context():
                return run()
        except TRANSFORM_ERRORS as exc:
            if not transform_failure(exc):
                raise
    return fallback()


def describe(exc: BaseException) -> str:
    """The first line of an exception, with its type: short enough for a plan's reason."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"


@contextlib.contextmanager
def unfused_attention():
    """The fused attention fast paths off: ``nn.MultiheadAttention`` / ``TransformerEncoderLayer``
    run their composite forward, and ``scaled_dot_product_attention`` its math backend. The values
    are the same function; these kernels just have no forward-mode rule or double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def choose_mode(probe: Callable[[], object], plain: Callable[[], object]) -> tuple[str, str]:
    """(mode, why) for a computation whose torch.func form is ``probe()`` on a tiny case and
    whose plain forward pass is ``plain()``: ``torch.func`` if the probe runs,
    ``torch.func-unfused`` if it runs with fused attention off, else ``reverse`` (torch.autograd
    only). ``why`` is '' for ``torch.func``. A probe that fails because the model itself fails
    (``plain()`` raises too) is not a transform's failure: ``torch.func``, which will raise the
    model's own error where it is used."""
    try:
        with torch.enable_grad():
            probe()
        return "torch.func", ""
    except TRANSFORM_ERRORS as exc:
        if not transform_failure(exc):
            raise
        first = describe(exc)
    try:
        with torch.no_grad():
            plain()
    except Exception:  # the model's own failure, whatever it is: not ours to diagnose here
        return "torch.func", ""
    try:
        with torch.enable_grad(), unfused_attention():
            probe()
        return "torch.func-unfused", (f"torch.func fails on a fused attention kernel ({first}); with the fused "
                                      "fast paths off the same layers run as differentiable ops")
    except TRANSFORM_ERRORS as exc:
        if not transform_failure(exc):
            raise
        return "reverse", (f"torch.func fails on this model ({first}; with fused attention off: {describe(exc)}): "
                           "reverse mode only, J v as a backward pass of a backward pass")


def batched_grad(outputs: torch.Tensor, inputs: torch.Tensor, grad_rows: torch.Tensor,
                 retain_graph: bool = False) -> torch.Tensor:
    """(m, *inputs.shape): the vector-Jacobian products of ``outputs`` with each row of
    ``grad_rows`` (m, *outputs.shape). Batched through the graph when its ops have batching
    rules; one backward pass per row when they do not (a custom Function's backward, say).
    The graph is kept for the fallback's passes and, with ``retain_graph``, after."""
    if grad_rows.shape[0] == 0:
        return inputs.new_zeros(0, *inputs.shape)
    try:
        (rows,) = torch.autograd.grad(outputs, inputs, grad_rows, retain_graph=True, is_grads_batched=True)
    except TRANSFORM_ERRORS as exc:
        if not transform_failure(exc):
            raise
        last = len(grad_rows) - 1
        rows = torch.stack([torch.autograd.grad(outputs, inputs, row, retain_graph=retain_graph or i < last)[0]
                            for i, row in enumerate(grad_rows)])
    return rows


def reverse_output_tangents(fn: Callable, theta: torch.Tensor, V_rows: torch.Tensor):
    """(y, J V): ``y = fn(theta)`` (detached) and the tangents (m, *y.shape) for the rows of
    ``V_rows`` (m, d), by reverse mode only: ``g(u) = J^T u`` is linear in u, so its derivative
    in direction v (one more backward pass) is ``J v``. Fused attention is off (its kernels have
    no double backward)."""
    with torch.enable_grad(), unfused_attention():
        th = theta.detach().requires_grad_()
        y = fn(th)
        u = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, th, u, create_graph=True)
        JV = batched_grad(g, u, V_rows.to(g.dtype))
    return y.detach(), JV.detach()


def reverse_gnh_product(fn: Callable, output_hessian: Callable, theta: torch.Tensor, targets, V: torch.Tensor):
    """sum over the batch of J_i^T H_i J_i V for V (d, m), reverse mode only (see
    :func:`reverse_output_tangents`); ``output_hessian(y, t, u)`` the loss's product."""
    with torch.enable_grad(), unfused_attention():
        th = theta.detach().requires_grad_()
        y = fn(th)
        u = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, th, u, create_graph=True)
        JV = batched_grad(g, u, V.T, retain_graph=True)              # (m, b, C)
        HJV = output_hessian(y.detach(), targets, JV.detach())         # (m, b, C)
        out = batched_grad(y, th, HJV.to(y.dtype))                     # (m, d)
    return out.detach().T


def reverse_hessian_product(loss: Callable, theta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(d, m) Hessian of the scalar ``loss(theta)`` times V (d, m), reverse over reverse."""
    with torch.enable_grad(), unfused_attention():
        th = theta.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss(th), th, create_graph=True)
        return batched_grad(g, th, V.T).detach().T


def pullback_rows(fn: Callable, theta: torch.Tensor, cotangents: Callable) -> torch.Tensor:
    """(m, d): the vector-Jacobian products of ``y = fn(theta)`` with the m cotangents
    ``cotangents(y)`` (m, *y.shape), through one batched forward pass."""
    with torch.enable_grad(), unfused_attention():
        th = theta.detach().requires_grad_()
        out = fn(th)
        return batched_grad(out, th, cotangents(out.detach())).detach()


def vjp_rows(fn: Callable, theta: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """(m, d): J^T u for the m cotangents (m, *y.shape) of ``y = fn(theta)``: torch.func (vjp,
    vmap over the pullback) where it runs the model, else :func:`pullback_rows`."""
    def reverse_by_torch_func():
        _, pullback = torch.func.vjp(fn, theta)
        return torch.func.vmap(pullback)(cotangents)[0].detach()

    return _torch_func_then(reverse_by_torch_func, lambda: pullback_rows(fn, theta, lambda y: cotangents.to(y.dtype)))


def per_example_rows(values: Callable, theta: torch.Tensor, count: int) -> torch.Tensor:
    """(count, d): the gradient of each entry of ``values(theta)`` (count,), one backward pass
    of the batched forward vmapped over unit cotangents. Row i is example i's gradient when the
    examples do not interact in the forward pass (eval mode; what Problem checks)."""
    return pullback_rows(values, theta, lambda out: torch.eye(count, dtype=out.dtype, device=out.device))


def per_example_gradients(one: Callable, batched: Callable, theta: torch.Tensor, *rows) -> torch.Tensor:
    """(b, d): the gradient of ``one(theta, *row_i)`` (a scalar) for each example i of the
    tensors ``rows``: vmap over examples of torch.func.grad where torch.func runs the model;
    otherwise (recurrent layers, which fail inside vmap over examples; custom Functions) the rows
    of one batched backward pass of ``batched(theta)`` (b,) over unit cotangents, which are the
    same gradients when the examples do not interact (:func:`per_example_rows`)."""
    return _torch_func_then(
        lambda: torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * len(rows))(theta, *rows).detach(),
        lambda: per_example_rows(batched, theta, len(rows[0])))


def example_jacobians(fn: Callable, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(b * C, d): the rows of each example's output Jacobian, ordered (example, output), for
    ``fn(theta, x) -> (b, C)``: vmap over examples of torch.func.jacrev where torch.func runs the
    model, else the pullbacks of one batched forward pass along unit cotangents (the examples
    being independent)."""
    def single(x_row):
        return torch.func.jacrev(lambda th: fn(th, x_row.unsqueeze(0))[0])(theta)

    return _torch_func_then(
        lambda: torch.func.vmap(single)(x).reshape(-1, theta.numel()).detach(),
        lambda: pullback_rows(lambda th: fn(th, x), theta,
                              lambda y: torch.eye(y.numel(), dtype=y.dtype, device=y.device).reshape(-1, *y.shape)))


def output_tangents(fn: Callable, theta: torch.Tensor, V_rows: torch.Tensor) -> torch.Tensor:
    """(m, *y.shape): J V for the rows of V_rows (m, d), by vmap over torch.func.jvp, with fused
    attention off where that is what it takes, else in reverse mode only
    (:func:`reverse_output_tangents`)."""
    def forward_mode():
        return torch.func.vmap(lambda v: torch.func.jvp(fn, (theta,), (v,))[1])(V_rows).detach()

    return _torch_func_then(forward_mode, lambda: reverse_output_tangents(fn, theta, V_rows)[1])
