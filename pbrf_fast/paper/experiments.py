"""The paper's experiments as presets: which data, model, training and influence settings.

``build(dataset, preset, seed, data_dir)`` returns an :class:`Experiment` with
the problem (at theta^0), the test points and every hyperparameter. Presets:
``quick`` (minutes on a laptop CPU) and ``paper`` (Appendix E.3 settings).

LiSSA settings. The paper tunes LiSSA's scale in {10, ..., 500}; a truncated
LiSSA and the K/2 epochs of PBRF training both stop short in low-curvature
directions, and they agree best when truncated alike: depth / scale close to
(PBRF steps) x (PBRF learning rate). The presets pick the scale that way.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .data import (corrupt_labels, load_breast_cancer, load_concrete, load_diabetes_pima, load_digits,
                   load_energy, load_fashion_mnist, load_mnist, subset)
from .models import build_model, mlp
from ..problem import Problem
from .responses import ResponseSettings
from .training import TrainConfig

__all__ = ["Experiment", "build", "to_device", "DATASETS", "PRESETS", "matched_lissa_scale"]

DATASETS = ("cancer", "diabetes", "concrete", "energy", "digits", "mnist", "fashion_mnist", "cifar10", "ptb")
PRESETS = ("quick", "paper")


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


def _logistic(name, data, weight_decay, preset, seed, n_removed):
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    problem = Problem(torch.nn.Linear(x.shape[1], 1).double(), "bce", x.double(), y.double(), weight_decay=weight_decay)
    train = TrainConfig(optimizer="lbfgs", epochs=0, seed=seed)
    settings = ResponseSettings(damping=1e-3, influence_solver="direct", linearized="exact")
    return Experiment(name, problem, x_test.double(), y_test.double(), train, settings, n_removed, 20)


def _mlp_experiment(name, data, loss, width, depth, outputs, epochs, lr, preset, seed, n_removed,
                    lissa_depth, weight_decay=0.0, n_test_points=20, model=None, optimizer="sgd",
                    batch_size=128, lr_milestones=(), lr_gamma=0.1):
    x, y, x_test, y_test = data
    model = model or mlp(x.shape[1], (width,) * depth, outputs, activation="relu", seed=seed)
    problem = Problem(model, loss, x, y, weight_decay=weight_decay, batch_size=2048 if x.dim() == 2 else 256)
    train = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, seed=seed,
                        lr_milestones=lr_milestones, lr_gamma=lr_gamma)
    response_epochs = max(1, epochs // 2)
    scale = matched_lissa_scale(train, problem.n, response_epochs, lissa_depth)
    settings = ResponseSettings(damping=1e-3, influence_solver="lissa", linearized="train",
                                influence_options={"depth": lissa_depth, "scale": scale, "batch_size": 128,
                                                   "repeats": 1 if preset == "quick" else 5, "seed": seed})
    return Experiment(name, problem, x_test, y_test, train, settings, n_removed, n_test_points)


def build(dataset: str, preset: str = "quick", seed: int = 0, data_dir=None, corrupt_fraction: float = 0.0,
          width: int | None = None, depth: int | None = None, epochs: int | None = None,
          weight_decay: float | None = None, model: str = "auto", fraction: float | None = None,
          lr: float | None = None, lissa_depth: int | None = None, lissa_batch_size: int | None = None) -> Experiment:
    """An experiment by data set and preset; keyword overrides feed the sweeps and the reproduction's
    reduced settings (``fraction``: share of the image training set; ``lr``; LiSSA's ``lissa_depth`` and
    ``lissa_batch_size``, with its scale matched again to the PBRF's truncation).

    ``model``: ``auto`` (logistic regression on cancer/diabetes, else an MLP),
    or for the image sets ``mlp``, ``autoencoder`` (MNIST-like), ``lenet``,
    ``alexnet``, ``vgg13``, ``resnet20`` (CIFAR-10).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    quick = preset == "quick"
    n_removed = 10 if quick else 20
    if dataset == "cancer":
        exp = _logistic("LR / Cancer", load_breast_cancer(seed=seed), 0.01 if weight_decay is None else weight_decay,
                        preset, seed, n_removed)
    elif dataset == "diabetes":
        data = load_diabetes_pima(data_dir, seed=seed)
        exp = _logistic("LR / Diabetes", data, 0.01 if weight_decay is None else weight_decay, preset, seed, n_removed)
    elif dataset in ("concrete", "energy"):
        loader = load_concrete if dataset == "concrete" else load_energy
        exp = _mlp_experiment(f"MLP / {dataset.title()}", loader(data_dir, seed=seed), "mse", width or 128,
                              depth or 2, 1, epochs or (200 if quick else 1000), 0.03, preset, seed, n_removed,
                              1000 if quick else 5000, weight_decay or 0.0)
    elif dataset == "digits":
        x, y, xt, yt = load_digits(seed=seed)
        exp = _mlp_experiment("MLP / Digits", (x, y, xt, yt), "cross_entropy", width or 64, depth or 2, 10,
                              epochs or (30 if quick else 200), 0.1, preset, seed, n_removed,
                              500 if quick else 5000, weight_decay or 0.0)
    elif dataset == "ptb":
        exp = _text_experiment(quick, preset, seed, data_dir, n_removed, epochs, width)
    elif model in ("auto", "mlp") and dataset != "cifar10":
        load = load_mnist if dataset == "mnist" else load_fashion_mnist
        x, y, xt, yt = load(data_dir)
        x, y = subset(x, y, fraction or (0.02 if quick else 0.1), seed)
        exp = _mlp_experiment(f"MLP / {dataset}", (x, y, xt[:1000], yt[:1000]), "cross_entropy",
                              width or (256 if quick else 1024), depth or 2, 10, epochs or (20 if quick else 1000),
                              0.1, preset, seed, n_removed, 1000 if quick else 5000, weight_decay or 0.0)
    else:
        exp = _image_experiment(dataset, "resnet20" if model == "auto" else model, quick, preset, seed, data_dir,
                                n_removed, epochs, weight_decay, fraction)
    if model not in ("auto", "mlp", "logreg", "transformer") and dataset not in ("mnist", "fashion_mnist", "cifar10"):
        raise ValueError(f"model {model!r} needs an image data set (mnist, fashion_mnist, cifar10)")
    if (model == "transformer") != (dataset == "ptb") and model != "auto":
        raise ValueError("the transformer language model goes with the ptb data set")
    _adjust(exp, lr, lissa_depth, lissa_batch_size)
    if corrupt_fraction > 0:
        labels, mask = corrupt_labels(exp.problem.targets.cpu(), corrupt_fraction, exp.problem.num_outputs, seed)
        exp.problem.targets = labels.to(exp.problem.device)
        exp.corrupted = mask
    return exp


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


def _image_experiment(dataset, model_name, quick, preset, seed, data_dir, n_removed, epochs, weight_decay,
                      fraction=None):
    """Convolutional nets and the autoencoder (Appendix E.3): SGD with momentum, batch 128."""
    from .data.cifar import load_cifar10

    if dataset == "cifar10":
        x, y, xt, yt = load_cifar10(data_dir)
        x, y = subset(x, y, fraction or (0.04 if quick else 1.0), seed)
    else:
        load = load_mnist if dataset == "mnist" else load_fashion_mnist
        x, y, xt, yt = load(data_dir, flatten=model_name == "autoencoder")
        # Appendix E.3: the autoencoder trains on the full MNIST, the CNNs on 10%
        x, y = subset(x, y, fraction or (0.02 if quick else (1.0 if model_name == "autoencoder" else 0.1)), seed)
    xt, yt = xt[:1000], yt[:1000]
    if model_name == "autoencoder":
        if dataset == "cifar10":
            raise ValueError("the autoencoder is set up for 28x28 images")
        model = build_model("autoencoder", x.shape[1:], 784, seed=seed)
        return _mlp_experiment(f"Autoencoder / {dataset}", (x, x, xt, xt), "bce", 0, 0, 784,
                               epochs or (5 if quick else 1000), 0.01, preset, seed, n_removed,
                               500 if quick else 10000, 5e-5 if weight_decay is None else weight_decay,
                               model=model, optimizer="momentum", batch_size=128 if quick else 1024)
    model = build_model(model_name, x.shape[1:], 10, seed=seed)
    # ResNet-20 runs with batch norm in eval mode (a fixed affine map, identity at initialisation), so it
    # trains as an unnormalised 20-layer net: lr 0.01 with momentum diverges in the first epoch, 0.003 trains.
    lr = 0.003 if model_name == "resnet20" else 0.01
    return _mlp_experiment(f"{model_name} / {dataset}", (x, y, xt, yt), "cross_entropy", 0, 0, 10,
                           epochs or (4 if quick else 200), lr, preset, seed, n_removed, 500 if quick else 10000,
                           5e-4 if weight_decay is None else weight_decay, model=model, optimizer="momentum",
                           # CIFAR-10 (Appendix E.3): the learning rate divided by 5 at epochs 60, 120, 160
                           lr_milestones=(60, 120, 160) if dataset == "cifar10" and not quick else (),
                           lr_gamma=0.2 if dataset == "cifar10" and not quick else 0.1)


def _text_experiment(quick, preset, seed, data_dir, n_removed, epochs, width):
    """2-layer Transformer language model on PTB (Appendix E.3): Adam, batch 20, damping 0.01."""
    from .data.ptb import load_ptb
    from ..losses import SequenceCrossEntropyLoss
    from .models import transformer_lm

    seq_len = 20 if quick else 35
    x, y, xt, yt, vocabulary = load_ptb(data_dir, seq_len)
    if quick:
        x, y = subset(x, y, 200 / len(x), seed)
    model = transformer_lm(len(vocabulary), width or (64 if quick else 256), heads=2, layers=2, max_len=seq_len,
                           seed=seed)
    problem = Problem(model, SequenceCrossEntropyLoss(len(vocabulary)), x, y, batch_size=64)
    train = TrainConfig(epochs=epochs or (4 if quick else 10), lr=1e-3, batch_size=20, optimizer="adam", seed=seed)
    depth = 200 if quick else 5000
    settings = ResponseSettings(damping=0.01, influence_solver="lissa", linearized="train",
                                influence_options={"depth": depth, "batch_size": 20, "repeats": 1 if quick else 5,
                                                   "scale": matched_lissa_scale(train, problem.n,
                                                                                max(1, train.epochs // 2), depth),
                                                   "seed": seed})
    return Experiment("Transformer / PTB", problem, xt[:200], yt[:200], train, settings,
                      4 if quick else 20, 10 if quick else 20)
