"""Exact damped-GNH solves in output space (the Woodbury identity).

With the output Hessian factored as H_i = L_i L_i^T and K = [L_i^T J_i] stacked
over the N training examples (N*C rows, d columns), the data term is
G = K^T K / N, and for shift s = weight_decay + damping > 0

    (G + s I)^{-1} V = (V - K^T (N s I + K K^T)^{-1} K V) / s.

When N*C is much smaller than d (the paper's UCI experiments: 930 outputs vs
17,793 parameters) this is exact and cheap. K is never formed:

* K V  = L^T (J V)   - one batched jvp over the training set;
* K^T W = J^T (L W)  - one batched vjp;
* K K^T = L^T Theta L, with Theta = J J^T the Jacobian Gram matrix, computed in
  float64. For networks whose trainable parameters all sit in ``nn.Linear``
  layers, Theta is summed layer by layer from activations and output gradients
  ((Delta Delta^T) * (A A^T + 1)), which costs N^2 (fan_in + fan_out) per layer
  instead of N^2 fan_in fan_out. Other models (convolutional networks) form
  J's rows explicitly, a chunk of examples at a time (:mod:`pbrf_fast.jacobian_rows`),
  and Theta is one GEMM over them (below); J V and J^T W then come from the same rows.

Theta from J's rows (the N*C x d matrix): the GEMM is the cost (ResNet-20, 500
images: 5,000^2 x 270k = 6.7e12 multiply-adds), so

* only the upper triangle is computed (recursive halving: two diagonal halves and
  one off-diagonal GEMM, down to tiles), then mirrored: ~half the flops;
* float32 rows are multiplied in float32 (twice float64's rate on CPU) over column
  slices of ``_GEMM_SLICE`` parameters, the slices summed in float64, so the
  rounding error is that of an 8k-long float32 dot product, not a 270k-long one;
  float64 models multiply in float64;
* the rows are kept in memory when they fit ``memory_bytes`` (one pass; J V of the
  test vectors is taken from them in the same pass); otherwise a panel of them is
  kept, and the rows after it are recomputed chunk by chunk against it.

The Gram matrix is factorised once per parameter vector (Cholesky per shift;
an eigendecomposition once a second shift is asked for, after which every
damping value is free) and cached on the operator.
"""
from __future__ import annotations

import warnings

import torch

from .. import autodiff
from ..curvatures import CurvatureOperator
from ..errors import InputError, SlowPathWarning
from ..jacobian_rows import JacobianRows
from ..layers import adapter_for

__all__ = ["OutputSpaceSolver", "jacobian_gram", "output_hessian_factors", "JACOBIAN_ROWS_BYTES",
           "default_rows_bytes"]

# Memory for J's rows (kept panel + one chunk in flight) where the free memory cannot be read:
# the same 4 GiB as inverses.KERNEL_MEMORY_BYTES, which sizes the Gram matrices (importing it
# would be a cycle). Otherwise the budget is :func:`default_rows_bytes`.
JACOBIAN_ROWS_BYTES = 4 << 30
# The share of the memory free at the start that the rows may take by default: recomputing
# rows that miss the budget costs a pass over them per panel (ResNet-20, 500 images: 5.4 GB
# of rows, 172 of 500 examples recomputed under 4 GiB, ~25% of the rows' time), so the rows
# may take half of what is free; the half left covers the Gram matrices outside the budget
# (~5 x 8 (N C)^2 bytes: 1 GB at N C = 5,000) and others' growth on a shared box (3/4 was
# tried: a 500-image ResNet-20 run reached 6.8 GB and the kernel's OOM killer ended it when
# other processes grew meanwhile).
ROWS_SHARE_OF_FREE = 0.5
# float32 GEMMs run over this many parameters at a time, their results summed in float64.
_GEMM_SLICE = 8192
# Diagonal tiles of the upper-triangle Gram at or below this many rows are one GEMM.
_SYRK_TILE = 1024


def output_hessian_factors(loss_name: str, y: torch.Tensor) -> torch.Tensor:
    """L_i with L_i L_i^T = output Hessian, shape (b, C, C), from outputs y (b, C).

    MSE: I.  BCE: diag(sqrt(p (1 - p))).  Softmax CE: diag(sqrt p) - p sqrt(p)^T,
    since (diag(sqrt p) - p sqrt(p)^T)(diag(sqrt p) - sqrt(p) p^T) = diag(p) - p p^T
    when the p sum to one.
    """
    b, c = y.shape
    if loss_name == "mse":
        return torch.eye(c, dtype=y.dtype, device=y.device).expand(b, c, c)
    if loss_name == "bce":
        p = torch.sigmoid(y)
        return torch.diag_embed((p * (1 - p)).sqrt())
    if loss_name == "cross_entropy":
        p = torch.softmax(y, -1)
        root = p.sqrt()
        return torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)
    raise InputError(f"no closed-form output-Hessian factor for loss {loss_name!r}; use method='cg'")


def _gram_layers_cover(problem) -> list | None:
    """[(adapter, trainable roles)] of the layers whose Gram blocks come straight from their
    inputs and output gradients, if they hold every trainable parameter; else None."""
    layers, covered = [], set()
    for module_name, module in problem.model.named_modules():
        adapter, _ = adapter_for(module)
        if adapter is not None and adapter.supports_jacobian_gram:
            names = {p: f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)}
            roles = {p for p, q in module.named_parameters(recurse=False) if q.requires_grad}
            layers.append((adapter, roles))
            covered.update(names.values())
    return layers if covered >= set(problem.param_names) and layers else None


def _gram_by_layers(problem, x, layers, rows_x=None) -> torch.Tensor:
    """Theta = J J^T (float64) as the sum of each layer's block from hooked activations
    (:meth:`~pbrf_fast.layers.linear.LinearAdapter.jacobian_gram`)."""
    inputs, outputs, handles = {}, {}, []
    modules = [adapter.module for adapter, _ in layers]

    def hook(module, args, out):
        if module in inputs:  # a layer applied twice shares weights: no simple block form
            inputs[module] = torch.empty(0, 0, 0)
            return
        inputs[module], outputs[module] = args[0], out

    for m in modules:
        handles.append(m.register_forward_hook(hook))
    try:
        theta = problem.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            y = problem.forward(theta, x)
            b, c = y.shape
            if any(m not in inputs or inputs[m].dim() != 2 for m in modules):
                return None
            outs = [outputs[m] for m in modules]
            deltas = [[] for _ in modules]
            for k in range(c):
                cot = torch.zeros_like(y)
                cot[:, k] = 1.0
                grads = torch.autograd.grad(y, outs, cot, retain_graph=k < c - 1, allow_unused=True)
                for store, g, o in zip(deltas, grads, outs):
                    store.append(torch.zeros_like(o) if g is None else g)
    finally:
        for h in handles:
            h.remove()
    gram = torch.zeros(b, c, b, c, dtype=torch.float64, device=x.device)
    for (adapter, roles), store in zip(layers, deltas):
        gram += adapter.jacobian_gram(inputs[adapter.module].detach(), torch.stack(store, 1), roles)
    return gram.reshape(b * c, b * c)


def _gram_by_jacobians(problem, x) -> torch.Tensor:
    """Theta = J J^T from explicit per-example Jacobians (any model; O(N C d) memory)."""
    J = autodiff.example_jacobians(problem.forward, problem.theta, x).double()  # (b*C, d)
    return J @ J.T


def _free_bytes(device: torch.device) -> int | None:
    """Memory free now where the rows live: CUDA's free device memory, or the kernel's
    MemAvailable (page cache counted as free, as the kernel itself does); None if unreadable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_rows_bytes(device: torch.device | str = "cpu") -> int:
    """The row budget when the caller gives none: ``ROWS_SHARE_OF_FREE`` (half) of the memory
    free now on ``device``, or :data:`JACOBIAN_ROWS_BYTES` where that cannot be read."""
    free = _free_bytes(torch.device(device))
    return JACOBIAN_ROWS_BYTES if free is None else max(1, int(free * ROWS_SHARE_OF_FREE))


def _check_memory_bytes(memory_bytes, device: torch.device | str = "cpu") -> int:
    if memory_bytes is None:
        return default_rows_bytes(device)
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 1:
        raise InputError(f"memory_bytes must be a positive integer number of bytes, got {memory_bytes!r}")
    return memory_bytes


def _mm64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B^T in float64 (A (a, d), B (b, d)); float32 inputs by float32 GEMMs over column slices."""
    if A.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(len(A), len(B), dtype=torch.float64, device=A.device)
    part = torch.empty(len(A), len(B), dtype=A.dtype, device=A.device)
    for lo in range(0, A.shape[1], _GEMM_SLICE):
        torch.mm(A[:, lo:lo + _GEMM_SLICE], B[:, lo:lo + _GEMM_SLICE].T, out=part)
        out += part
    return out


def _upper_gram_into(A: torch.Tensor, out: torch.Tensor) -> None:
    """out's upper triangle (and some of its lower one) += A A^T, by recursive halving."""
    n = len(A)
    if n <= _SYRK_TILE:
        out += _mm64(A, A)
        return
    h = n // 2
    _upper_gram_into(A[:h], out[:h, :h])
    _upper_gram_into(A[h:], out[h:, h:])
    out[:h, h:] += _mm64(A[:h], A[h:])


# More passes over J's rows than this and a bigger budget is worth a warning.
_WARN_ROW_PASSES = 4


def _warn_if_rows_recomputed(n: int, panel: int, memory_bytes: int, per_example: int, gram_bytes: int) -> None:
    """Warn when the budget makes the Gram pass recompute J's rows many times over: with
    panels of p examples the rows are computed sum over panels of (p + examples after
    it) times, ~N / (2 p) passes, quadratic in N once the Gram matrix alone eats the budget."""
    panels = range(0, n, panel)
    passes = sum(min(panel, n - lo) + max(0, n - lo - panel) for lo in panels) / n
    if passes <= _WARN_ROW_PASSES:
        return
    # the budget with which panels of N / 2 examples fit: two passes
    enough = (gram_bytes + per_example * ((n + 1) // 2)) * 8 // 7 + 1
    warnings.warn(
        f"output-space solver: memory_bytes={memory_bytes / 2**30:.2f} GiB leaves room for J's rows of "
        f"{panel} example(s) at a time besides the {gram_bytes / 1e9:.2f} GB Gram matrix, so the rows are "
        f"computed ~{passes:.0f} times over; memory_bytes >= {enough / 2**30:.1f} GiB needs at most 2",
        SlowPathWarning, stacklevel=4)


class _RowStream:
    """J's rows over the training set, chunk by chunk, within ``memory_bytes``.

    A panel of consecutive examples' rows is kept (all of them when they fit), the
    rest recomputed when needed; see :func:`_gram_and_products`.
    """

    def __init__(self, problem, memory_bytes: int):
        self.problem = problem
        self.version = problem.version
        self.rows = JacobianRows(problem, chunk_bytes=max(1, memory_bytes // 8))
        self.chunk = self.rows.examples_per_chunk
        c, item = problem.num_outputs, problem.theta.element_size()
        gram_bytes = 8 * (problem.n * c) ** 2  # the float64 Gram matrix shares the budget
        room = memory_bytes - memory_bytes // 8 - gram_bytes
        per_example = c * problem.dim * item
        self.panel = max(self.chunk, room // per_example // self.chunk * self.chunk)
        self.kept = None  # all rows (N*C, d), once computed, when one panel holds them
        _warn_if_rows_recomputed(problem.n, self.panel, memory_bytes, per_example, gram_bytes)

    def compute(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.rows(self.problem.inputs[lo:hi], out=out)

    def chunks(self, lo: int = 0):
        """(first example, rows) for the chunks from example lo on."""
        c = self.problem.num_outputs
        for start in range(lo, self.problem.n, self.chunk):
            stop = min(start + self.chunk, self.problem.n)
            if self.kept is not None:
                yield start, self.kept[start * c:stop * c]
            else:
                yield start, self.compute(start, stop)


def _gram_and_products(stream: _RowStream, V: torch.Tensor | None = None):
    """Theta = J J^T (float64) and, for V (d, m), J V (N*C, m) float64, in one pass over J's rows.

    Panel by panel: the panel's rows are kept and give their diagonal block; every later chunk
    is computed once per earlier panel and gives its block of the panel's rows. The first
    panel's pass sees every row once, so J V is taken there.
    """
    p = stream.problem
    n, c = p.n, p.num_outputs
    theta = torch.zeros(n * c, n * c, dtype=torch.float64, device=p.device)
    JV = None if V is None else torch.zeros(n * c, V.shape[1], dtype=torch.float64, device=p.device)
    Vt = None if V is None else V.to(p.dtype).T
    buffer = None
    for lo in range(0, n, stream.panel):
        hi = min(n, lo + stream.panel)
        if buffer is None:
            buffer = torch.empty((hi - lo) * c, p.dim, dtype=p.dtype, device=p.device)
        panel = buffer[:(hi - lo) * c]
        for start in range(lo, hi, stream.chunk):
            stop = min(hi, start + stream.chunk)
            rows = panel[(start - lo) * c:(stop - lo) * c]
            stream.compute(start, stop, out=rows)  # written in place: no copy of the rows
            if JV is not None and lo == 0:
                JV[start * c:stop * c] = _mm64(rows, Vt)
        _upper_gram_into(panel, theta[lo * c:hi * c, lo * c:hi * c])
        for start, rows in stream.chunks(hi):
            theta[lo * c:hi * c, start * c:start * c + len(rows)] = _mm64(panel, rows)
            if JV is not None and lo == 0:
                JV[start * c:start * c + len(rows)] = _mm64(rows, Vt)
        if lo == 0 and hi == n:
            stream.kept = panel  # every row fits: later products reuse them
    _mirror_upper_(theta)
    return theta, JV


# Square blocks of the in-place symmetric fixes below: each step's temporaries are a few
# blocks, not (N C)^2 copies (at N C = 20,000 one copy is 3.2 GB of float64).
_MIRROR_BLOCK = 2048


def _mirror_upper_(theta: torch.Tensor) -> torch.Tensor:
    """theta's lower triangle := its upper one, transposed, in place (block by block)."""
    n = len(theta)
    for lo in range(0, n, _MIRROR_BLOCK):
        hi = min(n, lo + _MIRROR_BLOCK)
        block = theta[lo:hi, lo:hi]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
        theta[hi:, lo:hi] = theta[lo:hi, hi:].T
    return theta


def _symmetrize_(M: torch.Tensor) -> torch.Tensor:
    """M := (M + M^T) / 2 in place (block by block)."""
    n = len(M)
    for lo in range(0, n, _MIRROR_BLOCK):
        hi = min(n, lo + _MIRROR_BLOCK)
        block = M[lo:hi, lo:hi]
        block.copy_(0.5 * (block + block.T))
        for start in range(hi, n, _MIRROR_BLOCK):
            stop = min(n, start + _MIRROR_BLOCK)
            mean = 0.5 * (M[lo:hi, start:stop] + M[start:stop, lo:hi].T)
            M[lo:hi, start:stop] = mean
            M[start:stop, lo:hi] = mean.T
    return M


def jacobian_gram(problem, memory_bytes: int | None = None) -> torch.Tensor:
    """J J^T over all training outputs, (N*C, N*C) in float64, rows ordered (example, output).

    ``memory_bytes`` bounds J's rows held at once for models beyond Linear layers
    (default :func:`default_rows_bytes`: half the memory free now).
    """
    memory_bytes = _check_memory_bytes(memory_bytes, problem.device)
    layers = _gram_layers_cover(problem)
    if layers is not None:
        gram = _gram_by_layers(problem, problem.inputs, layers)
        if gram is not None:
            return gram
    return _gram_and_products(_RowStream(problem, memory_bytes))[0]


class OutputSpaceSolver:
    """Exact (G + s I)^{-1} for a GaussNewton operator through an N*C x N*C system.

    ``memory_bytes`` bounds J's rows held at once for models beyond Linear layers
    (default :func:`default_rows_bytes`: half the memory free when the solver is built);
    within it they are kept for the solver's life.
    """

    def __init__(self, op: CurvatureOperator, memory_bytes: int | None = None):
        if op.kind != "gnh":
            raise InputError("the output-space (kernel) solver needs curvature='gnh'")
        if op.shift <= 0:
            raise InputError("the output-space (kernel) solver needs weight_decay + damping > 0")
        self.op = op
        self.problem = op.problem
        self.memory_bytes = _check_memory_bytes(memory_bytes, self.problem.device)
        self._stream = None

    # ------------------------------------------------------------ factors
    def _state(self) -> dict:
        return self.op._cached("output_space", lambda: self._build_state()[0])

    def _state_and_products(self, V: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The cached state and J V (N, C, m); a state built now shares its pass over J's rows with J V."""
        fused = {}

        def build():
            state, fused["JV"] = self._build_state(V)
            return state

        state = self.op._cached("output_space", build)
        JV = fused.get("JV")
        return state, (self.jacobian_products(V) if JV is None else JV)

    def _row_stream(self) -> _RowStream:
        if self._stream is None or self._stream.version != self.problem.version:  # kept rows go stale
            self._stream = _RowStream(self.problem, self.memory_bytes)
        return self._stream

    def _build_state(self, V: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
        p = self.problem
        y = p.outputs().double()
        if p.loss.kernel_kind is None:  # what the loss is, not what it is called
            raise InputError(f"the output-space solver needs a built-in loss's closed-form output Hessian; "
                             f"{p.loss!r} has none: use method='cg' or 'direct'")
        L = output_hessian_factors(p.loss.kernel_kind, y)      # (N, C, C)
        n, c = y.shape
        theta, JV, path = None, None, "rows"
        layers = _gram_layers_cover(p)
        if layers is not None:
            theta, path = _gram_by_layers(p, p.inputs, layers), "layers"
        if theta is None:  # J's rows: J V of the caller's vectors comes from the same pass
            path = "rows"
            theta, JV = _gram_and_products(self._row_stream(), None if V is None else V.reshape(p.dim, -1))
            JV = None if JV is None else JV.reshape(n, c, -1)
        theta4 = theta.reshape(n, c, n, c)
        # M = L^T Theta L per example pair, a band of examples at a time (one einsum over all
        # of Theta would hold (N C)^2 intermediates besides M)
        M = torch.empty(n * c, n * c, dtype=torch.float64, device=theta.device)
        step = max(1, _MIRROR_BLOCK // c)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            M.view(n, c, n, c)[lo:hi] = torch.einsum("ikc,ikjl,jld->icjd", L[lo:hi], theta4[lo:hi], L)
        state = {"L": L, "theta": theta, "gram": _symmetrize_(M), "cholesky": {}, "eigh": None, "path": path}
        return state, JV
    def _solve_gram(self, rhs: torch.Tensor) -> torch.Tensor:
        """(N s I + K K^T)^{-1} rhs in float64."""
        state, n, s = self._state(), self.problem.n, self.op.shift
        if state["eigh"] is None and (state["cholesky"] and s not in state["cholesky"]):
            state["eigh"] = torch.linalg.eigh(state["gram"])  # a second shift: one eigh serves all
        if state["eigh"] is not None:
            evals, evecs = state["eigh"]
            return evecs @ ((evecs.T @ rhs) / (n * s + evals).unsqueeze(1))
        if s not in state["cholesky"]:
            A = state["gram"] + n * s * torch.eye(len(rhs), dtype=torch.float64, device=rhs.device)
            state["cholesky"][s] = torch.linalg.cholesky(A)
        return torch.cholesky_solve(rhs, state["cholesky"][s])

    # ------------------------------------------------- Jacobian products
    def jacobian_products(self, V: torch.Tensor) -> torch.Tensor:
        """J V over all training examples: (N, C, m) in float64."""
        p = self.problem
        V = V.to(p.dtype)
        if self._state()["path"] == "rows":  # a jvp per column would cost m passes, the rows C
            c, Vt = p.num_outputs, V.reshape(p.dim, -1).T
            JV = torch.cat([_mm64(rows, Vt) for _, rows in self._row_stream().chunks()])
            return JV.reshape(p.n, c, -1)
        parts = []
        for chunk in p.batches():
            x, _ = p.batch(chunk)

            JV = autodiff.output_tangents(lambda th: p.forward(th, x), p.theta, V.T)  # fallbacks included
            parts.append(JV.permute(1, 2, 0).double())
        return torch.cat(parts)

    def jacobian_transpose_products(self, W: torch.Tensor) -> torch.Tensor:
        """J^T W for W of shape (N, C, m): (d, m) in the problem's dtype."""
        p = self.problem
        out = torch.zeros(p.dim, W.shape[-1], dtype=torch.float64, device=p.device)
        if self._state()["path"] == "rows":
            c = p.num_outputs
            for start, rows in self._row_stream().chunks():
                w = W[start:start + len(rows) // c].reshape(len(rows), -1).to(p.dtype)
                out += (rows.T @ w).double()
            return out
        for chunk in p.batches():
            x, _ = p.batch(chunk)
            cot = W[chunk.to(W.device)].to(p.dtype).permute(2, 0, 1)  # (m, b, C)
            out += autodiff.vjp_rows(lambda th: p.forward(th, x), p.theta, cot).T.double()
        return out

    # ------------------------------------------------------------- solves
    def _output_weights(self, JV: torch.Tensor) -> torch.Tensor:
        """L W with W = (N s I + K K^T)^{-1} K V, from J V: (N, C, m)."""
        L = self._state()["L"]
        KV = torch.einsum("ikc,ikm->icm", L, JV)
        n, c, m = KV.shape
        W = self._solve_gram(KV.reshape(n * c, m)).reshape(n, c, m)
        return torch.einsum("ick,ikm->icm", L, W)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """(G + s I)^{-1} B for B of shape (d, m)."""
        LW = self._output_weights(self._state_and_products(B)[1])
        X = (B.double() - self.jacobian_transpose_products(LW)) / self.op.shift
        return X.to(B.dtype)

    def training_scores(self, V: torch.Tensor) -> torch.Tensor:
        """(1/N) grad L_i^T (G + s I)^{-1} V for every training example: (N, m).

        Uses g_i = J_i^T r_i (r_i = dL/dy_i), so g_i^T X = r_i^T (J X)_i and
        J X = (J V - Theta L W) / s: no per-example gradient, no J^T product.
        """
        p = self.problem
        JV = self._state_and_products(V)[1]
        LW = self._output_weights(JV)
        n, c, m = JV.shape
        JX = (JV - (self._state()["theta"] @ LW.reshape(n * c, m)).reshape(n, c, m)) / self.op.shift
        residual = p.loss.grad(p.outputs(), p.targets).double()  # (N, C)
        return (torch.einsum("ic,icm->im", residual, JX) / n).to(p.dtype)
