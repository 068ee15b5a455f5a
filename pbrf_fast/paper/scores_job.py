"""The ``scores`` job: influence scores over a whole training set into ``out``, for
your own model, data and checkpoints or for a built-in example.

    pbrf-fast scores --model my_net.py:make_model --checkpoint model.pt --data data.pt \\
        --loss cross_entropy --measurement margin --solver cg --out runs/mine
    pbrf-fast scores --model resnet20 --dataset cifar10 --test-points 10 \\
        --memory-gb 8 --solver cg --damping 1e-3 --out runs/cifar --train-epochs 1

A built-in model is trained (or loaded) here first, and its test accuracy printed.

Rerunning the same command resumes from what is on disk. Under
``torchrun --nproc_per_node=K -m pbrf_fast scores ...`` the work is sharded
across K processes (gloo on CPU, nccl on CUDA). The library call underneath is
:func:`pbrf_fast.scale.compute_scores`.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..losses import get_loss
from ..results_folder import check_results_path
from .config import ScoresConfig
from .jobs import ConfigError

__all__ = ["run_scores", "load_dataset", "build_model", "SCORES_MODELS", "SCORES_DATASETS"]

# Built-in models (trained here on a built-in data set); any other --model is the
# user's own, "path/to/file.py:make_model" or "package.module:make_model".

SCORES_MODELS = ("resnet20", "mlp")
SCORES_DATASETS = ("cifar10", "digits", "synthetic")


def load_dataset(name, data_dir=None, cache_dir=None, n_train=None, n_test=None, seed=0):
    """(x_train, y_train, x_test, y_test) float32 inputs, int64 labels."""
    if name == "cifar10":
        from .data.cifar import load_cifar10

        x_tr, y_tr, x_te, y_te = load_cifar10(data_dir, cache_dir)
        # Image-folder copies are stored class by class: take seeded random
        # subsets, never the first N (which would all be one class).
        gen = torch.Generator().manual_seed(seed)
        if n_train is not None and n_train < len(x_tr):
            keep = torch.randperm(len(x_tr), generator=gen)[:n_train].sort().values
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        if n_test is not None:
            keep = torch.randperm(len(x_te), generator=gen)[:n_test].sort().values
            x_te, y_te = x_te[keep], y_te[keep]
        return x_tr, y_tr, x_te, y_te
    if name == "digits":
        from .data import load_digits

        x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
        return x_tr[:n_train], y_tr[:n_train].long(), x_te[:n_test], y_te[:n_test].long()
    if name == "synthetic":
        gen = torch.Generator().manual_seed(seed)
        n_tr, n_te = n_train or 512, n_test or 16
        x = torch.randn(n_tr + n_te, 12, generator=gen)
        w = torch.randn(12, 4, generator=gen)
        y = (x @ w + 0.5 * torch.randn(n_tr + n_te, 4, generator=gen)).argmax(1)
        return x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:]
    raise ValueError(f"unknown dataset {name!r}")


def build_model(name, x_example, num_classes, seed=0):
    if name == "resnet20":
        from .resnet import resnet20

        if x_example.dim() != 3:
            raise ValueError("resnet20 needs image inputs (C, H, W)")
        return resnet20(num_classes, seed=seed)
    from .models import mlp

    return mlp(x_example.numel(), (64, 64), num_classes, seed=seed)


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


def _solver_options(config: ScoresConfig) -> dict:
    if config.solver == "pcg":
        options = {"max_iter": config.cg_iters, "tol": config.tol, "preconditioner": config.preconditioner}
        if config.preconditioner.startswith("nystrom"):
            options["preconditioner_options"] = {"rank": config.preconditioner_rank, "seed": config.seed}
        return options
    if config.solver == "cg":
        return {"max_iter": config.cg_iters, "tol": config.tol}
    if config.solver == "lissa":
        return {"depth": config.lissa_depth}
    return {}


def _accuracy(model, x, y) -> float:
    if not len(x) or y.dtype not in (torch.int32, torch.int64):
        return float("nan")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _user_inputs(config: ScoresConfig):
    """The user's model, data and checkpoints (``--model file.py:fn --data --checkpoint``)."""
    from ..scale.loading import build_user_model, load_data_file

    if config.data is None:
        raise ConfigError(f"--model {config.model} is your own model: give its data with --data data.pt|data.npz")
    data = load_data_file(config.data)
    x_tr, y_tr, x_te, y_te = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    if config.train_points:
        x_tr, y_tr = x_tr[:config.train_points], y_tr[:config.train_points]
    x_te, y_te = x_te[:config.test_points], y_te[:config.test_points]
    model = build_user_model(config.model)
    return model, x_tr, y_tr, x_te, y_te, list(config.checkpoint) or None


def _builtin_inputs(config: ScoresConfig, out: Path, timings: dict):
    """The built-in data and model, trained (or loaded) here; warns when it learned little."""
    from .scale_training import load_or_train

    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_dataset(config.dataset, config.data_dir, config.cache_dir, config.train_points,
                                          config.test_points, config.seed)
    timings["load_data"] = time.perf_counter() - start
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    model = build_model(config.model, x_tr[0], num_classes, config.seed).to(config.device)
    if config.checkpoint:
        return model, x_tr, y_tr, x_te, y_te, list(config.checkpoint), {"trained": False}
    start = time.perf_counter()
    tag = f"{config.model}-{config.dataset}-n{len(x_tr)}-e{config.train_epochs}-lr{config.lr}-s{config.seed}"
    log = load_or_train(out / f"model-{tag}.pt", model, get_loss(config.loss), x_tr.to(config.device),
                        y_tr.to(config.device), epochs=config.train_epochs, lr=config.lr,
                        weight_decay=config.weight_decay, seed=config.seed, progress=not config.no_progress)
    timings["train_or_load"] = time.perf_counter() - start
    accuracy = _accuracy(model, x_te.to(config.device), y_te.to(config.device))
    chance = 1.0 / num_classes
    log = dict(log, tag=tag, test_accuracy=accuracy, chance=chance)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"base model: test accuracy {accuracy:.1%} (chance {chance:.1%}) after {config.train_epochs} epochs",
              file=sys.stderr)
        if accuracy < 1.5 * chance:
            warnings.warn(f"the base model is close to chance ({accuracy:.1%} vs {chance:.1%}): its influence "
                          "scores describe an untrained network; train longer (--train-epochs) or pass "
                          "--checkpoint", stacklevel=2)
    return model, x_tr, y_tr, x_te, y_te, None, log


def run_scores(config: ScoresConfig) -> dict:
    """Run the job; returns (and on rank 0 prints) the summary."""
    from ..scale import ScoreArguments, ScorePipeline, ScoreTask

    if config.threads:
        torch.set_num_threads(config.threads)
    _init_distributed(config.device)
    out = check_results_path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, train_log = {}, None
    if config.model in SCORES_MODELS:
        model, x_tr, y_tr, x_te, y_te, checkpoints, train_log = _builtin_inputs(config, out, timings)
        extra = {"model": config.model, "dataset": config.dataset, "train": train_log.get("tag"),
                 "seed": config.seed, "train_points": config.train_points, "data_dir": config.data_dir}
    else:
        model, x_tr, y_tr, x_te, y_te, checkpoints = _user_inputs(config)
        extra = {"model": config.model, "data": str(config.data)}
    model = model.to(config.device)
    x_tr, y_tr, x_te, y_te = (v.to(config.device) for v in (x_tr, y_tr, x_te, y_te))
    task = ScoreTask(model, config.loss, (x_tr, y_tr), (x_te, y_te), config.measurement, checkpoints)
    arguments = ScoreArguments(
        damping=config.damping, weight_decay=config.weight_decay, solver=config.solver,
        solver_options=_solver_options(config), rank=config.rank, memory_gb=config.memory_gb,
        query_chunk=config.query_chunk, curvature_samples=config.curvature_samples or None,
        batch_size=config.batch_size, curvature_batch_size=config.curvature_batch_size, top_k=config.top_k,
        self_influence=not config.no_self_influence, seed=config.seed, curvature=config.curvature)
    summary = ScorePipeline(task, arguments, out, overwrite=config.overwrite, progress=not config.no_progress,
                            extra=extra).run()
    summary = dict(summary, setup_seconds=timings, train_log=train_log)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1, default=str))
    return summary
