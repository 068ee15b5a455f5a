"""Train x test influence scores over a whole training set, staged and resumable.

:class:`ScorePipeline` runs one :class:`ScoreTask` (the user's model, loss,
measurement, training and test data, optional checkpoints) with one
:class:`ScoreArguments`, one method per stage; each stage writes atomically into
the output folder and is skipped when its result is already there:

1. ``arguments.json``       every argument; a rerun with different result-affecting
                            arguments is refused unless ``overwrite=True``;
   ``fingerprints/``        a 64-bit digest of every training and test example as first
                            read; every later read compares (``errors.DataChangedError``);
   ``train_indices.npy``    the dataset index of each row when a DataLoader's sampler
                            selects a subset (``test_indices.npy`` likewise);
2. ``eigenpairs.pt``        Lanczos top-k of the GNH (solver ``lowrank``, and for
                            self-influence), computed once, reused by every query;
   ``factors_ekfac.pt``     K-FAC / EK-FAC factors (``curvature="kfac"`` / ``"ekfac"``,
                            or the ``pcg`` solver's preconditioner), likewise;
3. ``s_test/chunk_XXXX.pt`` (G + lambda I)^{-1} grad f(z_test) for one chunk of test points;
4. ``scores.npy``           (n_train, N) float32 memmap, filled chunk by chunk;
                            ``chunks/chunk_XXXX.rankR.done`` marks finished ones;
5. ``self_influence.npy``   g_i^T (G + lambda I)^{-1} g_i / N (low-rank, see below);
6. ``topk.json``            top-k proponents / opponents per test point (dataset indices);
   ``scores.safetensors``   the score matrix again, for tools that read safetensors;
   ``summary.json``         time per stage, peak memory, solver diagnostics.

With several checkpoints, stages 2-5 run per checkpoint in ``checkpoint_K/`` (each
with its own curvature and gradients) and the top-level ``scores.npy`` and
``self_influence.npy`` are their mean, as TRAK and dattri ensemble.

Sign and scale follow :class:`pbrf_fast.Influence`: ``scores[i, j] =
grad f_j^T (G + lambda I)^{-1} grad L(z_i) / N`` (for f = the loss, positive: removing
z_i raises test loss j). The GNH is averaged over ``curvature_samples`` training
points (all by default). Under torch.distributed, training points are sharded
across ranks for scoring and self-influence and GNH products are all-reduced.
:func:`load_scores` reads a finished folder back.

Changed data is caught without a pass of its own: the test points are compared when the
folder is opened, the training examples as the curvature sample and every score pass
read them; a rerun of a finished folder whose curvature sample left rows unread reads
those rows once (no gradients) to compare them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..atomic_io import atomic_save_tensor, atomic_write, atomic_write_json, load_tensor, open_memmap
from ..curvatures import GaussNewton
from ..damping import AUTO as AUTO_DAMPING, auto_damping, check_damping
from ..errors import InputError
from ..curvatures import CURVATURES, KroneckerCurvature, KroneckerFactors, curvature_kind
from ..losses import Loss, get_loss
from ..problem import Problem
from ..results_folder import ResultsFolder
from ..inverses import (AUTO, DEFAULT_PRECONDITIONER, INVERSES, LowRankInverse, LowRankOptions, choose_method,
                        lanczos_eigenpairs, lowrank_eigenpairs, make_options, solve)
from . import distributed as D
from .data import RowFingerprints, as_data_source, tensor_digest
from .layer_scores import LayerScorer
from .measurement import measurement_gradients, resolve_measurement
from .safetensors_io import save_safetensors
from .task import BatchTask, TaskModel

__all__ = ["ScoreArguments", "ScoreTask", "ScorePipeline", "compute_scores", "load_scores", "RESULT_KEYS"]
logger = logging.getLogger(__name__)

# Arguments that change the numbers on disk (others -- progress, memory -- do not).
RESULT_KEYS = ("model_fingerprint", "data_fingerprint", "loss", "measurement", "damping", "weight_decay", "solver",
               "solver_options", "rank", "curvature_samples", "query_chunk", "top_k", "seed",
               "self_influence", "lanczos_iterations", "extra", "curvature", "curvature_options")
SCORE_CURVATURES = tuple(name for name, c in CURVATURES.items() if c.at_scale)
SCORE_SOLVERS = tuple(INVERSES) + (AUTO,)


@dataclasses.dataclass
class ScoreArguments:
    """Every option of a score run; saved as ``arguments.json`` beside the results.

    ``solver``: a name in :data:`pbrf_fast.INVERSES` or ``auto``; ``solver_options``: a
    dict of the fields of its options dataclass (checked here, saved as given). ``lowrank``
    uses ``rank`` Lanczos eigenpairs, shared with self-influence. ``query_chunk`` test points are solved and scored together
    (default: as many as ``memory_gb`` allows).

    ``self_influence``: ``"auto"`` (the default) computes it where it comes from the same
    inverse as the scores -- K-FAC / EK-FAC (their exact quadratic form) and the ``lowrank``
    solver (its eigenpairs) -- and leaves it off for the exact GNH solved iteratively, where
    the exact value needs one solve per training point. ``True`` there computes the low-rank
    approximation: the rank-``rank`` Lanczos eigenpairs plus the exact remainder
    ||g||^2 / (weight_decay + damping) (``summary.json`` names the method); ``False``: never.

    ``curvature``: ``"gnh"`` (the exact damped GNH, solved by ``solver``) or ``"kfac"`` /
    ``"ekfac"`` (:class:`pbrf_fast.curvatures.kronecker.KroneckerCurvature`, ``curvature_options`` go
    to it; s_test and self-influence are then its exact inverse, so ``solver`` must be
    ``"auto"`` or the default ``"cg"``). The factors are computed once per checkpoint,
    stored and reused on resume; solver ``"pcg"`` stores its preconditioner's the same way.

    ``damping``: a number, or ``"auto"`` (the default): chosen per checkpoint from the
    curvature's spectrum (:mod:`pbrf_fast.damping`), stored as ``damping.json`` in the
    checkpoint's folder (a resume reuses it) and reported in ``summary.json``.
    """

    damping: float | str = AUTO_DAMPING
    weight_decay: float = 0.0
    solver: str = AUTO
    solver_options: dict = dataclasses.field(default_factory=dict)
    rank: int = 32
    lanczos_iterations: int | None = None
    memory_gb: float = 4.0
    query_chunk: int | None = None
    curvature_samples: int | None = None
    batch_size: int = 256
    curvature_batch_size: int = 64
    top_k: int = 10
    self_influence: bool | str = AUTO
    seed: int = 0
    backend: str = "auto"
    curvature: str = "gnh"
    curvature_options: dict = dataclasses.field(default_factory=dict)

    @property
    def computes_self_influence(self) -> bool:
        """Whether the run computes self-influence (``"auto"`` resolved: see the class doc)."""
        if self.self_influence != AUTO:
            return self.self_influence
        return curvature_kind(self.curvature).own_inverse or self.solver == "lowrank"

    def __post_init__(self):
        self.damping = check_damping(self.damping)
        if self.self_influence != AUTO and not isinstance(self.self_influence, bool):
            raise InputError(f"self_influence must be True, False or 'auto', got {self.self_influence!r}")
        if self.solver not in SCORE_SOLVERS:
            raise InputError(f"solver must be one of {SCORE_SOLVERS}, got {self.solver!r}")
        if self.curvature not in SCORE_CURVATURES:
            raise InputError(f"curvature must be one of {SCORE_CURVATURES}, got {self.curvature!r}")
        if curvature_kind(self.curvature).own_inverse and self.solver not in (AUTO, ScoreArguments.solver):
            raise InputError(f"curvature={self.curvature!r} solves with its own exact inverse; solver must be "
                             f"'auto' (or the default 'cg'), got {self.solver!r}")
        self.curvature_options = dict(self.curvature_options or {})
        for name in ("rank", "batch_size", "curvature_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("query_chunk", "curvature_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not self.memory_gb > 0:
            raise InputError(f"memory_gb must be > 0, got {self.memory_gb!r}")
        self.solver_options = dict(self.solver_options or {})
        if self.solver != AUTO:
            make_options(self.solver, self.solver_options)  # a misspelt option fails here, before any work


@dataclasses.dataclass
class ScoreTask:
    """What to score: the user's things.

    ``model``: any ``nn.Module`` mapping a batch of inputs to outputs (b, C) (or (b, T, vocab):
    outputs are flattened per example). ``loss``: the training loss in output space (a name or a
    :class:`pbrf_fast.Loss`; the GNH refuses one that is not convex; ``"token_cross_entropy"`` for
    a language model). ``train`` / ``test``: (inputs, targets) tensors, a map-style Dataset of
    (input, target) pairs, of dicts or of tuples, an IterableDataset, or a DataLoader over one.
    ``measurement``: ``"loss"``, ``"margin"`` or a callable f(outputs, targets) -> (b,).
    ``checkpoints``: state dicts (or paths to them); the scores are their mean. None:
    the model as it is. ``batch_task``: how a batch that is not an (input, target) pair is read
    and fed to the model (:class:`pbrf_fast.scale.task.BatchTask`; the default one for dict and
    tuple items when None). ``network`` is what the library differentiates: ``model`` itself, or
    it behind the batch task (:class:`~pbrf_fast.scale.task.TaskModel`).
    """

    model: nn.Module
    loss: Loss | str
    train: object
    test: object
    measurement: str | Callable = "loss"
    checkpoints: list | None = None
    batch_task: BatchTask | None = None

    def __post_init__(self):
        self.loss = get_loss(self.loss)
        self.train = as_data_source(self.train, "train", self.batch_task)
        # the test data is read the same way as the training data (one layout of fields)
        self.batch_task = self.train.batch_task
        self.test = as_data_source(self.test, "test", self.batch_task)
        if self.test.batch_task is not self.batch_task:
            raise InputError("train and test must be read by the same batch task: both (input, target) pairs, or "
                             "both batches of the same fields")
        self.network = self.model if self.batch_task is None else TaskModel(self.model, self.batch_task)
        self.measurement_name, self.measurement_fn = resolve_measurement(self.measurement, self.loss)
        if self.checkpoints is not None and len(self.checkpoints) == 0:
            raise InputError("checkpoints: give at least one state dict or path, or None for the model as it is")


def _state_dict(checkpoint):
    if isinstance(checkpoint, (str, Path)):
        if not Path(checkpoint).is_file():
            raise InputError(f"checkpoint {checkpoint} does not exist")
        path = checkpoint
        try:
            checkpoint = load_tensor(path)
        except Exception as exc:  # truncated, not written by torch.save, or another format
            raise InputError(f"checkpoint {path} cannot be read by torch.load ({type(exc).__name__}: {exc}); "
                             "expected a file written by torch.save(model.state_dict(), path)") from exc
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        checkpoint = checkpoint["model"]  # the {"model": state_dict, ...} files training scripts write
    if not isinstance(checkpoint, dict):
        raise InputError(f"a checkpoint must be a state dict or a path to one, got {type(checkpoint).__name__}")
    return checkpoint


def check_checkpoint(checkpoint, model: nn.Module, where: str) -> dict:
    """The checkpoint's state dict, refused with its name and the first mismatches unless it
    fits ``model`` exactly (same keys, same shapes): a file for another architecture fails at
    the door, before any work, not inside torch's load_state_dict after hours of scoring."""
    state = _state_dict(checkpoint)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(getattr(state[k], 'shape', ()))} (model {tuple(own[k].shape)})" for k in own
              if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    problems = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("other shapes", shapes)) if items]
    if problems:
        raise InputError(f"{where} does not fit the model: {'; '.join(problems)}")
    return state


def _output_size(model: nn.Module, x1: torch.Tensor) -> int | None:
    """Outputs per example of ``model`` on one input, or None when it cannot run on it."""
    try:
        p = next(model.parameters())
        x = x1.to(p.device, p.dtype) if torch.is_floating_point(x1) else x1.to(p.device)
        with torch.no_grad():
            return int(model(x).reshape(len(x), -1).shape[-1])
    except Exception:  # the probe's own message says why
        return None


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



class ScorePipeline:
    """The staged, resumable score computation for one task; :meth:`run` does it all.

    Each stage is a method that checks the disk first: :meth:`open_folder`,
    :meth:`curvature_operator`, :meth:`eigenpairs`, :meth:`s_test`, :meth:`score_chunk`,
    :meth:`self_influence`, :meth:`combine_checkpoints`, :meth:`topk`.
    ``on_chunk_done(c)`` is called after score chunk c is written (tests use it to
    simulate a crash).
    """

    def __init__(self, task: ScoreTask, arguments: ScoreArguments, out_dir, *, overwrite: bool = False,
                 progress: bool = True, extra: dict | None = None, on_chunk_done=None):
        self.task, self.args, self.out = task, arguments, Path(out_dir)
        self.overwrite, self.progress, self.extra, self.on_chunk_done = overwrite, progress, extra or {}, on_chunk_done
        self.stages = _Stages()
        self.rank_, self.world = D.rank(), D.world_size()
        self.n_train, self.n_test = len(task.train), len(task.test)
        self.checkpoints = [None] if task.checkpoints is None else list(task.checkpoints)
        for k, checkpoint in enumerate(self.checkpoints):  # every one, before any work
            if checkpoint is not None:
                name = checkpoint if isinstance(checkpoint, (str, Path)) else f"checkpoints[{k}]"
                check_checkpoint(checkpoint, task.model, f"checkpoint {name}")
        self.row_lo, self.row_hi = D.shard_range(self.n_train, self.rank_, self.world)
        self.log = {"solves": []}
        self._rows_checked = False  # set once every training row of this rank was compared with its digest
        self.preconditioner = None  # solver "pcg": the K-FAC / EK-FAC operator of the current checkpoint
        task.model.eval()
        self.probe = self._probe(arguments.weight_decay)
        self._check_splits()
        self.curvature_samples = min(self.n_train, arguments.curvature_samples or self.n_train)
        self.query_chunk = arguments.query_chunk or query_chunk_size(
            self.probe.dim, _activation_numel(task.network, self.probe.inputs), arguments.curvature_batch_size,
            arguments.memory_gb, self.n_test, torch.finfo(self.probe.dtype).bits // 8)
        self.chunks = [(c0, min(self.n_test, c0 + self.query_chunk)) for c0 in range(0, self.n_test, self.query_chunk)]

    def _probe(self, weight_decay: float) -> Problem:
        """A one-example Problem (dimension, dtype, per-batch checks). What it refuses is said of
        the user's training data, with the user's own shapes where they are in memory, never
        the one-example batch's."""
        task = self.task
        x1, t1 = task.train.range(0, 1)
        try:
            return Problem(task.network, task.loss, x1, t1, weight_decay=weight_decay)
        except InputError as exc:
            outputs = _output_size(task.network, x1)
            if outputs is not None:  # the model runs: the targets are wrong, say so of the whole array
                self._check_targets(task.train, outputs)
            raise InputError(f"training data ({task.train.describe()}): {exc}") from exc

    def _check_targets(self, source, outputs: int) -> None:
        if source.tensors is not None:
            try:
                self.task.loss.prepare_targets(source.tensors[1], outputs)
            except InputError as exc:
                raise InputError(f"{source.split} targets: {exc}") from exc

    def _check_splits(self) -> None:
        """Before any work: test inputs shaped as the training ones, and in-memory data whole
        (targets as the loss needs them, no NaN), each error naming its split and the user's shapes."""
        train, test = self.task.train, self.task.test
        x_test = test.range(0, 1)[0]
        if tuple(x_test.shape[1:]) != tuple(self.probe.inputs.shape[1:]):
            raise InputError(f"test inputs have per-example shape {tuple(x_test.shape[1:])} but training inputs "
                             f"{tuple(self.probe.inputs.shape[1:])}: test {test.describe()}; training "
                             f"{train.describe()}")
        for source in (train, test):
            if source.tensors is not None:
                x, t = source.tensors
                source.check_finite(range(len(x)), x, t)
                self._check_targets(source, self.probe.num_outputs)

    # ------------------------------------------------------------------ stages
    def folder(self, k: int) -> Path:
        """Where checkpoint k's stages go (the top level when there is one checkpoint)."""
        return self.out if len(self.checkpoints) == 1 else self.out / f"checkpoint_{k}"

    def load_checkpoint(self, k: int) -> None:
        if self.checkpoints[k] is not None:
            self.task.model.load_state_dict(_state_dict(self.checkpoints[k]))
        self.task.model.eval()

    def arguments(self) -> dict:
        model = self.task.model
        fingerprints = [tensor_digest([*model.parameters(), *model.buffers()]) if c is None
                        else tensor_digest([v for _, v in sorted(_state_dict(c).items())])
                        for c in self.checkpoints]
        a = self.args
        return dataclasses.asdict(a) | {
            "model_fingerprint": fingerprints,
            "data_fingerprint": [self.task.train.fingerprint(), self.task.test.fingerprint()],
            "loss": self.task.loss.name, "measurement": self.task.measurement_name,
            "curvature_samples": self.curvature_samples, "query_chunk": self.query_chunk, "extra": self.extra,
            "n_train": self.n_train, "n_test": self.n_test, "parameters": self.probe.dim,
            "checkpoints": len(self.checkpoints), "world_size": self.world,
        }

    def open_folder(self) -> None:
        """Stage 1: bind the folder to the arguments (rank 0 decides, every rank learns)."""
        arguments, error = self.arguments(), None
        if self.rank_ == 0:
            try:
                # overwrite: results of the same arguments but other data are discarded too
                resume = not (self.overwrite and self._stored_data_changed())
                ResultsFolder(self.out, arguments, result_keys=RESULT_KEYS, overwrite=self.overwrite, resume=resume)
            except Exception as exc:  # tell the other ranks before raising
                error = exc
        error_text = D.broadcast_object(None if error is None else repr(error))
        if error is not None:
            raise error
        if error_text is not None:
            raise RuntimeError(f"rank 0 refused the results folder: {error_text}")
        self.fingerprints = {source.split: self._row_fingerprints(source) for source in (self.task.train, self.task.test)}
        # The test points are few and every chunk's s_test reads them: check them all now, so a
        # resume never pairs stored s_test vectors with changed test points.
        for c0, x, t in self.task.test.batches(0, self.n_test, self.args.batch_size):
            self.fingerprints["test"].check(range(c0, c0 + len(x)), x, t)
        self.fingerprints["test"].flush()
        if self.rank_ == 0:
            for split, source in (("train", self.task.train), ("test", self.task.test)):
                if source.indices is not None:  # which dataset index each row / column is
                    atomic_write(self.out / f"{split}_indices.npy", lambda h, v=source.indices: np.save(h, v.numpy()))
        D.barrier()

    def _stored_data_changed(self) -> bool:
        """Whether any example differs from the digest stored in the folder: a full read, made
        only when the caller asked to overwrite, so a folder of other data is started afresh."""
        for source in (self.task.train, self.task.test):
            path = self._fingerprints_path(source)
            if not path.exists():
                continue
            stored = RowFingerprints(open_memmap(path, (len(source),), np.uint64), source, self.out)
            for b0, x, t in source.batches(0, len(source), self.args.batch_size):
                if not stored.matches(range(b0, b0 + len(x)), x, t):
                    return True
        return False

    def _fingerprints_path(self, source) -> Path:
        return self.out / "fingerprints" / f"{source.split}_rows.npy"

    def _row_fingerprints(self, source) -> RowFingerprints:
        path = self._fingerprints_path(source)
        if self.rank_ == 0:
            open_memmap(path, (len(source),), np.uint64, create=True)
        D.barrier()
        return RowFingerprints(open_memmap(path, (len(source),), np.uint64), source, self.out)

    def curvature_operator(self, k: int = 0) -> GaussNewton | KroneckerCurvature:
        """The damped GNH (or its K-FAC / EK-FAC approximation, factors from
        :meth:`kronecker_factors`) over this rank's shard of the seeded curvature sample."""
        a = self.args
        gen = torch.Generator().manual_seed(int(a.seed))
        sample = torch.randperm(self.n_train, generator=gen)[:self.curvature_samples].sort().values
        lo, hi = D.shard_range(len(sample), self.rank_, self.world)
        x, t = self.task.train.take(sample[lo:hi])
        self.fingerprints["training"].check(sample[lo:hi], x, t)
        self.task.train.check_finite(sample[lo:hi], x, t)
        self.fingerprints["training"].flush()
        if len(sample) == self.n_train:
            self._rows_checked = True  # the curvature sample is every example (over all ranks)
        problem = Problem(self.task.network, self.task.loss, x, t, weight_decay=a.weight_decay,
                          batch_size=a.curvature_batch_size)
        if curvature_kind(a.curvature).own_inverse:
            return self.auto_damping(k, self.kronecker_factors(k, problem, a.curvature, a.curvature_options))
        op_cls = D.DistributedGaussNewton if self.world > 1 else GaussNewton
        op = self.auto_damping(k, op_cls(problem, 0.0 if a.damping == AUTO_DAMPING else a.damping,
                                         backend=a.backend))
        preconditioner = a.solver_options.get("preconditioner", DEFAULT_PRECONDITIONER) if a.solver == "pcg" else None
        # stored Kronecker factors (a Nystrom sketch is built and cached on op)
        if preconditioner in CURVATURES and CURVATURES[preconditioner].own_inverse:
            options = a.solver_options.get("preconditioner_options") or {}
            self.preconditioner = self.kronecker_factors(k, problem, preconditioner, options)
        return op

    def auto_damping(self, k: int, op):
        """``op`` at the damping of checkpoint k: the given number, or what ``"auto"`` chose
        (read from ``damping.json``, or measured on op, written and printed)."""
        a = self.args
        if a.damping != AUTO_DAMPING:
            return op
        path = self.folder(k) / "damping.json"
        if path.exists():
            choice = json.loads(path.read_text())
        else:
            # every rank measures the same seeded probes over the same global examples
            choice = auto_damping(op, a.curvature, seed=a.seed).as_dict()
            if self.rank_ == 0:
                atomic_write_json(path, choice)
            D.barrier()
        self.log.setdefault("damping", {})[str(k)] = choice
        if self.progress and self.rank_ == 0:
            print(f"checkpoint {k}: damping {choice['value']:.3g} ({choice['reason']})", file=sys.stderr)
        return op.with_damping(choice["value"])

    def kronecker_factors(self, k: int, problem: Problem, kind: str, options: dict) -> KroneckerCurvature:
        """Stage 2': the K-FAC / EK-FAC operator of checkpoint k, its factors read from
        ``factors_<kind>.pt`` or computed (summed over the ranks' shards) and written."""
        path = self.folder(k) / f"factors_{kind}.pt"
        factors = None
        if path.exists():
            factors = KroneckerFactors.from_state_dict(load_tensor(path))
        damping = 0.0 if self.args.damping == AUTO_DAMPING else self.args.damping
        op = KroneckerCurvature(problem, damping, kind, batch_size=self.args.curvature_batch_size,
                                distributed=self.world > 1, factors=factors,
                                progress=self.progress and self.rank_ == 0, **{"seed": self.args.seed, **options})
        if factors is None:
            self.stages.run("factors", lambda: op.factors)
            if self.rank_ == 0:
                atomic_save_tensor(path, op.state_dict())
            D.barrier()
        return op

    def lowrank_options(self) -> LowRankOptions:
        """The low-rank inverse's options: the ``rank`` eigenpairs self-influence uses too."""
        a = self.args
        return LowRankOptions(rank=a.rank, iterations=a.lanczos_iterations, seed=a.seed,
                              progress=self.progress and self.rank_ == 0)

    def eigenpairs(self, k: int, op) -> LowRankInverse | None:
        """Stage 2: the top-``rank`` eigenpairs, when the solver or self-influence needs them."""
        a = self.args
        if (a.solver != "lowrank" and not a.computes_self_influence) or curvature_kind(a.curvature).own_inverse:
            return None
        path = self.folder(k) / "eigenpairs.pt"

        def get():
            if path.exists():
                pairs = load_tensor(path)
                return pairs["values"], pairs["vectors"].to(op.dtype)
            values, vectors = lanczos_eigenpairs(op, a.rank, iterations=a.lanczos_iterations, seed=a.seed,
                                                 progress=self.progress and self.rank_ == 0)
            if self.rank_ == 0:
                atomic_save_tensor(path, {"values": values, "vectors": vectors})
            D.barrier()
            return values, vectors

        # cached on op under the low-rank inverse's options: solver "lowrank" finds them there
        pairs = lowrank_eigenpairs(op, self.lowrank_options(), compute=lambda: self.stages.run("eigenpairs", get))
        return LowRankInverse(op, a.rank, eigenpairs=pairs)

    def s_test(self, k: int, c: int, op) -> torch.Tensor:
        """Stage 3: (G + lambda I)^{-1} grad f for test chunk c."""
        path = self.folder(k) / "s_test" / f"chunk_{c:04d}.pt"

        def get():
            if path.exists():
                return load_tensor(path)["s_test"].to(op.dtype)
            c0, c1 = self.chunks[c]
            x, t = self.task.test.range(c0, c1)
            self.task.test.check_finite(range(c0, c1), x, t)  # compared with their digests in open_folder
            test_problem = Problem(self.task.network, self.task.loss, x, t, weight_decay=self.args.weight_decay)
            grads = measurement_gradients(test_problem, self.task.measurement_fn, test_problem.inputs,
                                          test_problem.targets)
            result = self._solve(op, grads)
            info = {"checkpoint": k, "chunk": c, "method": result.method, "time": result.time,
                    "max_residual": None if result.residual_norms is None else float(result.residual_norms.max()),
                    "converged_columns": None if result.converged is None else int(result.converged.sum()),
                    "columns": int(grads.shape[1]), "tol": result.info.get("tol")}
            self.log["solves"].append(info)
            if self.rank_ == 0:
                atomic_save_tensor(path, {"s_test": result.solution, "info": info})
            D.barrier()
            return result.solution

        return self.stages.run("s_test", get)

    def _solve(self, op, grads):
        a = self.args
        own_inverse = curvature_kind(a.curvature).own_inverse
        if own_inverse:
            return solve(op, grads, own_inverse)
        if a.solver == "lowrank":  # the eigenpairs stage cached them on op under these options
            return solve(op, grads, "lowrank", self.lowrank_options())
        options = dict(a.solver_options)
        method, reason = choose_method(op) if a.solver == AUTO else (a.solver, None)  # which options it will take
        if reason and self.progress and self.rank_ == 0 and not getattr(self, "_plan_printed", False):
            self._plan_printed = True  # the plan, once per run, before the longest step starts
            print(f"solver auto: {method} ({reason})", file=sys.stderr)
        if "progress" in {f.name for f in dataclasses.fields(INVERSES[method].options)}:
            options.setdefault("progress", self.progress and self.rank_ == 0)  # a long solve shows itself
        if self.preconditioner is not None:  # pcg with stored Kronecker factors, not rebuilt
            options.pop("preconditioner_options", None)
            options["preconditioner"] = self.preconditioner
        return solve(op, grads, a.solver, **options)  # auto records its choice in info["dispatch"]

    def _scorer(self) -> LayerScorer:
        x1, t1 = self.probe.inputs, self.probe.targets
        return LayerScorer(Problem(self.task.network, self.task.loss, x1, t1, weight_decay=self.args.weight_decay),
                           self.args.backend)

    def score_chunk(self, k: int, c: int, S: torch.Tensor, scorer: LayerScorer) -> None:
        """Stage 4: this rank's rows of the score columns of test chunk c."""
        folder = self.folder(k)
        marker = folder / "chunks" / f"chunk_{c:04d}.rank{self.rank_}.done"
        if marker.exists():
            return
        c0, c1 = self.chunks[c]
        scores_mm = open_memmap(folder / "scores.npy", (self.n_train, self.n_test), np.float32)
        bar = _bar(self.row_hi - self.row_lo, f"scores {c + 1}/{len(self.chunks)}", self.progress and self.rank_ == 0)
        epsilon = 1.0 / self.n_train

        def write(b0, x, t):
            block = scorer.scores(x, t, S) * epsilon
            scores_mm[b0:b0 + len(x), c0:c1] = block.to(torch.float32).cpu().numpy()

        self.stages.run("scores", lambda: self._over_rows(write, scores_mm, bar))
        if bar is not None:
            bar.close()
        atomic_write_json(marker, {"chunk": c, "columns": [c0, c1], "rows": [self.row_lo, self.row_hi]})
        if self.on_chunk_done is not None:
            self.on_chunk_done(c)

    def _over_rows(self, write, memmap, bar) -> None:
        """``write(b0, x, t)`` for every checked training batch of this rank's rows, then flush ``memmap``."""
        fingerprints = self.fingerprints["training"]
        for b0, x, t in self.task.train.batches(self.row_lo, self.row_hi, self.args.batch_size):
            fingerprints.check(range(b0, b0 + len(x)), x, t)  # a changed example stops the pass before its row
            self.task.train.check_finite(range(b0, b0 + len(x)), x, t)
            try:
                x, t = self.probe.check_data(x, t, "training")
            except InputError as exc:  # a Dataset's later example: name where it is
                raise InputError(f"training examples {b0}..{b0 + len(x) - 1}: {exc}") from exc
            write(b0, x, t)
            if bar is not None:
                bar.update(len(x))
        memmap.flush()
        fingerprints.flush()
        self._rows_checked = True

    def check_training_rows(self) -> None:
        """Read this rank's training rows only to compare them with their stored digests: what
        a rerun of a finished folder does when no stage read every example (a curvature sample
        smaller than the training set), so changed data is refused there too."""
        if self._rows_checked:
            return
        fingerprints = self.fingerprints["training"]
        for b0, x, t in self.task.train.batches(self.row_lo, self.row_hi, self.args.batch_size):
            fingerprints.check(range(b0, b0 + len(x)), x, t)
        fingerprints.flush()
        self._rows_checked = True

    def self_influence(self, k: int, scorer: LayerScorer, lowrank: LowRankInverse | None, op=None) -> None:
        """Stage 5: g_i^T (G + lambda I)^{-1} g_i / N for this rank's rows (the Kronecker
        operator's exact quadratic form with curvature kfac / ekfac, else low-rank)."""
        folder = self.folder(k)
        marker = folder / "chunks" / f"self_influence.rank{self.rank_}.done"
        path = folder / "self_influence.npy"
        if self.rank_ == 0:
            open_memmap(path, (self.n_train,), np.float64, create=True)
        D.barrier()
        if marker.exists():
            return
        mm = open_memmap(path, (self.n_train,), np.float64)
        V = None if lowrank is None else lowrank.eigenpairs[1]
        bar = _bar(self.row_hi - self.row_lo, "self-influence", self.progress and self.rank_ == 0)

        def quadratic_form(x, t):
            if lowrank is None:  # K-FAC / EK-FAC: layer by layer in the Kronecker eigenbasis
                return op.quadratic_form_per_example(x, t)
            return lowrank.quadratic_form(scorer.scores(x, t, V), scorer.norms_squared(x, t))

        def write(b0, x, t):
            mm[b0:b0 + len(x)] = (quadratic_form(x, t) / self.n_train).cpu().numpy()

        self.stages.run("self_influence", lambda: self._over_rows(write, mm, bar))
        if bar is not None:
            bar.close()
        atomic_write_json(marker, {"rows": [self.row_lo, self.row_hi]})

    def combine_checkpoints(self, name: str, shape, dtype) -> None:
        """The top-level file ``name`` as the mean of every checkpoint's, this rank's rows."""
        marker = self.out / "chunks" / f"{Path(name).stem}.combined.rank{self.rank_}.done"
        if marker.exists():
            return
        if self.rank_ == 0:
            open_memmap(self.out / name, shape, dtype, create=True)
        D.barrier()
        out = open_memmap(self.out / name, shape, dtype)
        parts = [open_memmap(self.folder(k) / name, shape, dtype) for k in range(len(self.checkpoints))]
        for b0 in range(self.row_lo, self.row_hi, 4096):
            b1 = min(self.row_hi, b0 + 4096)
            out[b0:b1] = (sum(np.asarray(p[b0:b1], dtype=np.float64) for p in parts) / len(parts)).astype(dtype)
        out.flush()
        atomic_write_json(marker, {"rows": [self.row_lo, self.row_hi], "checkpoints": len(parts)})

    def topk(self) -> None:
        """Stage 6: proponents and opponents per test point, and the safetensors copy."""
        scores_mm = open_memmap(self.out / "scores.npy", (self.n_train, self.n_test), np.float32)
        _write_topk(self.out, scores_mm, self.args.top_k, self.task.train.dataset_index(np.arange(self.n_train)),
                    self.task.test.dataset_index(np.arange(self.n_test)))
        save_safetensors(self.out / "scores.safetensors", {"scores": np.asarray(scores_mm)})

    # ------------------------------------------------------------------- driver
    def run(self) -> dict:
        self.open_folder()
        for k in range(len(self.checkpoints)):
            self.load_checkpoint(k)
            folder = self.folder(k)
            op = self.curvature_operator(k)
            lowrank = self.eigenpairs(k, op)
            scorer = self._scorer()
            if self.rank_ == 0:
                open_memmap(folder / "scores.npy", (self.n_train, self.n_test), np.float32, create=True)
            D.barrier()
            for c in range(len(self.chunks)):
                marker = folder / "chunks" / f"chunk_{c:04d}.rank{self.rank_}.done"
                if marker.exists():
                    continue
                self.score_chunk(k, c, self.s_test(k, c, op), scorer)
            D.barrier()
            if self.args.computes_self_influence:
                self.self_influence(k, scorer, lowrank, op)
            D.barrier()
        self.check_training_rows()
        if len(self.checkpoints) > 1:
            self.stages.run("combine", lambda: self.combine_checkpoints("scores.npy", (self.n_train, self.n_test),
                                                                         np.float32))
            if self.args.computes_self_influence:
                self.combine_checkpoints("self_influence.npy", (self.n_train,), np.float64)
        D.barrier()
        return self._summary()

    def _summary(self) -> dict:
        if self.rank_ != 0:
            D.barrier()
            return {"stage_seconds": self.stages.times}
        self.stages.run("topk", self.topk)
        a = self.args
        summary = {
            "stage_seconds": self.stages.times, "solves": self.log["solves"], "query_chunk": self.query_chunk,
            "chunks": len(self.chunks), "checkpoints": len(self.checkpoints),
            "measurement": self.task.measurement_name,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "self_influence_method": (self._self_influence_off() if not a.computes_self_influence else
                                      f"{a.curvature}: exact quadratic form of its inverse" if a.curvature != "gnh"
                                      else f"low-rank: top-{a.rank} Lanczos eigenpairs + remainder ||g||^2/shift"),
            "curvature_samples": self.curvature_samples, "world_size": self.world,
            "damping": self.log.get("damping") or a.damping,
        }
        atomic_write_json(self.out / "summary.json", summary)
        D.barrier()
        return summary

    def _self_influence_off(self) -> str:
        if self.args.self_influence is False:
            return "off (self_influence=False)"
        return ("off: with the exact GNH solved iteratively it needs one solve per training point; "
                "self_influence=True (--self-influence) gives its rank-"
                f"{self.args.rank} low-rank approximation, curvature ekfac its EK-FAC value")


def compute_scores(model, loss, x_train, y_train, x_test, y_test, out_dir, *, measurement="loss", checkpoints=None,
                   overwrite: bool = False, progress: bool = True, extra: dict | None = None, on_chunk_done=None,
                   **arguments) -> dict:
    """Score every training point against every test point from in-memory tensors.

    A thin wrapper: ``ScorePipeline(ScoreTask(model, loss, (x_train, y_train), (x_test,
    y_test), measurement, checkpoints), ScoreArguments(**arguments), out_dir).run()``.
    Returns the summary dict.
    """
    task = ScoreTask(model, loss, (x_train, y_train), (x_test, y_test), measurement, checkpoints)
    return ScorePipeline(task, ScoreArguments(**arguments), out_dir, overwrite=overwrite, progress=progress,
                         extra=extra, on_chunk_done=on_chunk_done).run()


@dataclasses.dataclass
class ScoreResults:
    """A finished score folder, read back by :func:`load_scores`."""

    scores: np.memmap                  # (n_train, n_test) float32, memory-mapped
    self_influence: np.ndarray | None  # (n_train,) or None if not computed
    topk: dict                         # test index -> {"proponents": [[i, score]...], "opponents": ...}
    arguments: dict
    summary: dict
    # the dataset index of each row / column when a DataLoader's sampler selected a subset, else None
    train_indices: np.ndarray | None = None
    test_indices: np.ndarray | None = None


def load_scores(out_dir) -> ScoreResults:
    """The results of a finished :class:`ScorePipeline` run in ``out_dir``."""
    out = Path(out_dir)
    if not (out / "summary.json").exists():
        raise InputError(f"{out} holds no finished score run (no summary.json); run pbrf-fast scores first")
    arguments = json.loads((out / "arguments.json").read_text())
    scores = np.load(out / "scores.npy", mmap_mode="r")
    path = out / "self_influence.npy"
    indices = [np.load(out / f"{split}_indices.npy") if (out / f"{split}_indices.npy").exists() else None
               for split in ("train", "test")]
    return ScoreResults(scores, np.load(path) if path.exists() and arguments.get("self_influence") else None,
                        json.loads((out / "topk.json").read_text()), arguments,
                        json.loads((out / "summary.json").read_text()), *indices)


def _write_topk(out, scores_mm, k, train_index, test_index):
    """topk.json: per test point (by its dataset index), the ``k`` training points (by dataset
    index: a sampler's subset names its own examples) with the largest and smallest scores."""
    n_train, n_test = scores_mm.shape
    k = min(k, n_train)
    result = {}
    for j0 in range(0, n_test, 64):  # column blocks keep memory at n_train x 64
        block = np.asarray(scores_mm[:, j0:j0 + 64], dtype=np.float64)
        for jj in range(block.shape[1]):
            col = block[:, jj]
            order = np.argsort(col, kind="stable")
            pro, opp = order[::-1][:k], order[:k]
            result[str(int(test_index[j0 + jj]))] = {"proponents": [[int(train_index[i]), float(col[i])] for i in pro],
                                                     "opponents": [[int(train_index[i]), float(col[i])] for i in opp]}
    atomic_write_json(out / "topk.json", result)
    return result
