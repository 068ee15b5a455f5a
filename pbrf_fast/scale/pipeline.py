"""Train x test influence scores over a whole training set, staged and resumable.

Stages (each written atomically into ``out_dir``, each skipped when on disk):

1. ``arguments.json``       every argument; a rerun with different result-affecting
                            arguments is refused unless ``overwrite=True``;
2. ``eigenpairs.pt``        Lanczos top-k of the GNH (solver ``lowrank``, and for
                            self-influence), computed once, reused by every query;
3. ``s_test/chunk_XXXX.pt`` (G + lambda I)^{-1} grad L_test for one chunk of test points;
4. ``scores.npy``           (n_train, N) float32 memmap, filled chunk by chunk;
                            ``chunks/chunk_XXXX.rankR.done`` marks finished ones;
5. ``self_influence.npy``   g_i^T (G + lambda I)^{-1} g_i / N (low-rank, see below);
6. ``topk.json``            top-k proponents / opponents per test point;
   ``summary.json``         time per stage, peak memory, solver diagnostics.

Sign and scale follow :class:`pbrf_fast.Influence`: ``scores[i, j] =
grad L_test_j^T (G + lambda I)^{-1} grad L(z_i) / N`` (positive: removing z_i
raises test loss j). The GNH is averaged over ``curvature_samples`` training
points (all by default). Under torch.distributed, training points are sharded
across ranks for scoring and self-influence and GNH products are all-reduced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

from ..curvature import GaussNewton
from ..atomic_io import atomic_save_tensor, atomic_write_json, load_tensor, open_memmap
from ..problem import Problem
from ..results_folder import ResultsFolder
from ..solvers import solve
from . import distributed as D
from .layer_scores import LayerScorer
from .lowrank import LowRankInverse, lanczos_eigenpairs

__all__ = ["compute_scores", "RESULT_KEYS"]
logger = logging.getLogger(__name__)

# Arguments that change the numbers on disk (others -- progress, memory -- do not).
RESULT_KEYS = ("model_fingerprint", "data_fingerprint", "loss", "damping", "weight_decay", "solver",
               "solver_options", "rank", "curvature_samples", "query_chunk", "top_k", "seed",
               "self_influence", "lanczos_iterations", "extra")


def _fingerprint(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _activation_numel(model, x1) -> int:
    """Numbers stored per example in a forward pass (sum of leaf-module outputs)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(total[0], 1)


def query_chunk_size(d: int, activation_numel: int, curvature_batch: int, memory_gb: float, n_test: int,
                     element_size: int = 4) -> int:
    """Test points per chunk that fit ``memory_gb``: solver vectors (~8 d each) plus the
    activations a batched jvp/vjp keeps per tangent (~3 x batch x activations)."""
    per_query = element_size * (8 * d + 3 * curvature_batch * activation_numel)
    return int(max(1, min(n_test, (memory_gb * 2 ** 30) // per_query)))


class _Stages:
    def __init__(self):
        self.times = {}

    def run(self, name, fn):
        start = time.perf_counter()
        out = fn()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return out


def _bar(total, desc, enabled, initial=0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit="ex", smoothing=0.1)


def compute_scores(model, loss, x_train, y_train, x_test, y_test, out_dir, *, damping: float = 1e-3,
                   weight_decay: float = 0.0, solver: str = "cg", solver_options: dict | None = None,
                   rank: int = 32, lanczos_iterations: int | None = None, memory_gb: float = 2.0,
                   query_chunk: int | None = None, curvature_samples: int | None = None,
                   batch_size: int = 256, curvature_batch_size: int = 64, top_k: int = 10,
                   self_influence: bool = True, seed: int = 0, overwrite: bool = False,
                   progress: bool = True, backend: str = "auto", extra: dict | None = None,
                   on_chunk_done=None) -> dict:
    """Score every training point against every test point; results go to ``out_dir``.

    ``solver``: ``cg`` / ``lissa`` (``solver_options`` go to :func:`pbrf_fast.solve`)
    or ``lowrank`` (:class:`LowRankInverse` with ``rank`` Lanczos eigenpairs).
    ``query_chunk`` (default: from ``memory_gb``) test points are solved and
    scored together. Self-influence always uses the rank-``rank`` eigenpairs plus
    the exact remainder ||g||^2 / (weight_decay + damping) (exact when
    rank >= d). ``on_chunk_done(c)`` is called after chunk c is written (tests
    use it to simulate a crash). Returns the summary dict.
    """
    out = Path(out_dir)
    stages = _Stages()
    model.eval()
    n_train, n_test = len(x_train), len(x_test)
    r, world = D.rank(), D.world_size()
    probe = Problem(model, loss, x_train[:1], y_train[:1], weight_decay=weight_decay)
    d = probe.dim
    curvature_samples = min(n_train, curvature_samples or n_train)
    if query_chunk is None:
        act = _activation_numel(model, x_train[:1].to(probe.dtype))
        query_chunk = query_chunk_size(d, act, curvature_batch_size, memory_gb, n_test,
                                       torch.finfo(probe.dtype).bits // 8)
    arguments = {
        "model_fingerprint": _fingerprint(probe.theta, *[b for b in model.buffers()]),
        "data_fingerprint": _fingerprint(x_train, y_train, x_test, y_test),
        "loss": probe.loss.name, "damping": damping, "weight_decay": weight_decay, "solver": solver,
        "solver_options": solver_options or {}, "rank": rank, "lanczos_iterations": lanczos_iterations,
        "curvature_samples": curvature_samples, "query_chunk": query_chunk, "top_k": top_k, "seed": seed,
        "self_influence": self_influence, "extra": extra or {}, "n_train": n_train, "n_test": n_test,
        "parameters": d, "memory_gb": memory_gb, "batch_size": batch_size,
        "curvature_batch_size": curvature_batch_size, "world_size": world, "backend": backend,
    }
    error = None
    if r == 0:
        try:
            ResultsFolder(out, arguments, result_keys=RESULT_KEYS, overwrite=overwrite)
        except Exception as exc:  # tell the other ranks before raising
            error = exc
    error_text = D.broadcast_object(None if error is None else repr(error))
    if error is not None:
        raise error
    if error_text is not None:
        raise RuntimeError(f"rank 0 refused the results folder: {error_text}")

    # ---- curvature operator on this rank's shard of the curvature sample
    gen = torch.Generator().manual_seed(int(seed))
    curv_idx = torch.randperm(n_train, generator=gen)[:curvature_samples].sort().values
    lo, hi = D.shard_range(len(curv_idx), r, world)
    shard = curv_idx[lo:hi]
    curv_problem = Problem(model, loss, x_train[shard], y_train[shard], weight_decay=weight_decay,
                           batch_size=curvature_batch_size)
    op_cls = D.DistributedGaussNewton if world > 1 else GaussNewton
    op = op_cls(curv_problem, damping)
    log = {"stages": {}, "solves": []}

    eigenpairs = None
    if solver == "lowrank" or self_influence:
        path = out / "eigenpairs.pt"

        def get_pairs():
            if path.exists():
                pairs = load_tensor(path)
                return pairs["values"], pairs["vectors"].to(op.dtype)
            values, vectors = lanczos_eigenpairs(op, rank, iterations=lanczos_iterations, seed=seed,
                                                 progress=progress and r == 0)
            if r == 0:
                atomic_save_tensor(path, {"values": values, "vectors": vectors})
            D.barrier()
            return values, vectors

        eigenpairs = stages.run("eigenpairs", get_pairs)
    lowrank = LowRankInverse(op, rank, eigenpairs=eigenpairs) if eigenpairs is not None else None

    # ---- test gradients and scoring setup
    test_problem = Problem(model, loss, x_test, y_test, weight_decay=weight_decay)
    scorer = LayerScorer(Problem(model, loss, x_train[:1], y_train[:1], weight_decay=weight_decay), backend)
    row_lo, row_hi = D.shard_range(n_train, r, world)
    if r == 0:
        open_memmap(out / "scores.npy", (n_train, n_test), np.float32, create=True)
    D.barrier()
    scores_mm = open_memmap(out / "scores.npy", (n_train, n_test), np.float32)
    chunks = [(c0, min(n_test, c0 + query_chunk)) for c0 in range(0, n_test, query_chunk)]
    epsilon = 1.0 / n_train

    for c, (c0, c1) in enumerate(chunks):
        marker = out / "chunks" / f"chunk_{c:04d}.rank{r}.done"
        if marker.exists():
            continue
        s_path = out / "s_test" / f"chunk_{c:04d}.pt"

        def get_s_test():
            if s_path.exists():
                return load_tensor(s_path)["s_test"].to(op.dtype)
            grads = test_problem.per_example_gradients(*test_problem.batch(range(c0, c1))).T.contiguous()
            if solver == "lowrank":
                result = lowrank.solve(grads)
            else:
                result = solve(op, grads, solver, **(solver_options or {}))
            info = {"chunk": c, "method": result.method, "time": result.time,
                    "max_residual": None if result.residual_norms is None else float(result.residual_norms.max())}
            log["solves"].append(info)
            if r == 0:
                atomic_save_tensor(s_path, {"s_test": result.solution, "info": info})
            D.barrier()
            return result.solution

        S = stages.run("s_test", get_s_test)
        bar = _bar(row_hi - row_lo, f"scores {c + 1}/{len(chunks)}", progress and r == 0)

        def score_chunk():
            for b0 in range(row_lo, row_hi, batch_size):
                b1 = min(row_hi, b0 + batch_size)
                block = scorer.scores(x_train[b0:b1], y_train[b0:b1], S) * epsilon
                scores_mm[b0:b1, c0:c1] = block.to(torch.float32).cpu().numpy()
                if bar is not None:
                    bar.update(b1 - b0)
            scores_mm.flush()

        stages.run("scores", score_chunk)
        if bar is not None:
            bar.close()
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"chunk": c, "columns": [c0, c1], "rows": [row_lo, row_hi]})
        if on_chunk_done is not None:
            on_chunk_done(c)
    D.barrier()

    if self_influence:
        stages.run("self_influence", lambda: _self_influence(out, scorer, lowrank, x_train, y_train,
                                                             row_lo, row_hi, n_train, batch_size, r, progress))
    D.barrier()
    if r == 0:
        stages.run("topk", lambda: _write_topk(out, scores_mm, top_k))
        summary = {
            "stage_seconds": stages.times, "solves": log["solves"], "query_chunk": query_chunk,
            "chunks": len(chunks), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "self_influence_method": (f"low-rank: top-{rank} Lanczos eigenpairs + remainder ||g||^2/shift"
                                      if self_influence else None),
            "curvature_samples": curvature_samples, "world_size": world,
        }
        atomic_write_json(out / "summary.json", summary)
    else:
        summary = {"stage_seconds": stages.times}
    D.barrier()
    return summary


def _self_influence(out, scorer, lowrank, x_train, y_train, row_lo, row_hi, n_train, batch_size, r, progress):
    marker = out / "chunks" / f"self_influence.rank{r}.done"
    path = out / "self_influence.npy"
    if r == 0:
        open_memmap(path, (n_train,), np.float64, create=True)
    D.barrier()
    if marker.exists():
        return
    mm = open_memmap(path, (n_train,), np.float64)
    _, V = lowrank.eigenpairs
    bar = _bar(row_hi - row_lo, "self-influence", progress and r == 0)
    for b0 in range(row_lo, row_hi, batch_size):
        b1 = min(row_hi, b0 + batch_size)
        x, t = x_train[b0:b1], y_train[b0:b1]
        coeff = scorer.scores(x, t, V)
        norms = scorer.norms_squared(x, t)
        mm[b0:b1] = (lowrank.quadratic_form(coeff, norms) / n_train).cpu().numpy()
        if bar is not None:
            bar.update(b1 - b0)
    if bar is not None:
        bar.close()
    mm.flush()
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"rows": [row_lo, row_hi]})


def _write_topk(out, scores_mm, k):
    n_train, n_test = scores_mm.shape
    k = min(k, n_train)
    result = {}
    for j0 in range(0, n_test, 64):  # column blocks keep memory at n_train x 64
        block = np.asarray(scores_mm[:, j0:j0 + 64], dtype=np.float64)
        for jj in range(block.shape[1]):
            col = block[:, jj]
            order = np.argsort(col, kind="stable")
            pro, opp = order[::-1][:k], order[:k]
            result[str(j0 + jj)] = {"proponents": [[int(i), float(col[i])] for i in pro],
                                    "opponents": [[int(i), float(col[i])] for i in opp]}
    atomic_write_json(out / "topk.json", result)
    return result
