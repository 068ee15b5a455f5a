"""The built-in models of ``pbrf-fast scores --model resnet20|mlp --dataset NAME``: their
data and network from :mod:`.recipes`, trained (or loaded) into the results folder before
the library's :func:`pbrf_fast.scale.scores_job.run_scores` scores them. A user's own
model never comes here."""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..losses import get_loss
from ..scale.scores_job import ScoresConfig, ScoresInputs
from .config import BuiltinModelConfig
from .recipes import SCORES_DATASETS, SCORES_MODELS, Recipe, recipe

__all__ = ["builtin_inputs", "load_dataset", "SCORES_MODELS", "SCORES_DATASETS"]


def load_dataset(name, data_dir=None, cache_dir=None, n_train=None, n_test=None, seed=0):
    """(x_train, y_train, x_test, y_test) float32 inputs, int64 labels."""
    if name == "cifar10":
        from .data.cifar import load_cifar10

        return load_cifar10(data_dir, cache_dir, n_train, n_test, seed)  # seeded random subsets
    if name == "digits":
        from .data import load_digits

        x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
        return x_tr[:n_train], y_tr[:n_train].long(), x_te[:n_test], y_te[:n_test].long()
    if name == "synthetic":
        sizes = recipe("scores", "synthetic", "mlp").data
        gen = torch.Generator().manual_seed(seed)
        n_tr, n_te = n_train or sizes.train_points, n_test or sizes.test_points
        x = torch.randn(n_tr + n_te, 12, generator=gen)
        w = torch.randn(12, 4, generator=gen)
        y = (x @ w + 0.5 * torch.randn(n_tr + n_te, 4, generator=gen)).argmax(1)
        return x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:]
    raise ValueError(f"unknown dataset {name!r}")


def _accuracy(model, x, y) -> float:
    if not len(x) or y.dtype not in (torch.int32, torch.int64):
        return float("nan")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _train_or_load(config: ScoresConfig, builtin: BuiltinModelConfig, row: Recipe, model, x_tr, y_tr, out: Path):
    """The model trained by its recipe (``--train-epochs`` / ``--lr`` override it), or loaded
    when this folder already holds it; returns the training log with its tag."""
    from .scale_training import load_or_train

    epochs = row.train.epochs if builtin.train_epochs is None else builtin.train_epochs
    lr = builtin.lr or row.train.lr
    tag = f"{config.model}-{builtin.dataset}-n{len(x_tr)}-e{epochs}-lr{lr}-s{config.seed}"
    log = load_or_train(out / f"model-{tag}.pt", model, get_loss(config.loss), x_tr.to(config.device),
                        y_tr.to(config.device), epochs=epochs, lr=lr, batch_size=row.train.batch_size,
                        weight_decay=config.weight_decay, seed=config.seed, progress=not config.no_progress)
    return dict(log, tag=tag, epochs=epochs)


def _report_accuracy(accuracy: float, chance: float, epochs) -> None:
    """Print the base model's test accuracy (rank 0) and warn when it learned little."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"base model: test accuracy {accuracy:.1%} (chance {chance:.1%}) after {epochs} epochs", file=sys.stderr)
    if accuracy < 1.5 * chance:
        warnings.warn(f"the base model is close to chance ({accuracy:.1%} vs {chance:.1%}): its influence "
                      "scores describe an untrained network; train longer (--train-epochs) or pass "
                      "--checkpoint", stacklevel=3)


def builtin_inputs(config: ScoresConfig, builtin: BuiltinModelConfig, out: Path) -> ScoresInputs:
    """The built-in data and model, trained (or loaded) into ``out`` unless ``--checkpoint`` names weights."""
    row = recipe("scores", builtin.dataset, config.model)
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_dataset(builtin.dataset, builtin.data_dir, builtin.cache_dir, config.train_points,
                                          config.test_points, config.seed)
    timings = {"load_data": time.perf_counter() - start}
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    model = row.build_model(tuple(x_tr.shape[1:]), num_classes, config.seed).to(config.device)
    extra = {"model": config.model, "dataset": builtin.dataset, "train": None, "seed": config.seed,
             "train_points": config.train_points, "data_dir": builtin.data_dir}
    if config.checkpoint:
        return ScoresInputs(model, x_tr, y_tr, x_te, y_te, list(config.checkpoint), extra, timings,
                            {"trained": False})
    start = time.perf_counter()
    log = _train_or_load(config, builtin, row, model, x_tr, y_tr, out)
    timings["train_or_load"] = time.perf_counter() - start
    accuracy = _accuracy(model, x_te.to(config.device), y_te.to(config.device))
    chance = 1.0 / num_classes
    _report_accuracy(accuracy, chance, log.pop("epochs"))
    log = dict(log, test_accuracy=accuracy, chance=chance)
    return ScoresInputs(model, x_tr, y_tr, x_te, y_te, None, dict(extra, train=log["tag"]), timings, log)
