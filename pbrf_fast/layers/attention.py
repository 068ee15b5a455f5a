"""nn.MultiheadAttention as four Kronecker-factored blocks: the query, key and value rows of
``in_proj_weight`` (each with its ``in_proj_bias`` slice) and ``out_proj``.

The module uses these weights functionally (``F.multi_head_attention_forward``), so no hook on
``out_proj`` ever fires and the projected queries, keys and values are never module outputs. A
hook on the attention module itself sees its inputs and output; from them, per block:

- ``out_proj``: inputs the attention context (the output before ``out_proj``, recomputed with an
  identity output projection), output gradients those of the module's output;
- query / key / value rows: inputs the module's query / key / value, output gradients those of the
  projected queries / keys / values, by one local backward pass from the module's output gradients
  through ``F.multi_head_attention_forward`` with identity input projections.

Both recomputations call torch's own function, and :func:`unsupported_reason` refuses (the
parameters then get the exact GNH diagonal) configurations outside what they reproduce.
This is not a :class:`~pbrf_fast.layers.base.LayerAdapter` in ``ADAPTERS``: per-example gradients
and scores of attention run the exact torch.func / reverse-mode fallback; only K-FAC / EK-FAC
use these blocks.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .linear import LinearAdapter

__all__ = ["AttentionPart", "attention_parts", "capture", "reproduces", "unsupported_reason"]

PARTS = ("q", "k", "v", "out")


def unsupported_reason(module: nn.Module) -> str:
    """Why this attention module's projections cannot be factored here ('' if they can)."""
    if type(module) is not nn.MultiheadAttention:
        return f"{type(module).__name__} is not nn.MultiheadAttention"
    if not module._qkv_same_embed_dim:
        return "MultiheadAttention with separate kdim / vdim projections"
    if module.bias_k is not None or module.add_zero_attn:
        return "MultiheadAttention with add_bias_kv or add_zero_attn"
    return ""


class AttentionPart(LinearAdapter):
    """One block of an attention module, read as a Linear layer (E outputs, E inputs + bias)
    whose tokens and output gradients :meth:`part_data` derives from the module's capture."""

    kind = "attention"
    module_types = ()

    def __init__(self, module: nn.MultiheadAttention, part: str):
        super().__init__(module)
        self.part = part

    @property
    def out_features(self) -> int:
        return self.module.embed_dim

    @property
    def in_features(self) -> int:
        return self.module.embed_dim

    def has(self, role: str) -> bool:
        if role != "bias":
            return True
        bias = self.module.out_proj.bias if self.part == "out" else self.module.in_proj_bias
        return bias is not None

    def part_data(self, record, grads: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (b, T, E), output gradients (K, b, T, E)) of this block, from the module's
        capture ``record`` and the gradients ``grads`` (K, *output shape) of its output; the
        module's four blocks share one computation through ``cache``."""
        key = id(self.module)
        if key not in cache:
            cache[key] = _blocks(self.module, record, grads)
        return cache[key][self.part]


def attention_parts(module_name: str, module: nn.MultiheadAttention, offsets: dict) -> list:
    """(name, AttentionPart, weight slice, bias slice) of each block whose weight is trainable."""
    prefix = f"{module_name}." if module_name else ""
    E = module.embed_dim
    parts = []
    weight, bias = offsets.get(prefix + "in_proj_weight"), offsets.get(prefix + "in_proj_bias")
    if weight is not None:
        for i, part in enumerate(("q", "k", "v")):
            w = (weight[0] + i * E * E, weight[0] + (i + 1) * E * E)
            b = None if bias is None else (bias[0] + i * E, bias[0] + (i + 1) * E)
            parts.append((f"{prefix}in_proj[{part}]", AttentionPart(module, part), w, b))
    weight = offsets.get(prefix + "out_proj.weight")
    if weight is not None:
        parts.append((f"{prefix}out_proj", AttentionPart(module, "out"), weight,
                      offsets.get(prefix + "out_proj.bias")))
    return parts


def _call_arguments(module, record):
    """The module's forward arguments by name (query, key, value, masks, is_causal)."""
    args, kwargs = record[0], record[1]
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _attend(module, q, k, v, arguments, in_weights, in_bias, out_weight, out_bias):
    """F.multi_head_attention_forward in (T, b, E) layout with the arguments the module was
    called with (it canonicalises the masks itself, as the module's forward does)."""
    return F.multi_head_attention_forward(
        q, k, v, module.embed_dim, module.num_heads, None, in_bias, None, None, False, 0.0, out_weight, out_bias,
        training=False, key_padding_mask=arguments["key_padding_mask"], need_weights=False,
        attn_mask=arguments["attn_mask"], use_separate_proj_weight=True, q_proj_weight=in_weights[0],
        k_proj_weight=in_weights[1], v_proj_weight=in_weights[2], is_causal=arguments["is_causal"])[0]


def reproduces(module, record, output) -> bool:
    """Whether the recomputation from the capture gives the module's output (checked once per
    model: a configuration it does not reproduce keeps the exact GNH diagonal)."""
    arguments = _call_arguments(module, record)
    q, k, v = (arguments[n].detach() for n in ("query", "key", "value"))
    if q.dim() != 3:
        return False
    if module.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    weights = record[2]
    with torch.no_grad():
        out = _attend(module, q, k, v, arguments, weights["in_proj_weight"].chunk(3), weights["in_proj_bias"],
                      weights["out_proj.weight"], weights["out_proj.bias"])
    out = out.transpose(0, 1) if module.batch_first else out
    scale = output.abs().max().clamp_min(1e-30)
    return bool(out.shape == output.shape and (out - output).abs().max() <= 1e-5 * scale)


def capture(module, args, kwargs) -> tuple:
    """What a forward hook keeps of an attention call: its arguments and the weights it used
    (under torch.func.functional_call, the values swapped in for the call)."""
    weights = {"in_proj_weight": module.in_proj_weight, "in_proj_bias": module.in_proj_bias,
               "out_proj.weight": module.out_proj.weight, "out_proj.bias": module.out_proj.bias}
    return args, kwargs, {k: None if v is None else v.detach() for k, v in weights.items()}


def _blocks(module, record, grads):
    """Every block's (inputs (b, T, E), output gradients (K, b, T, E))."""
    arguments = _call_arguments(module, record)
    first = module.batch_first
    q_in, k_in, v_in = (arguments[n].detach() for n in ("query", "key", "value"))
    if q_in.dim() == 2:
        raise NotImplementedError("unbatched attention inputs")
    if first:  # the functional form takes (T, b, E)
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
        grads = grads.transpose(1, 2)
    W, b = record[2]["in_proj_weight"], record[2]["in_proj_bias"]
    Wo, bo = record[2]["out_proj.weight"], record[2]["out_proj.bias"]
    E = module.embed_dim
    eye = torch.eye(E, dtype=q_in.dtype, device=q_in.device)
    biases = (None,) * 3 if b is None else b.chunk(3)
    projected = [F.linear(x, w, bias) for x, w, bias in zip((q_in, k_in, v_in), W.chunk(3), biases)]
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in projected]
        out = _attend(module, *leaves, arguments, (eye, eye, eye), None, Wo, bo)
        try:
            pulled = torch.autograd.grad(out, leaves, grads, is_grads_batched=True)
        except RuntimeError as exc:  # an op without a batching rule: one backward per pseudo-gradient
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            rows = [torch.autograd.grad(out, leaves, g, retain_graph=True) for g in grads]
            pulled = [torch.stack(r) for r in zip(*rows)]
    with torch.no_grad():
        context = _attend(module, *projected, arguments, (eye, eye, eye), None, eye, None)

    def batch_major(t, lead=0):  # (.., T, b, E) -> (.., b, T, E)
        return t.transpose(lead, lead + 1)

    return {"q": (batch_major(q_in), batch_major(pulled[0].detach(), 1)),
            "k": (batch_major(k_in), batch_major(pulled[1].detach(), 1)),
            "v": (batch_major(v_in), batch_major(pulled[2].detach(), 1)),
            "out": (batch_major(context), batch_major(grads, 1))}
