"""Typed settings of the paper's experiments: what the command line parses into,
and what the harness functions (:mod:`.jobs`, :mod:`.mislabel`, :mod:`.sweep`,
:mod:`.evaluate_job`, :mod:`.builtin_scores`) take. The demo and the tests build them directly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..curvatures import CURVATURES, OWN_INVERSES
from ..inverses import INVERSES

__all__ = ["ExperimentConfig", "RunOptions", "SweepConfig", "BuiltinModelConfig", "EvaluateConfig", "SWEEP_PARAMETERS",
           "EVALUATE_SOLVERS", "DEFAULT_EVALUATE_SOLVERS", "COLD_START_ORDERS"]

# evaluate's estimators, read off the library's tables: every inverse of the exact GNH, then every
# approximate curvature (kfac / ekfac) solved by its own exact inverse (that inverse is not listed alone).
# pcg: the exact GNH solved by preconditioned CG (EvaluateConfig.preconditioner; converges where plain CG stalls); not in the
# default list, which keeps one exact iterative solver.
EVALUATE_SOLVERS = (tuple(name for name in INVERSES if name not in OWN_INVERSES)
                    + tuple(name for name, c in CURVATURES.items() if c.own_inverse))
DEFAULT_EVALUATE_SOLVERS = tuple(s for s in EVALUATE_SOLVERS if s != "pcg")
COLD_START_ORDERS = ("replay", "fresh")
SWEEP_PARAMETERS = ("width", "depth", "epochs", "weight_decay", "damping", "fraction_removed")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Which experiment, and the overrides of its preset (None: the preset's value).

    Every field changes the results, so all of them are saved beside them.
    """

    dataset: str = "concrete"
    model: str = "auto"
    preset: str = "quick"
    seed: int = 0
    data_dir: str | None = None
    removed: int | None = None          # removed points
    test_points: int | None = None      # test points for the correlations
    chunk: int = 10                     # removed points retrained together
    damping: float | None = None
    curvature: str = "gnh"
    solver: str | None = None           # the influence estimate's solver
    corrupt: float = 0.0                # mislabel: fraction of labels corrupted
    candidates: int | None = None       # mislabel: training points scored by the PBRF
    cold_start_order: str = "replay"    # cold start's batch order: "replay" the base run's, or "fresh"

    def __post_init__(self):
        if self.cold_start_order not in COLD_START_ORDERS:
            raise ValueError(f"cold_start_order must be one of {COLD_START_ORDERS}, got {self.cold_start_order!r}")

    def arguments(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where results go and what to do with results already there (never changes them)."""

    out: Path = Path("pbrf-fast-out")
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    device: str = "cpu"     # where the harness computes (e.g. cuda): the same question, so not saved as an argument

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Figure 5: one hyperparameter, the values it takes."""

    parameter: str
    values: tuple[float, ...]

    def __post_init__(self):
        if self.parameter not in SWEEP_PARAMETERS:
            raise ValueError(f"sweep parameter must be one of {SWEEP_PARAMETERS}, got {self.parameter!r}")
        if not self.values:
            raise ValueError("a sweep needs at least one value")


@dataclasses.dataclass(frozen=True)
class BuiltinModelConfig:
    """The ``scores`` job's built-in model (``--model resnet20|mlp``): which data set it trains
    on, where the data are, and overrides of its recipe's training (None: the recipe's,
    :mod:`.recipes`). The scoring settings are the library's
    :class:`pbrf_fast.scale.scores_job.ScoresConfig`."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    cache_dir: str | None = None
    train_epochs: float | None = None
    lr: float | None = None


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` job: attribution quality (LDS, LOO) of each solver against
    retraining on random subsets and against the PBRF of each subset's complement.

    ``None`` means the setting's default (see :mod:`.evaluate_job`). Every field
    but ``threads`` changes the results and is saved beside them.
    """

    dataset: str = "digits"
    model: str = "logreg"
    solvers: tuple[str, ...] = DEFAULT_EVALUATE_SOLVERS
    subsets: int = 100
    alpha: float = 0.5
    repeats: int = 1
    checkpoints: tuple[int, ...] = (1,)
    train_points: int | None = None
    test_points: int | None = None
    pbrf: bool = True
    loo: int = 0                        # leave-one-out retrainings for the LOO correlation (0: none)
    brittleness: int = 0                # test points checked for brittleness (0: none)
    brittleness_ks: tuple[int, ...] = (10, 20, 40, 80)
    # each a number or "auto" (pbrf_fast.damping); several put damping on the table's axis
    damping: tuple = ("auto",)
    weight_decay: float | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None       # SGD mini-batch; None: the setting's (32 for ResNet-20, else 128)
    width: int = 128
    cg_iters: int = 200
    tol: float = 1e-4
    # solver "pcg": a rank-r Nystrom sketch of the GNH (bench/bench_pcg.py: 22 iterations against CG's 188
    # on the MNIST MLP at r = 500; EK-FAC alone preconditions this ReLU net worse than nothing)
    preconditioner: str = "nystrom"
    preconditioner_rank: int = 500
    lissa_depth: int = 1000
    lissa_batch_size: int = 128
    rank: int = 64
    chunk: int = 50                     # subset models trained together
    lbfgs_iters: int = 500              # L-BFGS iterations of subset models (convex recipes)
    seed: int = 0
    data_dir: str | None = None
    # Your own setting: model "file.py:make_model" (or "module:make_model"), its data file
    # (x_train, y_train, x_test, y_test), its loss and the optimizer it was trained with;
    # --epochs and --lr are then required (the retraining recipe), --batch-size and
    # --weight-decay default to 128 and 0.
    data: str | None = None
    loss: str = "cross_entropy"
    optimizer: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "solvers", tuple(self.solvers))
        object.__setattr__(self, "checkpoints", tuple(sorted(set(self.checkpoints))))
        object.__setattr__(self, "brittleness_ks", tuple(sorted(set(self.brittleness_ks))))
        from ..damping import check_damping
        from ..errors import InputError

        dampings = self.damping if isinstance(self.damping, (tuple, list)) else (self.damping,)
        if not dampings:
            raise InputError("damping: give at least one value (a number or 'auto')")
        checked = []
        for value in dampings:
            value = check_damping(value, "--damping")
            if value not in checked:
                checked.append(value)
        object.__setattr__(self, "damping", tuple(checked))

    def arguments(self) -> dict:
        return dataclasses.asdict(self)
