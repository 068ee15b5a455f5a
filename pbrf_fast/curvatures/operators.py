"""Curvature of J as damped linear operators: the Gauss-Newton Hessian and the Hessian.

Both operators act on a block of vectors ``V`` of shape ``(d,)`` or ``(d, m)``
and compute, over the whole training set or over a batch of indices,

    (C + weight_decay * I + damping * I) V,   C = 1/|B| sum_{i in B} C_i

with ``C_i = J_i^T H_i J_i`` (GNH) or the per-example loss Hessian. The m
columns are pushed through the network together (torch.func.vmap over the
tangents), and no Jacobian is ever formed: the GNH product is
jvp -> output-Hessian product -> vjp.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import autodiff
from ..problem import Problem, as_index
from ..products import GnhProducts
from ..errors import InputError, InputTypeError, SlowPathWarning

__all__ = ["CurvatureOperator", "GaussNewton", "Hessian"]


class CurvatureOperator:
    """A symmetric ``d x d`` linear operator built from a :class:`Problem`.

    Subclasses implement ``_batch_sum(V, x, t) = sum_{i in batch} C_i V``.
    Operators made by :meth:`with_damping` share one cache (dense matrix,
    eigendecomposition), so a sweep over damping values factorises once.
    """

    kind = "curvature"

    def __init__(self, problem: Problem, damping: float = 0.0, *, batch_size: int | None = None,
                 _cache: dict | None = None):
        damping = float(damping)
        if not math.isfinite(damping) or damping < 0:
            raise InputError(f"damping must be finite and >= 0, got {damping}")
        # (C + damping I) V must stay finite in the parameters' dtype, with room for the sum
        largest = torch.finfo(problem.dtype).max ** 0.5
        if damping > largest:
            raise InputError(f"damping {damping:g} overflows {problem.dtype} products; it must be below "
                             f"{largest:.3g} (in float32, pick a damping near the curvature's scale)")
        self.problem = problem
        self.damping = damping
        self.batch_size = batch_size or problem.batch_size
        self._cache = {} if _cache is None else _cache

    # ------------------------------------------------------------ protocol
    # Every curvature (pbrf_fast.curvatures.CURVATURES) answers these: a product (matvec), what
    # it covers, and the state a long job saves to resume without recomputing it. An optional
    # exact inverse is ``inverse_matvec`` (K-FAC / EK-FAC), absent here.
    @property
    def coverage(self) -> dict:
        """Which parameters the operator treats how: all of them exactly, here."""
        return {"exact": [name for name, _ in self.problem.model.named_parameters()]}

    def state_dict(self) -> dict:
        """What must be saved to rebuild this operator without recomputation (none: products
        are computed from the problem each time)."""
        return {}

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.problem.dim

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        return self.problem.device

    @property
    def num_examples(self) -> int:
        """Training examples the curvature averages over (all processes' together)."""
        return self.problem.n

    # True for an operator whose data is sharded across torch.distributed processes.
    spans_processes = False

    @property
    def shift(self) -> float:
        """The multiple of the identity added to the data term: weight decay + damping."""
        return self.problem.weight_decay + self.damping

    def with_damping(self, damping: float) -> "CurvatureOperator":
        return type(self)(self.problem, damping, batch_size=self.batch_size, _cache=self._cache)

    # --------------------------------------------------------------- products
    def _batch_sum(self, V: torch.Tensor, x: torch.Tensor, t: torch.Tensor, slot=None) -> torch.Tensor:
        raise NotImplementedError

    def check_vectors(self, V: torch.Tensor) -> torch.Tensor:
        """Validate a (d,) or (d, m) block and return it as (d, m)."""
        if not isinstance(V, torch.Tensor):
            raise InputTypeError(f"vectors must be a torch.Tensor, got {type(V).__name__}")
        if V.dim() not in (1, 2) or V.shape[0] != self.dim:
            raise InputError(f"vectors must have shape ({self.dim},) or ({self.dim}, m); got {tuple(V.shape)}")
        if V.dtype != self.dtype or V.device != self.device:
            raise InputError(
                f"vectors must be {self.dtype} on {self.device} like the parameters; "
                f"got {V.dtype} on {V.device}"
            )
        return V.unsqueeze(1) if V.dim() == 1 else V

    def data_matvec(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        """Mean over the data (or over ``idx``) of C_i V, without weight decay or damping."""
        V2 = self.check_vectors(V)
        problem = self.problem
        if idx is None:  # all data: contiguous slices, no gather copies
            step, count = self.batch_size, problem.n
            # slot: which slice of the data a chunk is, so per-slice state can be cached. A list
            # of views, not a generator: resuming one would call back here after each product.
            chunks = [(s, problem.inputs[s : s + step], problem.targets[s : s + step])
                      for s in range(0, count, step)]
        else:
            idx, rows = self._index_rows(idx)
            count = idx.shape[0]
            chunks = [(None, *rows)] if rows is not None else \
                ((None, problem.inputs[c], problem.targets[c]) for c in idx.split(self.batch_size))
        # Autograd is switched off only where a graph could be recorded: entering no_grad is
        # ~3 us of a ~20 us small product, and with neither V nor theta requiring grad no op
        # below records one (the torch.func paths enable grad themselves and detach).
        if V2.requires_grad or problem.theta.requires_grad:
            with torch.no_grad():
                total = self._chunk_sum(V2, chunks)
        else:
            total = self._chunk_sum(V2, chunks)
        # by the reciprocal: a multiply is a fraction of a divide's time (within an ulp of it)
        total.mul_(1.0 / count)
        # a (d, m) V's product is already its shape: no reshape call (~5 us of a small product)
        return total if V.dim() == 2 else total.reshape(V.shape)

    def _chunk_sum(self, V2, chunks):
        if isinstance(chunks, list) and len(chunks) == 1:  # one gathered batch: no loop
            slot, x, t = chunks[0]
            return self._batch_sum(V2, x, t, slot=slot)
        total = None
        for slot, x, t in chunks:
            part = self._batch_sum(V2, x, t, slot=slot)
            total = part if total is None else total.add_(part)
        return total

    def _index_rows(self, idx):
        """``idx`` normalised (once: as_index checks it here, at the public boundary) and, for a
        batch of one chunk, its gathered (inputs, targets) rows (else None). Solvers and
        benchmarks pass the same index tensor product after product: it is normalised and
        gathered once while neither it nor the data change (tensor version counters)."""
        problem = self.problem
        version = idx._version if isinstance(idx, torch.Tensor) else None
        data = (problem.inputs, problem.inputs._version, problem.targets, problem.targets._version)
        kept = self.__dict__.get("_last_index")
        if (kept is not None and kept[0] is idx and kept[1] == version and kept[2][0] is data[0]
                and kept[2][2] is data[2] and kept[2][1::2] == data[1::2]):
            return kept[3], kept[4]
        index = as_index(idx, problem.n, problem.device)
        if len(index) == 0:
            raise InputError("empty index batch")
        rows = (problem.inputs[index], problem.targets[index]) if len(index) <= self.batch_size else None
        if isinstance(idx, (torch.Tensor, range, tuple)):  # immutable, or versioned: safe to reuse
            self._last_index = (idx, version, data, index, rows)
        return index, rows

    def undamped_matvec(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        """(C + weight_decay I) V: the curvature of J itself, no damping."""
        return self.data_matvec(V, idx).add_(V, alpha=self.problem.weight_decay)

    def matvec(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        """(C + (weight_decay + damping) I) V over all data, or the mini-batch ``idx``."""
        # in place on the fresh product: no second (d, m) temporary
        return self.data_matvec(V, idx).add_(V, alpha=self.shift)

    matmat = matvec

    def __matmul__(self, V):
        return self.matvec(V)

    # ------------------------------------------------------------ dense forms
    def _cached(self, key, build):
        entry = self._cache.get(key)
        if entry is None or entry[0] != self.problem.version:
            entry = (self.problem.version, build())
            self._cache[key] = entry
        return entry[1]

    def dense_data(self) -> torch.Tensor:
        """The data term C as a dense symmetric matrix (d x d; small d only), cached."""

        def build():
            d = self.dim
            step = max(1, min(d, (1 << 24) // max(d, 1)))
            cols = []
            for start in range(0, d, step):
                eye = torch.zeros(d, min(step, d - start), dtype=self.dtype, device=self.device)
                eye[start : start + eye.shape[1]].fill_diagonal_(1.0)
                cols.append(self.data_matvec(eye))
            C = torch.cat(cols, 1)
            return 0.5 * (C + C.T)

        return self._cached("dense", build)

    def dense(self) -> torch.Tensor:
        """The damped operator as a dense matrix (d x d)."""
        C = self.dense_data()
        return C + self.shift * torch.eye(self.dim, dtype=C.dtype, device=C.device)

    def eigh_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs of C in float64, cached: shifting by any damping is then free."""
        return self._cached("eigh", lambda: torch.linalg.eigh(self.dense_data().double()))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            V = torch.as_tensor(v, dtype=self.dtype, device=self.device)
            return self.matvec(V.reshape(self.dim, -1)).reshape(v.shape).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype="float64")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.dim}, damping={self.damping}, weight_decay={self.problem.weight_decay})"


class GaussNewton(CurvatureOperator):
    """Damped Gauss-Newton Hessian: 1/N sum J_i^T H_i J_i + (weight_decay + damping) I.

    Needs a loss convex in the outputs (H_i PSD); otherwise it refuses.
    """

    kind = "gnh"

    def __init__(self, problem, damping=0.0, *, backend: str = "auto", **kwargs):
        problem.loss.require_convex()
        super().__init__(problem, damping, **kwargs)
        # "auto": the fastest exact product by size; "torch": always torch.func;
        # "cpu"/"cuda": the fused MLP kernel or an error. plan_product says which runs, and why.
        self.backend = backend
        self.products = GnhProducts(problem, backend, self.batch_size, self._cache)

    def with_damping(self, damping: float) -> "GaussNewton":
        op = type(self)(self.problem, damping, batch_size=self.batch_size, _cache=self._cache,
                        backend=self.backend)
        op.products = self.products  # the model is the same: no re-parse, no re-trace
        return op

    def mlp_spec(self):
        """(MlpSpec, "") if the model with this loss is an MLP the MLP products serve, else
        (None, why not) (see :class:`pbrf_fast.products.GnhProducts`)."""
        return self.products.mlp_spec()

    def layerwise_spec(self):
        """(LayerwiseSpec, "") if the layer-wise product serves the model exactly, else (None, why not)."""
        return self.products.layerwise_spec()

    def plan_product(self, x: torch.Tensor, V: torch.Tensor):
        """Which implementation computes this operator's product over inputs ``x`` for the
        block ``V``, and why (the rule: :mod:`pbrf_fast.products`)."""
        return self.products.plan(x, V)

    def _batch_sum(self, V, x, t, slot=None):
        return self.products.product(V, x, t, slot)


class Hessian(CurvatureOperator):
    """Damped Hessian of J (forward-over-reverse products); may be indefinite.

    A model torch.func cannot push forward (fused attention kernels, a custom autograd.Function
    without jvp) gets the same products with fused attention off, or reverse over reverse
    (:func:`pbrf_fast.autodiff.choose_mode`, probed once; a fallback is warned about once)."""

    kind = "hessian"

    def _batch_sum(self, V, x, t, slot=None):
        theta = self.problem.theta

        def total_loss(th):
            return self.problem.example_losses(th, x, t).sum()

        def forward_over_reverse(V):
            gradient = torch.func.grad(total_loss)

            def hvp(v):
                return torch.func.jvp(gradient, (theta,), (v,))[1]

            with torch.enable_grad():
                return torch.func.vmap(hvp)(V.T).detach().T

        mode = self._autodiff_mode(forward_over_reverse, x)
        if mode == "torch.func":
            return forward_over_reverse(V)
        if mode == "torch.func-unfused":
            with autodiff.unfused_attention():
                return forward_over_reverse(V)
        return autodiff.reverse_hessian_product(total_loss, theta, V)

    def _autodiff_mode(self, forward_over_reverse, x) -> str:
        """Which products this model takes, probed once with two columns (shared by damped copies)."""
        kept = self._cache.get("hessian_autodiff")
        if kept is None:
            V = torch.zeros(self.dim, 2, dtype=self.dtype, device=self.device)
            kept = self._cache["hessian_autodiff"] = autodiff.choose_mode(
                lambda: forward_over_reverse(V), lambda: self.problem.forward(self.problem.theta, x[:1]))
            if kept[0] != "torch.func":
                warnings.warn(f"Hessian product: {kept[1]}", SlowPathWarning, stacklevel=5)
        return kept[0]
