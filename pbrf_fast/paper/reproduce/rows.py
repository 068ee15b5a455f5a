"""What each reproduction row is: its place in the paper, the paper's value, and the
job that measures ours at each preset (:data:`ROWS`); which folder holds a job's run
(rows reading the same experiment share the first one's), and choosing rows by target."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ...errors import InputError
from ..config import ExperimentConfig
from ..recipes import REPRODUCTION_QUICK
from .paper_values import FIGURE5, TABLE2, TABLE4, TABLE5, TABLE6, TABLE7, TABLE8

__all__ = ["Job", "Row", "ROWS", "TARGETS", "PRIORITY", "FRESH_ORDER_ROWS", "ReproduceError", "owner", "job_folder",
           "select_rows", "list_rows"]


class ReproduceError(InputError):
    """An unknown target or row, or a results folder the report cannot read."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of an existing harness job: ``kind`` is decompose, mislabel or sweep.

    ``config``: :class:`~.config.ExperimentConfig` fields (the preset is added per preset);
    ``overrides``: :func:`~.experiments.build` keywords (epochs, width, ...);
    ``sweep``: (parameter, values) for Figure 5.
    """

    kind: str
    config: tuple = ()
    overrides: tuple = ()
    sweep: tuple | None = None

    def key(self, preset: str) -> str:
        return json.dumps({"kind": self.kind, "preset": preset, "config": dict(self.config),
                           "overrides": dict(self.overrides), "sweep": self.sweep}, sort_keys=True)

    def experiment_config(self, preset: str, data_dir: str | None) -> ExperimentConfig:
        return ExperimentConfig(**dict(self.config), preset=preset, data_dir=data_dir)

    def command(self, target: str, row: str, preset: str) -> str:
        return f"pbrf-fast reproduce {target} --row {row} --preset {preset}"

    def describe(self) -> str:
        """The settings in words, e.g. ``mnist mlp, removed 10, curvature hessian``."""
        c = dict(self.config)
        parts = [f"{c.get('dataset')}" + (f" {c['model']}" if c.get("model", "auto") != "auto" else "")]
        parts += [f"{k.replace('_', ' ')} {v}" for k, v in c.items() if k not in ("dataset", "model")]
        parts += [f"{k} {v}" for k, v in dict(self.overrides).items()]
        if self.sweep:
            parts.append(f"sweep {self.sweep[0]} over {', '.join(f'{v:g}' for v in self.sweep[1])}")
        return ", ".join(parts)


def _job(kind="decompose", sweep=None, overrides=None, **config) -> Job:
    return Job(kind, tuple(sorted(config.items())), tuple(sorted((overrides or {}).items())),
               None if sweep is None else (sweep[0], tuple(float(v) for v in sweep[1])))


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row or figure panel: where it is in the paper, what the paper reports, how we measure it."""

    target: str
    name: str
    measure: str              # gaps, correlations, two_stage, scatter, bars, sweep, mislabel
    paper: object             # the paper's value (numbers, or a description for figures)
    quick: Job | None         # None: collected from other rows (Figure 4)
    paper_job: Job | None
    note: str = ""            # a known explanation of a difference, kept with its row
    sources: tuple = ()       # rows whose runs a figure draws on, "target/row"

    @property
    def id(self) -> str:
        return f"{self.target}/{self.name}"

    def job(self, preset: str) -> Job | None:
        return self.quick if preset == "quick" else self.paper_job


NOTE_WARM = ("Our cold start replays theta^0 and the base run's batch order exactly (as Appendix E.2 says), "
             "so it differs from the base run only through the removed point; this keeps the warm-start gap "
             "smaller than the paper's. `--cold-start-order fresh` gives the other reading (Table 5's "
             "`concrete-fresh-order` and `energy-fresh-order` rows).")
NOTE_PTB = ("Proximity gap larger than the paper's: under Adam's scale invariance a small proximal gradient on "
            "parameters with no data gradient (unused embeddings) still moves them by about lr per step; the quick "
            "setting (200 sequences, width 64) makes it worse.")
NOTE_FRESH = ("Not a row of the paper: the row above with cold start drawing a fresh batch order "
              "(`--cold-start-order fresh`) instead of replaying the base run's, the other reading of Appendix E.2.")
FRESH_ORDER_ROWS = ("concrete", "energy")
NOTE_RESNET = ("ResNet-20 runs with batch norm in eval mode (a fixed affine map, the identity at initialisation), "
               "so it trains as an unnormalised 20-layer net: lr 0.003 (0.01 diverges in the first epoch). At the "
               "quick setting (1% of the data, 2 epochs) it is barely trained (see its base training objective; "
               "chance is ln 10 = 2.30), so its gaps describe a network at the start of training.")
NOTE_T8 = "Table 8's warm-start and PBRF columns equal Table 7's, so it is read from the Hessian runs."


# ----------------------------------------------------------------------------------------- the jobs
def _decomposition_jobs() -> dict[str, tuple[Job, Job]]:
    """(quick, paper) job per Table 5 row. Quick keeps each preset's own reduced settings (the
    experiment's quick recipe) or, where that is too slow here, the lighter run of
    :data:`..recipes.REPRODUCTION_QUICK` (the convolutional nets, the autoencoder)."""
    jobs = {name: (_job(**config), _job(**config)) for name, config in (
        ("cancer", {"dataset": "cancer"}), ("diabetes", {"dataset": "diabetes"}),
        ("concrete", {"dataset": "concrete"}), ("energy", {"dataset": "energy"}),
        ("mlp-mnist", {"dataset": "mnist", "model": "mlp"}),
        ("mlp-fashion_mnist", {"dataset": "fashion_mnist", "model": "mlp"}),
        ("transformer-ptb", {"dataset": "ptb", "model": "transformer"}))}
    for (dataset, model), lighter in REPRODUCTION_QUICK.items():
        jobs[f"{model}-{dataset}"] = (_job(dataset=dataset, model=model, removed=lighter.removed,
                                           overrides=lighter.overrides()),
                                      _job(dataset=dataset, model=model))
    return jobs


def _hessian(pair: tuple[Job, Job]) -> tuple[Job, Job]:
    return tuple(dataclasses.replace(j, config=tuple(sorted(dict(j.config, curvature="hessian").items())))
                 for j in pair)


def _build_rows() -> list[Row]:
    jobs = _decomposition_jobs()
    rows = []
    for name, paper in TABLE5.items():
        note = NOTE_PTB if name == "transformer-ptb" else (NOTE_WARM if name not in ("cancer", "diabetes") else "")
        if name.startswith("resnet20"):
            note = NOTE_RESNET + " " + note
        rows.append(Row("table5", name, "gaps", paper, *jobs[name], note=note))
    for name in FRESH_ORDER_ROWS:   # the other reading of cold start, beside the replayed one
        fresh = tuple(dataclasses.replace(j, config=tuple(sorted(dict(j.config, cold_start_order="fresh").items())))
                      for j in jobs[name])
        rows.append(Row("table5", f"{name}-fresh-order", "gaps", TABLE5[name], *fresh, note=NOTE_FRESH))
    for name, paper in TABLE4.items():
        rows.append(Row("table4", name, "gaps", paper, *_hessian(jobs[name]), note=NOTE_WARM))
    for name, paper in TABLE2.items():
        rows.append(Row("table2", name, "correlations", paper, *jobs[name]))
    for name, paper in TABLE6.items():
        rows.append(Row("table6", name, "correlations", paper, *jobs[name]))
    for name, paper in TABLE7.items():
        rows.append(Row("table7", name, "correlations", paper, *_hessian(jobs[name])))
    for name, paper in TABLE8.items():
        rows.append(Row("table8", name, "two_stage", paper, *_hessian(jobs[name]), note=NOTE_T8))
    rows += [
        Row("figure1", "lr", "scatter", "IF aligns well with LOO retraining for logistic regression",
            *jobs["cancer"], sources=("table5/cancer",)),
        Row("figure1", "mlp", "scatter", "IF aligns poorly with LOO retraining for an MLP",
            *jobs["concrete"], sources=("table5/concrete",)),
        Row("figure1", "pbrf", "scatter", "IF is a good approximation to the PBRF for the same MLP",
            *jobs["concrete"], sources=("table5/concrete",)),
        Row("figure4", "all", "bars", "the five terms per model and data set (Table 5's values as bars); "
            "the first three dominate everywhere", None, None, sources=tuple(f"table5/{n}" for n in TABLE5)),
    ]
    for parameter, (paper_values, quick_values, claim, _) in FIGURE5.items():
        rows.append(Row("figure5", parameter, "sweep", f"{claim} (MLP on 10% MNIST, values "
                        f"{', '.join(f'{v:g}' for v in paper_values)})",
                        # quick: the MLP on scikit-learn's 8x8 digits (LiSSA on the MNIST MLP alone takes
                        # ~5 min a value here); paper: the MLP on 10% MNIST
                        _job("sweep", sweep=(parameter, quick_values), dataset="digits", model="mlp", removed=5),
                        _job("sweep", sweep=(parameter, paper_values), dataset="mnist", model="mlp")))
    rows.append(Row("figure6", "mnist", "mislabel",
                    "self-influence from IF and from the PBRF finds the corrupted labels (10% of 10% MNIST) far "
                    "faster than random inspection",
                    # quick: the MLP on scikit-learn's 8x8 digits, 300 points scored (on the 2% MNIST MLP the
                    # LiSSA of one point takes ~40 s here); paper: 10% MNIST, every point scored
                    _job("mislabel", dataset="digits", model="mlp", corrupt=0.1, chunk=50),
                    _job("mislabel", dataset="mnist", model="mlp", corrupt=0.1)))
    return rows


ROWS: list[Row] = _build_rows()
TARGETS = tuple(dict.fromkeys(r.target for r in ROWS))
# `reproduce all` order: the priorities, cheapest first within them.
PRIORITY = ("table5/cancer", "table5/diabetes", "table5/concrete", "table5/energy", "table5/mlp-mnist",
            "figure6/mnist", "table5/lenet-mnist", "table5/transformer-ptb", "table4/concrete", "table4/energy",
            "table5/concrete-fresh-order", "table5/energy-fresh-order",
            "table5/mlp-fashion_mnist", "figure5/damping", "figure5/width", "figure5/epochs", "figure5/weight_decay",
            "figure5/fraction_removed", "figure5/depth", "table5/lenet-cifar10", "table5/resnet20-mnist",
            "table4/mlp-mnist", "table5/autoencoder-mnist", "table5/resnet20-cifar10", "table4/mlp-fashion_mnist",
            "table5/alexnet-mnist", "table5/vgg13-mnist", "table5/alexnet-cifar10", "table5/vgg13-cifar10")


def _owners(preset: str) -> dict[str, Row]:
    """The row whose folder holds each job: the first in registry order that names it."""
    owners = {}
    for row in ROWS:
        job = row.job(preset)
        if job is not None:
            owners.setdefault(job.key(preset), row)
    return owners


def owner(row: Row, preset: str) -> Row:
    job = row.job(preset)
    return row if job is None else _owners(preset)[job.key(preset)]


def job_folder(out, row: Row, preset: str) -> Path:
    o = owner(row, preset)
    return Path(out) / o.target / o.name


def select_rows(target: str, row: str | None = None) -> list[Row]:
    """The rows of ``target`` (``all``: every row, in run priority order), or the one named ``row``."""
    if target == "all":
        if row:
            raise ReproduceError("--row goes with one target, not 'all'")
        order = {name: k for k, name in enumerate(PRIORITY)}
        return sorted(ROWS, key=lambda r: order.get(r.id, len(order)))
    if target not in TARGETS:
        raise ReproduceError(f"unknown target {target!r}; choose from all, report, steps, {', '.join(TARGETS)}")
    rows = [r for r in ROWS if r.target == target]
    if row is None:
        return rows
    chosen = [r for r in rows if r.name == row]
    if not chosen:
        raise ReproduceError(f"{target} has no row {row!r}; its rows: {', '.join(r.name for r in rows)}")
    return chosen


def list_rows(rows: list[Row], preset: str) -> str:
    lines = []
    for row in rows:
        job = row.job(preset)
        where = "collected from " + ", ".join(row.sources) if job is None else job.describe()
        shared = owner(row, preset)
        if shared is not row:
            where += f" (the run of {shared.id})"
        lines.append(f"{row.id:32s} {where}")
    return "\n".join(lines)


