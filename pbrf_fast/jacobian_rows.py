"""Rows of the output Jacobian, J_i = d f(theta, x_i) / d theta, a chunk of examples at a time.

The output-space solver needs every row of J: N*C of them, each d wide. Two ways to get a
chunk's rows, (b*C, d) ordered (example, output):

* ``"layers"``: when every trainable parameter sits in a Conv2d (groups = 1, zero padding),
  Linear or eval-mode BatchNorm1d/2d (running statistics) that runs once per forward pass,
  one forward pass with hooks over the chunk repeated C times (C*b images) keeps each layer's
  input and output, and ONE ordinary backward pass with cotangent e_c on the c-th copy gives
  each layer's output gradients delta (b, C, ...) for all C outputs: every transposed
  convolution runs once on a batch of C*b. ``FORWARD = "once"`` instead runs one forward over
  the chunk and C backward passes through that graph: (C - 1) forwards fewer, but at 2
  threads its small-batch transposed convolutions ran slower than the forwards saved
  (measured, see ``FORWARD``). (Autograd's ``is_grads_batched`` would spare the repeated
  forward too, but its vmap runs ``convolution_backward`` once per output and stacks the
  results: 3.4x the CPU time, profiled on 16 ResNet-20 images.) A layer's rows are then
  per-example products of delta with its input: for a conv, the C outputs' deltas stacked as C*C_out channels times the
  unfolded patches, (C*C_out, positions) @ (positions, C_in*k*k), one batched GEMM per layer
  writing the rows' layout directly (measured as fast as the per-kernel-offset GEMMs of
  ``conv2d_weight_gradient_blocks``, which would need a strided scatter into the rows); for
  BatchNorm, sums of delta * x_hat and of delta. No per-example weight-gradient convolution
  is run (that is what ``vmap(jacrev)`` does, one small convolution per example and output).
* ``"torch.func"``: any other model, ``vmap`` over the chunk of ``jacrev`` of one example.

The first chunk's layer rows are checked against one plain vector-Jacobian product of a
random output combination (one backward pass): a model that reads a parameter outside its
module's forward, or changes a layer's input in place, falls back to torch.func rows instead
of giving wrong ones (``reason`` says why).
"""
from __future__ import annotations

import torch

from . import autodiff
from .errors import InputError
from .layers import adapter_for, forward_hooks

__all__ = ["JacobianRows"]

# How a chunk's C output-gradient passes get their forward graph: "replicated" (one forward
# over the chunk repeated C times, one backward with e_k on copy k) or "once" (one forward
# over the chunk, C backward passes through its graph: (C - 1) forwards fewer). Measured on
# ResNet-20 (bench/results/gnh-speed.md): at 2 threads the C small-batch backward passes of
# "once" ran their convolution_backward 2.3x slower per image than replicated's one pass
# over C*b images, more than the forwards it saves (replicated 1.26-1.89x faster in 4 of 6
# runs, equal in one, 1.29x slower in one); at 1 thread "once" was 1.38x faster (one profile).
FORWARD = "replicated"


class _CalledTwice(Exception):
    """A hooked layer ran twice in one forward pass (shared weights): rows need torch.func."""


class JacobianRows:
    """Per-example output-Jacobian rows of a :class:`~pbrf_fast.Problem` at its current theta.

    ``chunk_bytes`` bounds one chunk's transient memory (rows, layer activations, their
    C-fold output gradients and conv patches), which sets :attr:`examples_per_chunk`.
    """

    def __init__(self, problem, chunk_bytes: int):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise InputError(f"chunk_bytes must be a positive integer number of bytes, got {chunk_bytes!r}")
        self.problem = problem
        self.num_outputs = problem.num_outputs
        self.checked = False
        self.layers, self.reason = self._layer_slots()
        self.source = "layers" if self.layers is not None else "torch.func"
        per_example = self._bytes_per_example()
        self.examples_per_chunk = max(1, min(problem.n, chunk_bytes // per_example))

    # --------------------------------------------------------------- structure
    def _layer_slots(self):
        """[(module, {"weight": (lo, hi), "bias": (lo, hi)})] covering theta, or (None, why not)."""
        p = self.problem
        offsets = p.param_ranges
        layers, covered = [], set()
        for mod_name, module in p.model.named_modules():
            own = [(k, q) for k, q in module.named_parameters(recurse=False) if q.requires_grad]
            if not own:
                continue
            full = {k: f"{mod_name}.{k}" if mod_name else k for k, _ in own}
            adapter, why = adapter_for(module)
            if adapter is None and not why.endswith("has no layer adapter"):
                return None, f"{why} ({mod_name!r})"
            if adapter is None or set(full) - set(adapter.roles):
                return None, f"trainable parameters in {type(module).__name__} {mod_name!r}"
            why = adapter.batch_coupling_reason()
            if why:
                return None, f"{why} ({mod_name!r})"
            if any(name not in offsets or name in covered for name in full.values()):
                return None, f"parameters of {mod_name!r} are shared with another module"
            covered.update(full.values())
            layers.append((adapter, {k: offsets[name] for k, name in full.items()}))
        if covered != set(offsets):
            return None, f"parameters outside any module's own: {sorted(set(offsets) - covered)[:3]}"
        return layers, "every trainable parameter in a layer with an adapter (pbrf_fast.layers)"

    def _bytes_per_example(self) -> int:
        """Transient bytes per example of one chunk, from one example's forward pass."""
        p, c = self.problem, self.num_outputs
        item = p.theta.element_size()
        rows = 2 * c * p.dim * item  # the rows and one layer's block before it is copied in
        if self.layers is None:  # jacrev: C backward passes' worth of activations per example
            return rows + 4 * c * p.dim * item
        sizes = []

        def hook(module, args, out):
            n_in, n_out = args[0][0].numel(), out[0].numel()
            if FORWARD == "replicated":  # C copies of input and output (kept by autograd), out's gradients
                sizes.append((n_in + 2 * n_out) * c)
            else:  # input, output and its copy once; C output gradients and their (b, C) transpose
                sizes.append(n_in + 3 * n_out + 2 * c * n_out)

        with forward_hooks([a.module for a, _ in self.layers], hook), torch.no_grad():
            p.forward(p.theta, p.inputs[:1])
        return rows + sum(sizes) * item

    # -------------------------------------------------------------------- rows
    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of J for the examples x: (b*C, d) in the problem's dtype, ordered (example, output).

        ``out``: a contiguous (b*C, d) tensor to write them into (a slice of the caller's kept
        panel), which spares a copy of every row and the page faults of a fresh buffer per chunk."""
        p = self.problem
        if out is not None and (out.shape != (len(x) * self.num_outputs, p.dim) or out.dtype != p.theta.dtype
                                or not out.is_contiguous()):
            raise InputError(f"out must be a contiguous ({len(x) * self.num_outputs}, {p.dim}) "
                             f"{p.theta.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
        if self.source == "layers":
            try:
                rows = self._layer_rows(x, check=not self.checked, out=out)
                if rows is not None:
                    self.checked = True
                    return rows
            except _CalledTwice:
                self.reason = "a Conv2d / Linear / BatchNorm layer runs more than once per forward pass"
            self.source = "torch.func"
        rows = self._func_rows(x)
        return rows if out is None else out.copy_(rows)

    def _func_rows(self, x):
        p = self.problem
        return autodiff.example_jacobians(p.forward, p.theta, x)

    def _capture(self, x):
        """Forward pass with hooks: outputs y, each layer's (input, output) and the grad-enabled theta."""
        captured = {}

        def hook(module, args, out):
            if module in captured:
                raise _CalledTwice
            captured[module] = (args[0].detach(), out)
            # later layers get a copy, so an in-place op downstream (ReLU(inplace=True)) cannot
            # change the tensor whose gradient is asked for
            return out.clone()

        handles = [a.module.register_forward_hook(hook) for a, _ in self.layers]
        theta = self.problem.theta.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                y = self.problem.forward(theta, x)
        finally:
            for h in handles:
                h.remove()
        return y, captured, theta

    def _layer_rows(self, x, check: bool, out=None):
        b, c = len(x), self.num_outputs
        modules = [a.module for a, _ in self.layers]
        if FORWARD == "replicated":
            y, captured, theta = self._capture(x.repeat(c, *([1] * (x.dim() - 1))))  # copy k: rows k*b..
            if any(m not in captured for m in modules):
                self.reason = "a layer with trainable parameters did not run in the forward pass"
                return None
            outs = [captured[m][1] for m in modules]
            cotangent = torch.eye(c, dtype=y.dtype, device=y.device).repeat_interleave(b, 0)  # e_k on copy k
            grads = torch.autograd.grad(y, outs, cotangent, retain_graph=check, allow_unused=True)
            grads = [None if g is None else g.detach().reshape(c, b, *g.shape[1:]).transpose(0, 1) for g in grads]
            y = y[:b]
        else:
            y, captured, theta = self._capture(x)
            if any(m not in captured for m in modules):
                self.reason = "a layer with trainable parameters did not run in the forward pass"
                return None
            grads = _output_gradients(y, [captured[m][1] for m in modules], keep_graph=check)
        # every slot is written
        rows = torch.empty(b, c, self.problem.dim, dtype=y.dtype, device=y.device) if out is None else out.view(b, c, -1)
        for (adapter, slots), g in zip(self.layers, grads):
            if g is None:  # the layer does not reach the outputs
                for lo, hi in slots.values():
                    rows[:, :, lo:hi] = 0
                continue
            blocks = adapter.jacobian_rows(captured[adapter.module][0][:b], g, tuple(slots))
            for role, (lo, hi) in slots.items():
                rows[:, :, lo:hi] = blocks[role]
        if check and not self._agrees(y, theta, rows):
            return None
        return rows.reshape(b * c, -1)

    def _agrees(self, y, theta, rows) -> bool:
        """rows^T u equals the vjp of u for one random u: catches any parameter use the hooks missed."""
        gen = torch.Generator(device=y.device).manual_seed(0)
        u = torch.randn(y.shape, generator=gen, dtype=y.dtype, device=y.device)
        (expected,) = torch.autograd.grad(y, theta, u)
        got = torch.einsum("bcd,bc->d", rows, u)
        tol = 1e-4 if y.dtype in (torch.float32, torch.bfloat16, torch.float16) else 1e-9
        if float((got - expected).norm()) <= tol * float(expected.norm()) + 1e-30:
            return True
        self.reason = "layer rows disagree with a vector-Jacobian product (a parameter used outside its layer?)"
        return False


def _output_gradients(y, outs, keep_graph: bool):
    """d y_k / d out for every layer output and every k, as (b, C, *out.shape[1:]) per layer
    (None where a layer does not reach y): C backward passes through ONE forward graph, each
    output's gradients written into its slot of a buffer kept per layer, in the (example,
    output) order the per-example GEMMs read (no transposing copy later)."""
    b, c = y.shape
    buffers = [None] * len(outs)
    for k in range(c):
        cotangent = torch.zeros_like(y)
        cotangent[:, k] = 1
        grads = torch.autograd.grad(y, outs, cotangent, retain_graph=keep_graph or k < c - 1, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if buffers[i] is None:
                buffers[i] = g.new_empty((b, c, *g.shape[1:]))
            buffers[i][:, k].copy_(g)
    return buffers
