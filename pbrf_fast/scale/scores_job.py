"""The ``scores`` job: influence scores over a whole training set into ``out``, for
your own model, data and checkpoints, or for a built-in example.

    pbrf-fast scores --model my_net.py:make_model --checkpoint model.pt --data data.pt \\
        --loss cross_entropy --measurement margin --solver cg --out runs/mine
    pbrf-fast scores --model resnet20 --dataset cifar10 --test-points 10 \\
        --memory-gb 8 --solver cg --damping 1e-3 --out runs/cifar --train-epochs 1

A built-in model (``--model resnet20|mlp`` on ``--dataset``) is trained (or loaded) first
by the paper harness's recipe for it, and its test accuracy printed.

Rerunning the same command resumes from what is on disk. Under
``torchrun --nproc_per_node=K -m pbrf_fast scores ...`` the work is sharded
across K processes (gloo on CPU, nccl on CUDA). The library call underneath is
:class:`pbrf_fast.scale.ScorePipeline`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..atomic_io import make_folder
from ..errors import InputError
from ..inverses import INVERSES
from .pipeline import ScoreArguments
from ..results_folder import check_results_path
from .loading import build_user_model, load_data_file

__all__ = ["ScoresConfig", "ScoresInputs", "start_run", "user_inputs", "run_scores"]


# This command's solver defaults where they differ from the options dataclasses': a first run
# that stops in minutes (CG to 1e-4 in 100 iterations, LiSSA 200 steps, a rank-200 sketch).
@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    """The ``scores`` job's settings: what to score, and how the scores are computed with
    :class:`~pbrf_fast.scale.ScorePipeline`."""

    out: str
    model: str                       # your own: "file.py:make_model" / "module:make_model" (or the CLI's built-in name)
    data: str | None = None          # your own data: data.pt / data.npz with x_train, y_train, x_test, y_test
    checkpoint: tuple[str, ...] = ()  # state dicts to score (mean over several); none: the model's own weights
    loss: str = "cross_entropy"
    measurement: str = "loss"
    train_points: int | None = None
    test_points: int = 10
    # The scoring settings default to ScoreArguments' own: one set of defaults for the CLI and Python.
    memory_gb: float = ScoreArguments.memory_gb
    query_chunk: int | None = ScoreArguments.query_chunk
    solver: str = ScoreArguments.solver
    curvature: str = ScoreArguments.curvature   # the exact GNH, or its "kfac" / "ekfac" approximation
    # the solver's options (fields of its options dataclass in pbrf_fast.INVERSES), from the CLI's flags
    solver_options: dict = dataclasses.field(default_factory=dict)
    rank: int = ScoreArguments.rank
    damping: float = ScoreArguments.damping
    weight_decay: float = ScoreArguments.weight_decay
    curvature_samples: int = 0                    # 0: all training points (ScoreArguments' None)
    batch_size: int = ScoreArguments.batch_size
    curvature_batch_size: int = ScoreArguments.curvature_batch_size
    top_k: int = ScoreArguments.top_k
    self_influence: bool | str = ScoreArguments.self_influence   # True, False or "auto"
    seed: int = ScoreArguments.seed
    threads: int | None = None
    device: str = "cpu"
    overwrite: bool = False
    no_progress: bool = False


@dataclasses.dataclass
class ScoresInputs:
    """What the job scores: a model, its data, the checkpoints (None: the model's own weights),
    what the summary records about where they came from, and any setup before the job."""

    model: torch.nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    checkpoints: list | None
    extra: dict
    setup_seconds: dict = dataclasses.field(default_factory=dict)
    train_log: dict | None = None


def _init_distributed(device: str) -> None:
    """Join the process group torchrun set up: nccl for CUDA tensors, gloo for CPU ones."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("nccl")
            else:
                dist.init_process_group("gloo")


def start_run(config: ScoresConfig) -> Path:
    """Threads, the process group and the results folder; safe to call again. A caller that
    trains a model into the folder before :func:`run_scores` calls it first."""
    if config.threads:
        torch.set_num_threads(config.threads)
    _init_distributed(config.device)
    return make_folder(check_results_path(config.out))  # a folder that cannot be made: one named line


def _solver_options(config: ScoresConfig) -> dict:
    """The solver's options as the config gives them (the options dataclass fills the rest)."""
    fields = {f.name for f in dataclasses.fields(INVERSES[config.solver].options)} if config.solver in INVERSES else ()
    options = dict(config.solver_options)
    if "rank" in fields:  # the low-rank solver shares its eigenpairs with self-influence
        options["rank"] = config.rank
    if "preconditioner_options" in fields and "preconditioner_options" not in options:
        options["preconditioner_options"] = {"seed": config.seed}  # the sketch / factors seeded by the run
    return options


def user_inputs(config: ScoresConfig) -> ScoresInputs:
    """The user's model, data and checkpoints (``--model file.py:fn --data --checkpoint``)."""
    if config.data is None:
        raise InputError(f"--model {config.model} is your own model: give its data with --data data.pt|data.npz")
    data = load_data_file(config.data)
    x_tr, y_tr, x_te, y_te = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    if config.train_points:
        x_tr, y_tr = x_tr[:config.train_points], y_tr[:config.train_points]
    x_te, y_te = x_te[:config.test_points], y_te[:config.test_points]
    return ScoresInputs(build_user_model(config.model), x_tr, y_tr, x_te, y_te, list(config.checkpoint) or None,
                        {"model": config.model, "data": str(config.data)})


def run_scores(config: ScoresConfig, inputs: ScoresInputs | None = None) -> dict:
    """Run the job on ``inputs`` (default: the user's, :func:`user_inputs`); returns (and on
    rank 0 prints) the summary."""
    from . import ScoreArguments, ScorePipeline, ScoreTask

    out = start_run(config)
    inputs = inputs or user_inputs(config)
    model = inputs.model.to(config.device)
    x_tr, y_tr, x_te, y_te = (v.to(config.device) for v in (inputs.x_train, inputs.y_train, inputs.x_test,
                                                            inputs.y_test))
    task = ScoreTask(model, config.loss, (x_tr, y_tr), (x_te, y_te), config.measurement, inputs.checkpoints)
    arguments = ScoreArguments(
        damping=config.damping, weight_decay=config.weight_decay, solver=config.solver,
        solver_options=_solver_options(config), rank=config.rank, memory_gb=config.memory_gb,
        query_chunk=config.query_chunk, curvature_samples=config.curvature_samples or None,
        batch_size=config.batch_size, curvature_batch_size=config.curvature_batch_size, top_k=config.top_k,
        self_influence=config.self_influence, seed=config.seed, curvature=config.curvature)
    summary = ScorePipeline(task, arguments, out, overwrite=config.overwrite, progress=not config.no_progress,
                            extra=inputs.extra).run()
    summary = dict(summary, setup_seconds=inputs.setup_seconds, train_log=inputs.train_log)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1, default=str))
    return summary
