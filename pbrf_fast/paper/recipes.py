"""Every setting the harness trains, in one table: which model, how much of the data,
and how it trains.

A row (:class:`Recipe`) is one (job, data set, model, preset): ``experiment`` rows feed
the paper's decompositions, correlations, sweeps and mislabel detection at the ``quick``
and ``paper`` presets (:mod:`.experiments`); ``evaluate`` rows feed the attribution
benchmark (:mod:`.evaluate_job`); ``scores`` rows are the built-in models of
``pbrf-fast scores --model NAME --dataset NAME`` (:mod:`.builtin_scores`). The reproduction's
cost model (:mod:`.reproduce.costs`) sizes networks from the same rows. How a job draws
its subset (a seeded fraction, seeded rows, the first rows) stays with the job; the sizes
are here.

A job's command-line overrides (``--epochs``, ``--width``, ...) replace a row's value;
``None`` in a row means the job's own setting decides (say, the ``--weight-decay`` the
``scores`` influence also uses).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import InputError
from .training import TrainConfig

__all__ = ["Training", "DataSubset", "Recipe", "RECIPES", "recipe", "SCORES_MODELS", "SCORES_DATASETS", "LighterQuick",
           "REPRODUCTION_QUICK"]


@dataclasses.dataclass(frozen=True)
class Training:
    """How a setting's base model trains: optimiser (``sgd``, ``momentum``, ``adam``, ``lbfgs``
    to convergence; ``one_cycle``: SGD with momentum 0.9 under a one-cycle schedule, the
    ``scores`` built-ins), learning rate, epochs, batch and weight decay."""

    optimizer: str = "sgd"
    lr: float | None = None        # None (L-BFGS): TrainConfig's default, recorded but unused
    epochs: float = 0
    batch_size: int = 128
    weight_decay: float | None = 0.0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1

    def config(self, seed: int, **overrides) -> TrainConfig:
        """The harness's :class:`~.training.TrainConfig` of this recipe (``one_cycle`` has none)."""
        fields = dict(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer=self.optimizer,
                      lr_milestones=self.lr_milestones, lr_gamma=self.lr_gamma, seed=seed) | overrides
        return TrainConfig(**{k: v for k, v in fields.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class DataSubset:
    """How much of the data set a setting uses (``None``: all of it)."""

    train_fraction: float | None = None  # a seeded share of the training set
    train_points: int | None = None      # a seeded count of training points
    test_points: int | None = None
    calibration_points: int = 0          # training images kept out to calibrate batch norm
    sequence_length: int | None = None   # language models: tokens per sequence


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One setting: its model (``width`` x ``depth`` hidden ReLU layers for an MLP; ``max_width``
    caps a job's ``--width``), data, training, and for ``experiment`` rows LiSSA's depth, whose
    truncation matches the training (see :func:`.experiments.matched_lissa_scale`), and batch."""

    job: str
    dataset: str
    model: str
    preset: str
    data: DataSubset
    train: Training
    loss: str = "cross_entropy"
    width: int | None = None
    depth: int | None = None
    max_width: int | None = None
    dtype: torch.dtype | None = None     # float64 settings (the convex ones); None: float32 data, the model as built
    lissa_depth: int | None = None
    lissa_batch_size: int = 128
    outputs: int = 10

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.job, self.dataset, self.model, self.preset

    def build_model(self, in_shape, num_outputs: int, seed: int | None, width: int | None = None,
                    depth: int | None = None) -> torch.nn.Module:
        """The setting's network for inputs of ``in_shape`` (features, or (C, H, W))."""
        from .models import build_model, mlp, transformer_lm

        if self.model == "mlp":
            hidden = (width or self.width,) * (depth or self.depth)
            net = mlp(math.prod(in_shape), hidden, num_outputs, activation="relu", seed=seed)
        elif self.model == "transformer":  # in_shape: (vocabulary,)
            net = transformer_lm(in_shape[0], width or self.width, heads=2, layers=self.depth,
                                 max_len=self.data.sequence_length, seed=seed)
        else:
            net = build_model(self.model, in_shape, num_outputs, seed=seed)
        return net if self.dtype is None else net.to(self.dtype)


def _experiment(dataset, model, quick: dict, paper: dict, **shared) -> list[Recipe]:
    """The quick and paper rows of one experiment: ``quick`` / ``paper`` hold what differs
    (data, train, width, lissa_depth)."""
    return [Recipe("experiment", dataset, model, preset, **(shared | own))
            for preset, own in (("quick", quick), ("paper", paper))]


def _logistic_experiment(dataset) -> list[Recipe]:
    # L-BFGS to convergence on the convex objective; nothing differs between the presets
    same = dict(data=DataSubset(), train=Training(optimizer="lbfgs", weight_decay=0.01))
    return _experiment(dataset, "logreg", same, same, loss="bce", dtype=torch.float64, outputs=1)


def _uci_experiment(dataset) -> list[Recipe]:
    return _experiment(dataset, "mlp", dict(train=Training(lr=0.03, epochs=200), lissa_depth=1000),
                       dict(train=Training(lr=0.03, epochs=1000), lissa_depth=5000),
                       data=DataSubset(), loss="mse", width=128, depth=2, outputs=1)


def _mnist_mlp_experiment(dataset) -> list[Recipe]:
    return _experiment(dataset, "mlp",
                       dict(data=DataSubset(train_fraction=0.02, test_points=1000), width=256,
                            train=Training(lr=0.1, epochs=20), lissa_depth=1000),
                       dict(data=DataSubset(train_fraction=0.1, test_points=1000), width=1024,
                            train=Training(lr=0.1, epochs=1000), lissa_depth=5000), depth=2)


def _autoencoder_experiment(dataset) -> list[Recipe]:
    # Appendix E.3: the autoencoder trains on the full MNIST (the CNNs on 10%)
    return _experiment(dataset, "autoencoder",
                       dict(data=DataSubset(train_fraction=0.02, test_points=1000), lissa_depth=500,
                            train=Training("momentum", lr=0.01, epochs=5, batch_size=128, weight_decay=5e-5)),
                       dict(data=DataSubset(train_fraction=1.0, test_points=1000), lissa_depth=10000,
                            train=Training("momentum", lr=0.01, epochs=1000, batch_size=1024, weight_decay=5e-5)),
                       loss="bce", outputs=784)


def _cnn_experiment(dataset, model) -> list[Recipe]:
    """Convolutional nets (Appendix E.3): SGD with momentum, batch 128, weight decay 5e-4."""
    # ResNet-20 runs with batch norm in eval mode (a fixed affine map, identity at initialisation), so it
    # trains as an unnormalised 20-layer net: lr 0.01 with momentum diverges in the first epoch, 0.003 trains.
    lr = 0.003 if model == "resnet20" else 0.01
    cifar = dataset == "cifar10"
    # CIFAR-10 (Appendix E.3): the learning rate divided by 5 at epochs 60, 120, 160
    schedule = dict(lr_milestones=(60, 120, 160), lr_gamma=0.2) if cifar else {}
    return _experiment(dataset, model,
                       dict(data=DataSubset(train_fraction=0.04 if cifar else 0.02, test_points=1000),
                            train=Training("momentum", lr=lr, epochs=4, weight_decay=5e-4), lissa_depth=500),
                       dict(data=DataSubset(train_fraction=1.0 if cifar else 0.1, test_points=1000),
                            train=Training("momentum", lr=lr, epochs=200, weight_decay=5e-4, **schedule),
                            lissa_depth=10000))


def _transformer_experiment() -> list[Recipe]:
    """2-layer Transformer language model on PTB (Appendix E.3): Adam, batch 20."""
    return _experiment("ptb", "transformer",
                       dict(data=DataSubset(train_points=200, test_points=200, sequence_length=20), width=64,
                            train=Training("adam", lr=1e-3, epochs=4, batch_size=20), lissa_depth=200),
                       dict(data=DataSubset(test_points=200, sequence_length=35), width=256,
                            train=Training("adam", lr=1e-3, epochs=10, batch_size=20), lissa_depth=5000),
                       loss="sequence_cross_entropy", depth=2, lissa_batch_size=20)


def _evaluate() -> list[Recipe]:
    """The ``evaluate`` settings (the table in :mod:`.evaluate_job`'s docstring)."""
    lbfgs = Training(optimizer="lbfgs", weight_decay=1e-3)
    return [
        Recipe("evaluate", "digits", "logreg", "", DataSubset(train_points=1000), lbfgs, dtype=torch.float64),
        Recipe("evaluate", "digits", "mlp", "", DataSubset(train_points=1000),
               Training(lr=0.1, epochs=30, weight_decay=1e-3), depth=1, max_width=64),
        Recipe("evaluate", "mnist", "logreg", "", DataSubset(train_points=5000, test_points=500), lbfgs,
               dtype=torch.float64),
        Recipe("evaluate", "mnist", "mlp", "", DataSubset(train_points=5000, test_points=500),
               Training(lr=0.1, epochs=10, weight_decay=1e-3), depth=1),
        # ResNet-20 with batch norm calibrated on 512 held-out images (see evaluate_job._resnet_recipe);
        # batch 32: at 128 a 1,000-image set is 8 steps an epoch, too few for 8 epochs to train
        Recipe("evaluate", "cifar10", "resnet20", "", DataSubset(train_points=1000, test_points=100,
                                                                 calibration_points=512),
               Training("momentum", lr=0.05, epochs=8, batch_size=32, weight_decay=5e-4)),
    ]


SCORES_MODELS = ("resnet20", "mlp")
SCORES_DATASETS = ("cifar10", "digits", "synthetic")


def _scores() -> list[Recipe]:
    """The built-in models of ``pbrf-fast scores``: one epoch of one-cycle SGD at lr 0.05; the
    weight decay is the job's ``--weight-decay``, which its influence uses too."""
    train = Training("one_cycle", lr=0.05, epochs=1.0, batch_size=128, weight_decay=None)
    rows = [Recipe("scores", "cifar10", "resnet20", "", DataSubset(), train)]
    for dataset in SCORES_DATASETS:
        data = DataSubset(train_points=512, test_points=16) if dataset == "synthetic" else DataSubset()
        rows.append(Recipe("scores", dataset, "mlp", "", data, train, width=64, depth=2))
    return rows


def _all_recipes() -> list[Recipe]:
    rows = _logistic_experiment("cancer") + _logistic_experiment("diabetes")
    rows += _uci_experiment("concrete") + _uci_experiment("energy")
    rows += _experiment("digits", "mlp", dict(train=Training(lr=0.1, epochs=30), lissa_depth=500),
                        dict(train=Training(lr=0.1, epochs=200), lissa_depth=5000),
                        data=DataSubset(), width=64, depth=2)
    for dataset in ("mnist", "fashion_mnist"):
        rows += _mnist_mlp_experiment(dataset) + _autoencoder_experiment(dataset)
    for dataset in ("mnist", "fashion_mnist", "cifar10"):
        for model in ("lenet", "alexnet", "vgg13", "resnet20"):
            rows += _cnn_experiment(dataset, model)
    return rows + _transformer_experiment() + _evaluate() + _scores()


RECIPES: dict[tuple[str, str, str, str], Recipe] = {r.key: r for r in _all_recipes()}


def recipe(job: str, dataset: str, model: str, preset: str = "") -> Recipe:
    """The row of (job, data set, model, preset), or a ValueError naming the rows the job has."""
    try:
        return RECIPES[job, dataset, model, preset]
    except KeyError:
        known = sorted({(d, m) for j, d, m, _ in RECIPES if j == job})
        raise InputError(f"no {job} recipe for dataset {dataset!r}, model {model!r}"
                         f"{f', preset {preset!r}' if preset else ''}; the {job} settings: {known}") from None


@dataclasses.dataclass(frozen=True)
class LighterQuick:
    """The reproduction's quick run of a setting whose ``quick`` row is too slow on a 2-core CPU:
    a smaller share of the data, fewer epochs, a shorter LiSSA over smaller batches (its scale
    matched again) and fewer removed points; ``None`` keeps the quick row's value."""

    train_fraction: float | None = None
    epochs: int | None = None
    lissa_depth: int | None = None
    lissa_batch_size: int | None = None
    removed: int | None = None

    def overrides(self) -> dict:
        """The :func:`.experiments.build` keywords of this run (the removed points go to its config)."""
        values = {"fraction": self.train_fraction, "epochs": self.epochs, "lissa_depth": self.lissa_depth,
                  "lissa_batch_size": self.lissa_batch_size}
        return {k: v for k, v in values.items() if v is not None}


# LiSSA dominates the convolutional nets' quick cost (a GNH product per example of its batch per step and
# column); the big nets (AlexNet and VGG13 take 4-7 s per 128-example step here, ResNet-20 0.5-2.5 s) run
# on 1% of the data for 2 epochs. VGG13 on MNIST runs its CIFAR-10 sibling's lighter LiSSA and 3 removed
# points: at 5 points and depth 100 its quick row was estimated at ~73 min here, most of it LiSSA (cost ~
# depth x batch x points).
REPRODUCTION_QUICK: dict[tuple[str, str], LighterQuick] = {
    ("mnist", "autoencoder"): LighterQuick(lissa_depth=100, lissa_batch_size=32, removed=5),
    ("mnist", "lenet"): LighterQuick(0.02, 4, 200, 32, removed=8),
    ("mnist", "alexnet"): LighterQuick(0.01, 2, 100, 32, removed=5),
    ("mnist", "vgg13"): LighterQuick(0.01, 2, 50, 16, removed=3),
    ("mnist", "resnet20"): LighterQuick(0.01, 2, 100, 32, removed=5),
    ("cifar10", "lenet"): LighterQuick(0.04, 4, 200, 32, removed=5),
    ("cifar10", "alexnet"): LighterQuick(0.01, 2, 50, 16, removed=3),
    ("cifar10", "vgg13"): LighterQuick(0.01, 2, 50, 16, removed=3),
    ("cifar10", "resnet20"): LighterQuick(0.01, 2, 50, 16, removed=3),
}
