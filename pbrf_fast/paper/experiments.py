"""The paper's experiments as presets: which data, model, training and influence settings.

``build(dataset, preset, seed, data_dir)`` returns an :class:`Experiment` with
the problem (at theta^0), the test points and every hyperparameter. Presets:
``quick`` (minutes on a laptop CPU) and ``paper`` (Appendix E.3 settings); each
preset's model, data subset, training and LiSSA depth are its row in :mod:`.recipes`,
and this module turns a row into a problem and the influence settings.

LiSSA settings. The paper tunes LiSSA's scale in {10, ..., 500}; a truncated
LiSSA and the K/2 epochs of PBRF training both stop short in low-curvature
directions, and they agree best when truncated alike: depth / scale close to
(PBRF steps) x (PBRF learning rate). The presets pick the scale that way.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch

from .data import (corrupt_labels, load_breast_cancer, load_concrete, load_diabetes_pima, load_digits,
                   load_energy, load_fashion_mnist, load_mnist, subset)
from ..problem import Problem
from .recipes import Recipe, recipe
from .responses import ResponseSettings
from .training import TrainConfig

__all__ = ["Experiment", "build", "to_device", "recipe_model", "DATASETS", "PRESETS", "LISSA_REPEATS",
           "matched_lissa_scale"]

DATASETS = ("cancer", "diabetes", "concrete", "energy", "digits", "mnist", "fashion_mnist", "cifar10", "ptb")
PRESETS = ("quick", "paper")
# LiSSA estimates averaged per influence column: one at the quick preset, five at the paper's
LISSA_REPEATS = {"quick": 1, "paper": 5}


@dataclasses.dataclass
class Experiment:
    name: str
    problem: Problem
    x_test: torch.Tensor
    t_test: torch.Tensor
    train: TrainConfig
    responses: ResponseSettings
    n_removed: int
    n_test_points: int
    corrupted: torch.Tensor | None = None   # mislabel experiments: which labels were flipped

    def describe(self) -> dict:
        return {"name": self.name, "n_train": self.problem.n, "dim": self.problem.dim,
                "loss": self.problem.loss.name, "weight_decay": self.problem.weight_decay,
                "train": dataclasses.asdict(self.train), "responses": dataclasses.asdict(self.responses),
                "n_removed": self.n_removed, "n_test_points": self.n_test_points}


def to_device(exp: Experiment, device: torch.device) -> Experiment:
    """The experiment with its network, training and test data on ``device`` (a new Problem;
    ``exp`` is left as it was). The presets build everything on the CPU, where the data sets load."""
    p = exp.problem
    if p.device == device:
        return exp
    problem = Problem(p.model.to(device), p.loss, p.inputs.to(device), p.targets.to(device),
                      weight_decay=p.weight_decay, batch_size=p.batch_size)
    return dataclasses.replace(exp, problem=problem, x_test=exp.x_test.to(device), t_test=exp.t_test.to(device))


def matched_lissa_scale(train: TrainConfig, n: int, response_epochs: int, depth: int,
                        bregman_lr_factor: float = 0.1) -> float:
    """The LiSSA scale whose truncation matches K/2 epochs of PBRF training: depth/scale = steps x lr.

    With momentum the effective step is lr / (1 - momentum).
    """
    steps = response_epochs * math.ceil(n / train.batch_size)
    lr = train.lr_at(train.epochs) * bregman_lr_factor
    if train.optimizer == "momentum":
        lr /= 1 - train.momentum
    return depth / (steps * lr)


def recipe_model(dataset: str, model: str) -> str:
    """The recipe's model for ``--model``: ``auto`` is logistic regression on cancer/diabetes,
    ResNet-20 on CIFAR-10, the Transformer on PTB, an MLP otherwise."""
    if dataset in ("cancer", "diabetes"):
        return "logreg"
    if dataset in ("concrete", "energy", "digits"):
        return "mlp"
    if dataset == "ptb":
        return "transformer"
    if model == "auto":
        return "resnet20" if dataset == "cifar10" else "mlp"
    return model


def _title(row: Recipe) -> str:
    """The experiment's name as the results folders record it."""
    if row.model == "logreg":
        return f"LR / {row.dataset.title()}"
    if row.model == "mlp":
        return f"MLP / {row.dataset if 'mnist' in row.dataset else row.dataset.title()}"
    return {"autoencoder": "Autoencoder", "transformer": "Transformer"}.get(row.model, row.model) + " / " + (
        "PTB" if row.dataset == "ptb" else row.dataset)


def build(dataset: str, preset: str = "quick", seed: int = 0, data_dir=None, corrupt_fraction: float = 0.0,
          width: int | None = None, depth: int | None = None, epochs: int | None = None,
          weight_decay: float | None = None, model: str = "auto", fraction: float | None = None,
          lr: float | None = None, lissa_depth: int | None = None, lissa_batch_size: int | None = None) -> Experiment:
    """An experiment by data set and preset (its :mod:`.recipes` row); keyword overrides feed the sweeps
    and the reproduction's reduced settings (``fraction``: share of the image training set; ``lr``;
    LiSSA's ``lissa_depth`` and ``lissa_batch_size``, with its scale matched again to the PBRF's truncation).

    ``model``: ``auto`` (logistic regression on cancer/diabetes, else an MLP),
    or for the image sets ``mlp``, ``autoencoder`` (MNIST-like), ``lenet``,
    ``alexnet``, ``vgg13``, ``resnet20`` (CIFAR-10).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    if model not in ("auto", "mlp", "logreg", "transformer") and dataset not in ("mnist", "fashion_mnist", "cifar10"):
        raise ValueError(f"model {model!r} needs an image data set (mnist, fashion_mnist, cifar10)")
    if (model == "transformer") != (dataset == "ptb") and model != "auto":
        raise ValueError("the transformer language model goes with the ptb data set")
    row = recipe("experiment", dataset, recipe_model(dataset, model), preset)
    n_removed = 10 if preset == "quick" else 20
    if row.model == "logreg":
        exp = _logistic(row, seed, n_removed, weight_decay, data_dir)
    elif row.model == "transformer":
        exp = _text_experiment(row, seed, data_dir, epochs, width)
    else:
        data = _load(row, data_dir, seed, fraction)
        exp = _network_experiment(row, data, seed, n_removed, width, depth, epochs, weight_decay)
    _adjust(exp, lr, lissa_depth, lissa_batch_size)
    if corrupt_fraction > 0:
        labels, mask = corrupt_labels(exp.problem.targets.cpu(), corrupt_fraction, exp.problem.num_outputs, seed)
        exp.problem.targets = labels.to(exp.problem.device)
        exp.corrupted = mask
    return exp


def _logistic(row: Recipe, seed, n_removed, weight_decay, data_dir):
    loader = load_breast_cancer if row.dataset == "cancer" else partial(load_diabetes_pima, data_dir)
    x, y, x_test, y_test = loader(seed=seed)
    problem = Problem(row.build_model(x.shape[1:], row.outputs, seed), row.loss, x.double(), y.double(),
                      weight_decay=row.train.weight_decay if weight_decay is None else weight_decay)
    settings = ResponseSettings(damping=1e-3, influence_solver="direct", linearized="exact")
    return Experiment(_title(row), problem, x_test.double(), y_test.double(), row.train.config(seed), settings,
                      n_removed, 20)


def _load(row: Recipe, data_dir, seed, fraction):
    """The row's training data (a seeded share where the row names one) and its first test points;
    the autoencoder's targets are its inputs."""
    if row.dataset in ("concrete", "energy"):
        x, y, xt, yt = (load_concrete if row.dataset == "concrete" else load_energy)(data_dir, seed=seed)
    elif row.dataset == "digits":
        x, y, xt, yt = load_digits(seed=seed)
    elif row.dataset == "cifar10":
        from .data.cifar import load_cifar10

        # the test points a seeded random subset: the image-folder copy is stored class by class
        x, y, xt, yt = load_cifar10(data_dir, n_test=row.data.test_points, seed=seed)
    else:
        load = load_mnist if row.dataset == "mnist" else load_fashion_mnist
        x, y, xt, yt = load(data_dir, flatten=row.model in ("mlp", "autoencoder"))
    if row.data.train_fraction is not None:
        x, y = subset(x, y, fraction or row.data.train_fraction, seed)
    if row.data.test_points is not None:
        xt, yt = xt[:row.data.test_points], yt[:row.data.test_points]
    return (x, x, xt, xt) if row.model == "autoencoder" else (x, y, xt, yt)


def _network_experiment(row: Recipe, data, seed, n_removed, width, depth, epochs, weight_decay):
    """MLPs, the autoencoder and the convolutional nets, trained by their recipe, LiSSA matched to it."""
    x, y, x_test, y_test = data
    model = row.build_model(x.shape[1:], row.outputs, seed, width=width, depth=depth)
    problem = Problem(model, row.loss, x, y, weight_decay=row.train.weight_decay if weight_decay is None
                      else weight_decay, batch_size=2048 if x.dim() == 2 else 256)
    train = row.train.config(seed, epochs=epochs or row.train.epochs)
    scale = matched_lissa_scale(train, problem.n, max(1, train.epochs // 2), row.lissa_depth)
    settings = ResponseSettings(damping=1e-3, influence_solver="lissa", linearized="train",
                                influence_options={"depth": row.lissa_depth, "scale": scale,
                                                   "batch_size": row.lissa_batch_size,
                                                   "repeats": LISSA_REPEATS[row.preset], "seed": seed})
    return Experiment(_title(row), problem, x_test, y_test, train, settings, n_removed, 20)


def _adjust(exp: Experiment, lr, lissa_depth, lissa_batch_size) -> None:
    """Apply the learning-rate and LiSSA overrides, keeping LiSSA's truncation matched to the PBRF's."""
    options = exp.responses.influence_options
    if lr is not None:
        exp.train = dataclasses.replace(exp.train, lr=lr)
    if lissa_depth is not None:
        options["depth"] = lissa_depth
    if lissa_batch_size is not None:
        options["batch_size"] = lissa_batch_size
    if exp.responses.influence_solver == "lissa" and (lr, lissa_depth) != (None, None):
        options["scale"] = matched_lissa_scale(exp.train, exp.problem.n, max(1, exp.train.epochs // 2),
                                               options["depth"], exp.responses.bregman_lr_factor)


def _text_experiment(row: Recipe, seed, data_dir, epochs, width):
    """The Transformer language model on PTB: damping 0.01 (Appendix E.3)."""
    from .data.ptb import load_ptb
    from ..losses import SequenceCrossEntropyLoss

    quick = row.preset == "quick"
    x, y, xt, yt, vocabulary = load_ptb(data_dir, row.data.sequence_length)
    if row.data.train_points is not None:
        x, y = subset(x, y, row.data.train_points / len(x), seed)
    model = row.build_model((len(vocabulary),), len(vocabulary), seed, width=width)
    problem = Problem(model, SequenceCrossEntropyLoss(len(vocabulary)), x, y, batch_size=64)
    train = row.train.config(seed, epochs=epochs or row.train.epochs)
    depth = row.lissa_depth
    settings = ResponseSettings(damping=0.01, influence_solver="lissa", linearized="train",
                                influence_options={"depth": depth, "batch_size": row.lissa_batch_size,
                                                   "repeats": LISSA_REPEATS[row.preset],
                                                   "scale": matched_lissa_scale(train, problem.n,
                                                                                max(1, train.epochs // 2), depth),
                                                   "seed": seed})
    test = row.data.test_points
    return Experiment(_title(row), problem, xt[:test], yt[:test], train, settings,
                      4 if quick else 20, 10 if quick else 20)
