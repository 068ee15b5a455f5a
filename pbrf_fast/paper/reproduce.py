"""Every number-bearing table row and figure panel of the paper, mapped to the job that
measures it, run, collected and set beside the paper's value.

The registry (:data:`ROWS`) holds, per row: the paper's value (read from the paper's
text), the job that measures ours at each preset (``quick``: minutes to tens of minutes
on a laptop CPU; ``paper``: Appendix E.3's settings, for a GPU machine), and the claim
the paper draws from it. Rows that read the same experiment share one job (Table 6's
Concrete row reads the Table 5 Concrete run's correlations), kept in the folder of
the first row that names it: ``DIR/<target>/<row>/``.

:func:`run_rows` runs rows in sequence through the existing jobs (decomposition,
mislabel detection, sweeps), each resuming from what its results folder already
holds; a finished row leaves ``row.json`` (its job, run time, work) and is skipped
next time. :func:`write_report` reads the folders back and writes the side-by-side
Markdown (REPRODUCTION.md) and the figures. No experiment logic lives here.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_json, atomic_write_text
from ..errors import InputError
from .config import ExperimentConfig, RunOptions, SweepConfig

__all__ = ["Job", "Row", "ROWS", "TARGETS", "ReproduceError", "select_rows", "job_folder", "run_rows",
           "collect", "write_report", "list_rows", "expected_paper_seconds"]

GAP_NAMES = ("warm_start_gap", "proximity_gap", "non_convergence_gap", "linearization_error", "solver_error")
GAP_LABELS = ("warm-start", "proximity", "non-convergence", "linearization", "solver")


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


# ------------------------------------------------------------------------------- the paper's values
def _gaps(*pairs):
    return {name: pair for name, pair in zip(GAP_NAMES, pairs)}


def _corr(*values, responses=("cold_start", "warm_start", "pbrf")):
    return {r: {"pearson": values[2 * k], "spearman": values[2 * k + 1]} for k, r in enumerate(responses)}


Z = (0.0, 0.0)
TABLE5 = {  # Table 5: mean ± std over 20 removed points
    "cancer": _gaps(Z, Z, Z, Z, Z),
    "diabetes": _gaps(Z, Z, Z, Z, Z),
    "concrete": _gaps((0.079, 0.008), (0.002, 0.0), (0.082, 0.001), Z, (0.001, 0.002)),
    "energy": _gaps((0.016, 0.001), (0.001, 0.0), (0.016, 0.001), Z, Z),
    "mlp-mnist": _gaps((0.208, 0.732), (0.006, 0.024), (0.211, 0.745), Z, (0.001, 0.004)),
    "mlp-fashion_mnist": _gaps((2.968, 0.545), (0.385, 0.028), (0.408, 0.033), (0.0, 0.001), (0.007, 0.010)),
    "autoencoder-mnist": _gaps((20.743, 0.522), (14.330, 0.184), (11.409, 0.430), Z, (0.307, 0.088)),
    "lenet-mnist": _gaps((7.434, 1.068), (5.393, 0.547), (3.748, 0.324), (0.0, 0.001), (0.001, 0.001)),
    "alexnet-mnist": _gaps((13.403, 1.289), (0.001, 0.0), (0.118, 0.0), Z, (0.013, 0.002)),
    "vgg13-mnist": _gaps((7.389, 0.744), (4.872, 1.052), (8.601, 0.478), Z, (0.001, 0.001)),
    "resnet20-mnist": _gaps((4.433, 0.059), (4.061, 0.157), (4.940, 0.155), (0.001, 0.0), (0.002, 0.001)),
    "lenet-cifar10": _gaps((10.668, 0.162), (6.520, 0.442), (5.032, 0.799), (0.001, 0.0), Z),
    "alexnet-cifar10": _gaps((7.530, 0.233), (5.956, 0.102), (2.864, 0.367), Z, Z),
    "vgg13-cifar10": _gaps((8.410, 1.926), (6.279, 0.708), (6.031, 0.660), Z, (0.073, 0.161)),
    "resnet20-cifar10": _gaps((5.827, 0.152), (4.435, 0.669), (3.280, 0.429), Z, (0.003, 0.001)),
    "transformer-ptb": _gaps((57.926, 5.055), (30.756, 0.673), (61.675, 1.042), (5.002, 1.556), (3.316, 2.630)),
}
TABLE4 = {  # Table 4: the same with the Hessian instead of the GNH (only the solver error changes)
    "concrete": _gaps((0.079, 0.008), (0.002, 0.0), (0.082, 0.001), Z, (0.017, 0.026)),
    "energy": _gaps((0.016, 0.001), (0.001, 0.0), (0.016, 0.001), Z, Z),
    "mlp-mnist": _gaps((0.208, 0.732), (0.006, 0.024), (0.211, 0.745), Z, (0.003, 0.006)),
    "mlp-fashion_mnist": _gaps((2.968, 0.545), (0.385, 0.028), (0.408, 0.033), (0.0, 0.001), (0.009, 0.014)),
}
TABLE2 = {  # Table 2 (MNIST): Pearson, Spearman of IF against cold start, warm start, PBRF
    "mlp-mnist": _corr(-0.55, 0.01, 0.22, 0.35, 0.98, 0.99),
    "lenet-mnist": _corr(-0.19, 0.12, 0.32, 0.25, 0.93, 0.52),
    "alexnet-mnist": _corr(-0.16, -0.08, 0.51, 0.58, 0.99, 0.99),
    "vgg13-mnist": _corr(0.45, -0.07, -0.28, -0.51, 0.98, 0.77),
    "resnet20-mnist": _corr(0.09, -0.06, 0.02, 0.09, 0.81, 0.76),
}
TABLE6 = {  # GNH
    "concrete": _corr(-0.11, 0.12, 0.09, 0.11, 0.93, 0.94),
    "energy": _corr(0.03, 0.04, 0.09, 0.13, 0.97, 0.91),
    "mlp-mnist": _corr(-0.10, 0.01, 0.22, 0.35, 0.98, 0.91),
    "mlp-fashion_mnist": _corr(0.16, 0.00, 0.06, 0.07, 0.90, 0.92),
}
TABLE7 = {  # Hessian
    "concrete": _corr(-0.14, 0.32, 0.24, 0.37, 0.85, 0.71),
    "energy": _corr(-0.01, -0.24, 0.44, 0.57, 0.95, 0.83),
    "mlp-mnist": _corr(-0.16, -0.12, 0.21, -0.14, 0.98, 0.81),
    "mlp-fashion_mnist": _corr(-0.19, 0.01, 0.05, 0.24, 0.91, 0.88),
}
TWO_STAGE = ("two_stage", "warm_start", "pbrf")
TABLE8 = {  # two-stage LOO; its warm-start and PBRF columns equal Table 7's, so the Hessian runs
    "concrete": _corr(0.52, 0.61, 0.24, 0.37, 0.85, 0.71, responses=TWO_STAGE),
    "energy": _corr(0.92, 0.75, 0.44, 0.57, 0.95, 0.83, responses=TWO_STAGE),
    "mlp-mnist": _corr(0.73, 0.53, 0.21, -0.14, 0.98, 0.81, responses=TWO_STAGE),
    "mlp-fashion_mnist": _corr(0.69, 0.52, 0.05, 0.24, 0.91, 0.88, responses=TWO_STAGE),
}

# Figure 5 (Appendix E.4): the paper's values of each swept parameter, and the trend it reports.
FIGURE5 = {
    "width": ((16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), (16, 64, 256),
              "linearization error falls as the width grows", (("linearization_error", "down"),)),
    "depth": ((1, 3, 5, 7, 9, 11, 13, 15), (1, 3), "no strong relationship between the terms and the depth", ()),
    "epochs": ((100, 500, 1000, 3000, 5000, 7000, 9000), (10, 60), "non-convergence gap falls with longer training",
               (("non_convergence_gap", "down"),)),
    "weight_decay": ((0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001), (1e-4, 1e-2),
                     "every term falls as weight decay grows", (("all", "down"),)),
    "damping": ((0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001, 0.000005, 0.000001),
                (1e-4, 1e-2), "solver and linearization errors fall, the proximity gap rises with damping",
                (("solver_error", "down"), ("linearization_error", "down"), ("proximity_gap", "up"))),
    "fraction_removed": ((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), (0.01, 0.1),
                         "linearization error rises sharply, and the warm-start gap rises, as more is removed",
                         (("linearization_error", "up"), ("warm_start_gap", "up"))),
}

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
    """(quick, paper) job per Table 5 row. Quick keeps each preset's own reduced settings (see
    experiments.py) and, for the convolutional nets, fewer removed points."""
    jobs = {"cancer": (_job(dataset="cancer"), _job(dataset="cancer")),
            "diabetes": (_job(dataset="diabetes"), _job(dataset="diabetes")),
            "concrete": (_job(dataset="concrete"), _job(dataset="concrete")),
            "energy": (_job(dataset="energy"), _job(dataset="energy")),
            "mlp-mnist": (_job(dataset="mnist", model="mlp"), _job(dataset="mnist", model="mlp")),
            "mlp-fashion_mnist": (_job(dataset="fashion_mnist", model="mlp"),
                                  _job(dataset="fashion_mnist", model="mlp")),
            "autoencoder-mnist": (_job(dataset="mnist", model="autoencoder", removed=5,
                                       overrides={"lissa_depth": 100, "lissa_batch_size": 32}),
                                  _job(dataset="mnist", model="autoencoder")),
            "transformer-ptb": (_job(dataset="ptb", model="transformer"), _job(dataset="ptb", model="transformer"))}
    # The convolutional nets: LiSSA dominates their quick cost (a GNH product per example of its batch per
    # step and column), so quick runs a shorter, smaller-batch LiSSA (its scale matched again); the big
    # nets (AlexNet and VGG13 take 4-7 s per 128-example step here, ResNet-20 0.5-2.5 s) run on 1% of
    # the data for 2 epochs.
    # VGG13 on MNIST runs its CIFAR-10 sibling's lighter LiSSA and 3 removed points: at 5 points and depth 100
    # its quick row was estimated at ~73 min here, most of it LiSSA (cost ~ depth x batch x points).
    small = {"lenet": (0.02, 4, 8, 200, 32), "alexnet": (0.01, 2, 5, 100, 32), "vgg13": (0.01, 2, 3, 50, 16),
             "resnet20": (0.01, 2, 5, 100, 32)}
    small_cifar = {"lenet": (0.04, 4, 5, 200, 32), "alexnet": (0.01, 2, 3, 50, 16), "vgg13": (0.01, 2, 3, 50, 16),
                   "resnet20": (0.01, 2, 3, 50, 16)}
    for dataset, table in (("mnist", small), ("cifar10", small_cifar)):
        for model, (fraction, epochs, removed, depth, batch) in table.items():
            overrides = {"fraction": fraction, "epochs": epochs, "lissa_depth": depth, "lissa_batch_size": batch}
            jobs[f"{model}-{dataset}"] = (_job(dataset=dataset, model=model, removed=removed, overrides=overrides),
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


# -------------------------------------------------------------------------------------------- running
def _execute(job: Job, folder: Path, preset: str, data_dir: str | None, progress: bool, device: str = "cpu") -> None:
    config = job.experiment_config(preset, data_dir)
    run = RunOptions(folder, resume=True, overwrite=False, progress=progress, device=device)
    if job.kind == "decompose":
        from .jobs import build_experiment, run_decomposition

        run_decomposition(config, run, exp=build_experiment(config, device=device, **dict(job.overrides)),
                          quiet=not progress)
    elif job.kind == "mislabel":
        from .mislabel import run_mislabel

        run_mislabel(config, run)
    elif job.kind == "sweep":
        from .sweep import run_sweep

        run_sweep(config, SweepConfig(job.sweep[0], tuple(job.sweep[1])), run)
    else:
        raise ReproduceError(f"unknown job kind {job.kind!r}")


def _finished(folder: Path, key: str) -> dict | None:
    marker = folder / "row.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("job") == key:
            return done
    return None


def run_rows(rows: list[Row], out, preset: str = "quick", data_dir: str | None = None, progress: bool = True,
             log=print, keep_going: bool = False, device: str = "cpu") -> tuple[list[dict], list[str]]:
    """Run each row's job into ``out/<target>/<row>/`` unless it already finished.

    A killed row resumes from its results folder (finished removed points, the trained base network);
    a finished one leaves ``row.json`` and is skipped. With ``keep_going`` a row that raises is recorded
    in its ``failed.json`` and the next row runs. Returns the finished rows' markers and the failed rows.
    """
    markers, seen, failures = [], set(), []
    for row in rows:
        job = row.job(preset)
        if job is None:
            continue
        key = job.key(preset)
        folder = job_folder(out, row, preset)
        if key in seen:
            continue
        seen.add(key)
        done = _finished(folder, key)
        if done:
            log(f"{row.id}: finished earlier ({done['seconds']:.0f} s), skipped")
            markers.append(done)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        resumed = any(folder.iterdir())
        log(f"{row.id}: running {job.describe()} ({preset} preset) into {folder}")
        start = time.perf_counter()
        try:
            _execute(job, folder, preset, data_dir, progress, device)
        except Exception as exc:  # noqa: BLE001 - one failed row must not stop the others
            if not keep_going:
                raise
            atomic_write_json(folder / "failed.json", {"job": key, "error": f"{type(exc).__name__}: {exc}",
                                                       "seconds": time.perf_counter() - start})
            log(f"{row.id}: FAILED ({type(exc).__name__}: {exc}); going on with the next row")
            failures.append(row.id)
            continue
        seconds = time.perf_counter() - start
        (folder / "failed.json").unlink(missing_ok=True)
        marker = {"job": key, "row": row.id, "preset": preset, "seconds": seconds, "resumed": resumed,
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": job.command(row.target, row.name, preset), "settings": job.describe(),
                  "device": device, "test_loss_changes": "float64"}
        atomic_write_json(folder / "row.json", marker)
        log(f"{row.id}: done in {seconds:.0f} s")
        markers.append(marker)
    return markers, failures


# ---------------------------------------------------------------------------------- paper-preset time
def _dimension(dataset: str, model: str, width: int | None = None, depth: int | None = None,
               preset: str = "paper") -> int:
    """Parameter count of the preset's network, built without its data."""
    import torch

    from .models import build_model, mlp

    if dataset in ("cancer", "diabetes"):
        return {"cancer": 31, "diabetes": 9}[dataset]
    if dataset in ("concrete", "energy"):
        net = mlp(8, (width or 128,) * (depth or 2), 1, seed=0)
    elif dataset == "ptb":
        from .models import transformer_lm

        net = transformer_lm(10000, width or (256 if preset == "paper" else 64), heads=2, layers=2,
                             max_len=35 if preset == "paper" else 20, seed=0)
    elif model in ("auto", "mlp") and dataset != "cifar10":
        net = mlp(784, (width or (1024 if preset == "paper" else 256),) * (depth or 2), 10, seed=0)
    elif model == "autoencoder":
        net = build_model("autoencoder", (784,), 784, seed=0)
    else:
        net = build_model("resnet20" if model == "auto" else model,
                          (3, 32, 32) if dataset == "cifar10" else (1, 28, 28), 10, seed=0)
    return sum(p.numel() for p in net.parameters() if isinstance(p, torch.Tensor))


# The paper preset's training-set size, epochs, removed points, LiSSA depth x repeats and LiSSA batch
# (Appendix E.3), per data set / model.
PAPER_SIZES = {"cancer": (400, 0, 20, 0, 0), "diabetes": (691, 0, 20, 0, 0),
               "concrete": (930, 1000, 20, 25000, 128), "energy": (691, 1000, 20, 25000, 128),
               "mnist-mlp": (6000, 1000, 20, 25000, 128), "fashion_mnist-mlp": (6000, 1000, 20, 25000, 128),
               "mnist-autoencoder": (60000, 1000, 20, 50000, 128), "mnist-cnn": (6000, 200, 20, 50000, 128),
               "cifar10-cnn": (50000, 200, 20, 50000, 128), "ptb-transformer": (25357, 10, 20, 25000, 20)}
STEP_COSTS = "step_costs.json"


def _size_key(dataset: str, model: str) -> str:
    if dataset in ("cancer", "diabetes", "concrete", "energy"):
        return dataset
    if dataset == "ptb":
        return "ptb-transformer"
    if model in ("auto", "mlp") and dataset != "cifar10":
        return f"{dataset}-mlp"
    if model == "autoencoder":
        return "mnist-autoencoder"
    return f"{dataset}-cnn"


def _passes(n: int, epochs: int, removed: int, lissa_steps: int = 0, lissa_batch: int = 0) -> float:
    """Example passes (forward + backward) of a decomposition: the base run (K epochs) and, per removed
    point, cold start (1.5K), warm start, proximal, PBRF, two-stage (0.5K each) and the trained linearized
    PBRF (0.5K epochs of GNH products, ~3 passes each): about 5K epochs; plus LiSSA, a GNH product
    (~3 passes) per example of its batch per step and column."""
    return float(n) * max(epochs, 1) * (1 + 5 * removed) + 3.0 * removed * lissa_steps * lissa_batch


def _cost_scale(dim: int, tokens: int) -> float:
    """A pass's relative cost between presets of one model: parameters x tokens (the MLP width and the
    Transformer's width and sequence length change between presets; a CNN's do not)."""
    return float(dim) * tokens


def _quick_work(folder: Path, row: Row) -> float | None:
    """The finished quick run's work, in example passes x cost scale, from its arguments.json."""
    args = folder / "arguments.json"
    if row.measure == "sweep":
        args = next(iter(sorted(folder.glob("*=*/arguments.json"))), None)
    if args is None or not Path(args).exists():
        return None
    exp = json.loads(Path(args).read_text())["experiment"]
    options = exp["responses"].get("influence_options", {}) if "responses" in exp else {}
    tokens = 20 if dict(row.quick.config).get("dataset") == "ptb" else 1
    steps = options.get("depth", 0) * options.get("repeats", 1)
    if row.measure == "mislabel":
        count = dict(row.quick.config).get("candidates") or min(exp["n_train"], 300)
        passes = (exp["n_train"] * exp["train"]["epochs"] * (1 + count / 20)
                  + 3.0 * count * steps * options.get("batch_size", 0))
    else:
        passes = _passes(exp["n_train"], exp["train"]["epochs"], exp["n_removed"], steps, options.get("batch_size", 0))
    work = passes * _cost_scale(exp["dim"], tokens)
    return work * len(row.quick.sweep[1]) if row.measure == "sweep" else work


def _paper_work(row: Row) -> float:
    """The paper preset's work in the same units."""
    c = dict(row.paper_job.config)
    dataset, model = c["dataset"], c.get("model", "auto")
    n, epochs, removed, steps, batch = PAPER_SIZES[_size_key(dataset, model)]
    tokens = 35 if dataset == "ptb" else 1
    scale = _cost_scale(_dimension(dataset, model), tokens)
    if row.measure == "mislabel":   # every training point scored: a PBRF run of K/2 epochs per chunk of 10 and LiSSA
        return scale * (n * epochs * (1 + n / 20) + 3.0 * n * steps * batch)
    if row.measure != "sweep":
        return scale * _passes(n, epochs, removed, steps, batch)
    parameter, values = row.paper_job.sweep
    total = 0.0
    for v in values:
        width = int(v) if parameter == "width" else None
        depth = int(v) if parameter == "depth" else None
        total += _cost_scale(_dimension(dataset, model, width, depth), 1) * _passes(
            n, int(v) if parameter == "epochs" else epochs, removed, steps, batch)
    return total


def expected_paper_seconds(row: Row, folder: Path, quick_seconds: float) -> float | None:
    """The paper preset's expected time on this machine: the quick run's seconds per unit of work
    (example passes x parameters x tokens, see :func:`_passes`) times the paper preset's work."""
    quick = _quick_work(folder, row)
    if not quick or row.paper_job is None:
        return None
    return quick_seconds / quick * _paper_work(row)


def measure_step_costs(rows: list[Row], out, steps: int = 2) -> dict:
    """Seconds of one training step (batch 128, forward + backward) of each row's quick network, written to
    ``out/step_costs.json``: the per-step cost behind the expected time of rows that did not run here."""
    import torch

    from .jobs import build_experiment

    costs = {}
    for row in rows:
        job = row.job("quick")
        if job is None or job.kind != "decompose" or row.id in costs:
            continue
        exp = build_experiment(job.experiment_config("quick", None), **dict(job.overrides))
        p = exp.problem
        x, t = p.batch(torch.arange(min(128, p.n)))
        grad = torch.func.grad(lambda th: p.example_losses(th, x, t).mean())
        grad(p.theta)
        start = time.perf_counter()
        for _ in range(steps):
            grad(p.theta)
        costs[owner(row, "quick").id] = {"seconds_per_step": (time.perf_counter() - start) / steps,
                                         "batch": len(x), "dim": p.dim}
    atomic_write_json(Path(out) / STEP_COSTS, costs)
    return costs


def expected_seconds_from_step(row: Row, out, preset: str) -> float | None:
    """A row that has not run: its expected time at ``preset`` from the measured per-step cost."""
    path = Path(out) / STEP_COSTS
    if not path.exists() or row.job(preset) is None or row.measure not in ("gaps", "correlations", "two_stage"):
        return None
    cost = json.loads(path.read_text()).get(owner(row, "quick").id)
    if cost is None:
        return None
    per_pass = cost["seconds_per_step"] / cost["batch"]
    c, o = dict(row.quick.config), dict(row.quick.overrides)
    if preset == "paper":
        return per_pass * _paper_work(row) / _cost_scale(cost["dim"], 20 if c["dataset"] == "ptb" else 1)
    if "fraction" not in o:
        return None
    # quick settings of the not-run row, from its overrides (the rows that need this set them all)
    n = round(o.get("fraction", 0.02) * (50000 if c["dataset"] == "cifar10" else 60000))
    return per_pass * _passes(n, o.get("epochs", 4), c.get("removed", 10), o.get("lissa_depth", 500),
                              o.get("lissa_batch_size", 128))


# ------------------------------------------------------------------------------------------ collecting
def collect(row: Row, out, preset: str = "quick") -> dict | None:
    """What the row's run measured (None when it has not finished): the numbers its table needs,
    the run time, settings and command."""
    if row.measure == "bars":
        return None
    job = row.job(preset)
    folder = job_folder(out, row, preset)
    done = _finished(folder, job.key(preset))
    if done is None:
        return None
    results = json.loads((folder / "results.json").read_text())
    measured = {"seconds": done["seconds"], "resumed": done.get("resumed", False), "folder": str(folder),
                "settings": job.describe(), "command": job.command(row.target, row.name, preset), "results": results,
                "float64_losses": done.get("test_loss_changes") == "float64"}
    return measured


# Rows whose PBRF test-loss changes differ between removed points by fewer float32 rounding steps of the
# loss than this, and were subtracted in float32 (run before the float64 evaluation), are flagged.
ROUNDING_STEPS_FLAGGED = 100.0


def rounding_steps(results: dict) -> float | None:
    """How many float32 rounding steps of the test loss separate the removed points' PBRF test-loss
    changes (their std across removed points, mean over test points), or None without PBRF records."""
    records = results.get("records") or []
    if not records or "pbrf" not in records[0].get("test_loss_change", {}) or "base_objective" not in results:
        return None
    changes = np.asarray([r["test_loss_change"]["pbrf"] for r in records], dtype=np.float64)
    if len(changes) < 2:
        return None
    step = abs(results["base_objective"]) * 2.0 ** -23
    return float(changes.std(0).mean() / step) if step > 0 else None


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.0f} years"


def _gap_verdict(gaps: dict, paper: dict) -> str:
    ours = {g: gaps[g]["mean"] for g in GAP_NAMES if g in gaps}
    first = sum(ours.get(g, 0.0) for g in GAP_NAMES[:3])
    last = sum(ours.get(g, 0.0) for g in GAP_NAMES[3:])
    if max(v[0] for v in paper.values()) == 0.0:
        return ("reproduces: every term ≈ 0" if max(ours.values()) < 1e-3
                else f"differs: largest term {max(ours.values()):.1e}, paper 0")
    if first >= 10 * last:
        return f"reproduces the claim: terms 1–3 ({_fmt(first)}) dominate 4–5 ({_fmt(last)})"
    if first > last:
        return f"partly: terms 1–3 ({_fmt(first)}) exceed 4–5 ({_fmt(last)}) by less than 10×"
    return f"differs: terms 4–5 ({_fmt(last)}) are not below 1–3 ({_fmt(first)})"


def _corr_verdict(corr: dict, measure: str) -> str:
    pbrf = corr.get("pbrf", {}).get("pearson", float("nan"))
    if measure == "two_stage":
        two, warm = corr.get("two_stage", {}).get("pearson", float("nan")), corr["warm_start"]["pearson"]
        if pbrf >= two >= warm:
            return f"reproduces: warm {warm:.2f} ≤ two-stage {two:.2f} ≤ PBRF {pbrf:.2f}"
        return f"differs: warm {warm:.2f}, two-stage {two:.2f}, PBRF {pbrf:.2f} (paper: warm < two-stage < PBRF)"
    cold, warm = corr["cold_start"]["pearson"], corr["warm_start"]["pearson"]
    high, low = pbrf >= 0.8, max(cold, warm) < 0.6
    if high and low:
        return f"reproduces: IF vs PBRF high ({pbrf:.2f}), vs retraining low (cold {cold:.2f}, warm {warm:.2f})"
    if high:
        return f"partly: IF vs PBRF high ({pbrf:.2f}), but vs retraining high too (cold {cold:.2f}, warm {warm:.2f})"
    return f"differs: IF vs PBRF {pbrf:.2f} (paper ≥ 0.8)"


def _pair(pair) -> str:
    return f"{_fmt(pair[0])} ± {_fmt(pair[1])}"


def _ours_gaps(gaps: dict) -> list[str]:
    return [f"{_fmt(gaps[g]['mean'])} ± {_fmt(gaps[g]['std'])}" if g in gaps else "-" for g in GAP_NAMES]


def _ours_corr(corr: dict, responses) -> list[str]:
    return [f"{corr[r]['pearson']:.2f} / {corr[r]['spearman']:.2f}" if r in corr else "-" for r in responses]


def _not_run(row: Row, out, preset: str) -> str:
    command = f"`{row.job(preset).command(row.target, row.name, preset)}`"
    failed = job_folder(out, row, preset) / "failed.json"
    if failed.exists():
        return f"failed here ({json.loads(failed.read_text())['error']}): {command}"
    seconds = expected_seconds_from_step(row, out, preset)
    expected = f", expected ~{_duration(seconds)} here (from the measured per-step cost)" if seconds else ""
    return f"not run here: {command}{expected}"


def _paper_time(row: Row, measured: dict | None, out) -> str:
    if row.paper_job is None:
        return "-"
    if measured:
        seconds = expected_paper_seconds(row, Path(measured["folder"]), measured["seconds"])
        basis = "from the quick run's seconds per unit of work"
    else:
        seconds = expected_seconds_from_step(row, out, "paper")
        basis = "from the measured per-step cost"
    command = row.paper_job.command(row.target, row.name, "paper")
    if seconds is None:
        return f"paper preset not run here: `{command}`"
    return f"paper preset not run here: `{command}`, expected ~{_duration(seconds)} on this box ({basis})"


# --------------------------------------------------------------------------------------------- figures
def _figure_scatter(path: Path, panels: list[tuple[str, list, str]]) -> Path:
    """Figure 1: one panel per (title, records, response), IF-predicted against actual change."""
    import numpy as np

    from .report import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.1))
    for ax, (title, records, response) in zip(np.atleast_1d(axes), panels):
        predicted = np.array([r["predicted_test_loss_change"] for r in records]).ravel()
        actual = np.array([r["test_loss_change"][response] for r in records]).ravel()
        ax.scatter(actual, predicted, s=8)
        r = np.corrcoef(actual, predicted)[0, 1] if actual.std() > 0 and predicted.std() > 0 else float("nan")
        ax.set_title(f"{title}\n(pooled Pearson {r:.2f})", fontsize=9)
        ax.set_xlabel(f"actual change ({response.replace('_', ' ')})", fontsize=8)
        ax.locator_params(nbins=4)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("influence estimate")
    out = _save(fig, path)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- report
HEADER = """# Does pbrf_fast reproduce the paper?

Every number-bearing table row and figure panel of Bae et al. (2022), *If Influence Functions are the
Answer, Then What is the Question?* (Tables 2, 4, 5, 6, 7, 8; Figures 1, 4, 5, 6), beside ours. This file
is written by `pbrf-fast reproduce report --out DIR --markdown REPRODUCTION.md --figures docs/reproduction`
from the results folders of `pbrf-fast reproduce all --preset quick --out DIR`; the paper's values are
stored in the registry (`pbrf_fast/paper/reproduce.py`), so rerunning refreshes it.

- **One command per row**: `pbrf-fast reproduce <target> --row <row> [--preset quick|paper] --out DIR`
  (`--list` prints the rows and their settings). `pbrf-fast reproduce all --preset quick` runs every row in
  turn and resumes after a kill (a finished row is skipped; a killed one continues from its finished
  removed points).
- **Presets.** `quick` is each experiment's reduced setting (below, per row: data fraction, epochs,
  removed points; LiSSA's scale matched to the PBRF's truncation), sized for a 2-core CPU. `paper` is
  Appendix E.3's setting (1000 epochs for the MLPs, 200 for the CNNs, 20 removed points, LiSSA depth
  5000–10000 × 5 repeats). Its expected time here is the quick run's measured seconds per unit of work
  (example passes × parameters × tokens; passes = n·K·(1 + 5·removed points) for the base run, cold
  start (1.5K epochs), four 0.5K-epoch responses and the trained linearized PBRF, plus 3 per LiSSA
  example, step and removed point) times the paper preset's work, or for rows that did not run, the
  measured per-step cost (`pbrf-fast reproduce steps`) times the paper's passes — a linear extrapolation
  on this CPU, not a GPU figure. On a GPU machine add `--device cuda`: networks and data are built on the
  CPU, moved to the GPU, and every response, solve and measurement runs there (the test losses are
  always evaluated in float64, see Table 2's note); `base.pt` is saved device-neutral, so a row started on
  one device resumes on another.
- **Test-loss changes are evaluated in float64**, whatever the network's dtype. A removed point moves a
  barely trained float32 CNN's test losses by ~1e-6 and the differences between removed points (what the
  correlations compare) by ~1e-8, while one float32 rounding step of a loss near 2.5 is 2.4e-7: subtracting
  float32 losses measured rounding. VGG13 on CIFAR-10 went from IF-vs-PBRF Pearson 0.23 to 1.00 with the
  float64 evaluation, the same trained networks and responses otherwise. Rows run before it are flagged
  below where their spread is under 100 rounding steps.
- **Run times** were measured on the project's shared 2-core box while other jobs ran; treat them as
  upper bounds.
- **Verdicts** check the paper's claims, not its digits: quick settings train for fewer epochs on less
  data, so magnitudes differ. Gaps: terms 1–3 (warm-start, proximity, non-convergence) dominate terms
  4–5 (linearization, solver) when their sum is at least 10× larger. Correlations: IF vs PBRF "high" is
  Pearson ≥ 0.8, IF vs retraining "low" is Pearson < 0.6 for both cold and warm start.
- **Cold start** replays θ⁰ and the base run's batch order (Appendix E.2); `--cold-start-order fresh`
  (`decompose`, `correlate`, ...; `ExperimentConfig.cold_start_order`) draws a fresh order instead,
  so both readings of "retraining" are available.
"""


def _target_header(target: str) -> str:
    titles = {
        "table5": "Table 5 / Figure 4 — the five-term decomposition (mean ± std of the mean output L2 distance)",
        "table4": "Table 4 — the decomposition with the Hessian instead of the GNH",
        "table2": "Table 2 — IF vs retraining and PBRF on MNIST (Pearson / Spearman)",
        "table6": "Table 6 — IF (GNH) vs retraining and PBRF (Pearson / Spearman)",
        "table7": "Table 7 — IF (Hessian) vs retraining and PBRF (Pearson / Spearman)",
        "table8": "Table 8 — IF vs two-stage LOO, warm start and PBRF (Pearson / Spearman)",
        "figure1": "Figure 1 — IF-predicted vs actual test-loss change",
        "figure4": "Figure 4 — the decomposition as bars",
        "figure5": "Figure 5 — ablations (MLP on MNIST)",
        "figure6": "Figure 6 — mislabelled-example detection",
    }
    return f"\n## {titles[target]}\n\n"


def _gap_section(rows: list[Row], out, preset: str) -> str:
    from .report import markdown_table

    header = ["row", "", *GAP_LABELS, "run time", "verdict"]
    table, details = [], []
    for row in rows:
        measured = collect(row, out, preset)
        table.append([f"`{row.name}`", "paper", *[_pair(row.paper[g]) for g in GAP_NAMES], "", ""])
        if measured is None:
            table.append(["", "ours", *["-"] * 5, "-", _not_run(row, out, preset)])
        else:
            gaps = measured["results"]["gaps"]
            table.append(["", "ours", *_ours_gaps(gaps), _duration(measured["seconds"]),
                          _gap_verdict(gaps, row.paper)])
        details.append(_detail(row, measured, out, preset))
    return markdown_table(header, table) + "\n" + "\n".join(details) + "\n" + _notes(rows)


def _corr_section(rows: list[Row], out, preset: str) -> str:
    from .report import markdown_table

    responses = TWO_STAGE if rows[0].measure == "two_stage" else ("cold_start", "warm_start", "pbrf")
    header = ["row", "", *[r.replace("_", " ") + " P / S" for r in responses], "run time", "verdict"]
    table, details = [], []
    for row in rows:
        measured = collect(row, out, preset)
        table.append([f"`{row.name}`", "paper", *[f"{row.paper[r]['pearson']:.2f} / {row.paper[r]['spearman']:.2f}"
                                                  for r in responses], "", ""])
        if measured is None:
            table.append(["", "ours", *["-"] * len(responses), "-", _not_run(row, out, preset)])
        else:
            corr = measured["results"]["correlations"]
            table.append(["", "ours", *_ours_corr(corr, responses), _duration(measured["seconds"]),
                          _corr_verdict(corr, row.measure)])
        if row.measure == "two_stage":   # the GNH run of the same data set measures two-stage LOO too
            twin = collect(select_rows("table6", row.name)[0], out, preset)
            if twin is not None:
                corr = twin["results"]["correlations"]
                table.append(["", "ours, GNH run (table6)", *_ours_corr(corr, responses), _duration(twin["seconds"]),
                              _corr_verdict(corr, row.measure)])
        details.append(_detail(row, measured, out, preset))
    return markdown_table(header, table) + "\n" + "\n".join(details) + "\n" + _notes(rows)


def _notes(rows: list[Row]) -> str:
    """Each distinct note of a section once, with the rows it concerns."""
    by_note = {}
    for row in rows:
        if row.note:
            by_note.setdefault(row.note, []).append(f"`{row.name}`")
    return "".join(f"\n**Note** ({', '.join(names)}): {note}\n" for note, names in by_note.items())


def _detail(row: Row, measured: dict | None, out, preset: str) -> str:
    """Per row: the settings and command of ours, the paper preset's command and expected time."""
    lines = [f"- `{row.name}`: "]
    if measured:
        shared = owner(row, preset)
        lines[0] += f"{preset} preset ({measured['settings']}), `{measured['command']}`"
        if shared is not row:
            lines[0] += f" (the run of {shared.id})"
        if "base_objective" in measured["results"]:   # how far the base network trained
            lines[0] += f"; base training objective {measured['results']['base_objective']:.4g}"
        steps = rounding_steps(measured["results"])
        if not measured.get("float64_losses") and steps is not None and steps < ROUNDING_STEPS_FLAGGED:
            lines[0] += (f"; run before test-loss changes were evaluated in float64, and its removed points' "
                         f"PBRF changes differ by only ~{steps:.2g} float32 rounding steps of the loss, so its "
                         f"correlations may be rounding-limited (rerun it to refresh)")
        lines[0] += f"; {_paper_time(row, measured, out)}."
    else:
        lines[0] += f"{preset} preset ({row.job(preset).describe()}) not run here; {_paper_time(row, None, out)}."
    return "\n".join(lines)


def _figure_path(figures: Path, markdown: Path, name: str) -> tuple[Path, str]:
    path = figures / name
    return path, os.path.relpath(path, markdown.parent)


def _figure1_section(rows, out, preset, figures, markdown) -> str:
    panels, lines = [], []
    for row in rows:
        measured = collect(row, out, preset)
        if measured is None:
            lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: {_not_run(row, out, preset)}.")
            continue
        records, corr = measured["results"]["records"], measured["results"]["correlations"]
        response = "pbrf" if row.name == "pbrf" else "cold_start"
        p = corr[response]["pearson"]
        if row.name == "lr":
            verdict = "reproduces" if p >= 0.9 else "differs"
        elif row.name == "mlp":
            verdict = "reproduces" if p < 0.6 else "differs"
        else:
            verdict = "reproduces" if p >= 0.8 else "differs"
        title = {"lr": "LR / Cancer vs LOO", "mlp": "MLP / Concrete vs LOO", "pbrf": "MLP / Concrete vs PBRF"}
        panels.append((title[row.name], records, response))
        lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: mean per-test-point Pearson {p:.2f} "
                     f"({response.replace('_', ' ')}; {measured['settings']}, `{measured['command']}`, "
                     f"{_duration(measured['seconds'])}) — **{verdict}**.")
    text = "\n".join(lines) + "\n"
    if panels:
        path, rel = _figure_path(figures, markdown, "figure1.png")
        _figure_scatter(path, panels)
        text = f"![Figure 1, ours]({rel})\n\n" + text
    return text


def _figure4_section(row: Row, out, preset, figures, markdown) -> str:
    from .report import figure_gap_bars

    gaps, dominated = {}, []
    for source in row.sources:
        target, name = source.split("/")
        src = select_rows(target, name)[0]
        measured = collect(src, out, preset)
        if measured is not None:
            g = measured["results"]["gaps"]
            gaps[name] = g
            first = sum(g[k]["mean"] for k in GAP_NAMES[:3])
            last = sum(g[k]["mean"] for k in GAP_NAMES[3:])
            dominated.append(first >= 10 * last or max(v["mean"] for v in g.values()) < 1e-3)
    if not gaps:
        return f"Paper: {row.paper}. Ours: none of Table 5's rows has run yet.\n"
    path, rel = _figure_path(figures, markdown, "figure4.png")
    figure_gap_bars(path, gaps)
    return (f"![Figure 4, ours]({rel})\n\nPaper: {row.paper}. Ours: Table 5's {len(gaps)} finished rows "
            f"(of {len(row.sources)}); terms 1–3 dominate (≥ 10×, or every term ≈ 0) in {sum(dominated)} of them "
            f"— the rows above say which.\n")


def _trend_verdict(parameter: str, values, tables: list[dict]) -> str:
    trends = FIGURE5[parameter][3]
    if not trends:
        spread = {g: (min(t[g]["mean"] for t in tables), max(t[g]["mean"] for t in tables)) for g in tables[0]}
        return "no trend claimed; ours: " + ", ".join(f"{g.replace('_', ' ')} {_fmt(a)}–{_fmt(b)}"
                                                      for g, (a, b) in spread.items())
    first, last = tables[0], tables[-1]
    checks = []
    for gap, direction in trends:
        if gap == "all":
            a, b = sum(v["mean"] for v in first.values()), sum(v["mean"] for v in last.values())
            name = "sum of the terms"
        else:
            a, b = first[gap]["mean"], last[gap]["mean"]
            name = gap.replace("_", " ")
        # a change within 10% is no trend (the quick sweeps remove 5 points; their noise is about that)
        ok = b < 0.9 * a if direction == "down" else b > 1.1 * a
        checks.append((ok, f"{name} {a:.3g} → {b:.3g}"))
    verdict = "reproduces" if all(ok for ok, _ in checks) else ("partly" if any(ok for ok, _ in checks) else "differs")
    return f"{verdict}: " + "; ".join(text for _, text in checks) + f" (from {values[0]:g} to {values[-1]:g})"


def _figure5_section(rows, out, preset, figures, markdown) -> str:
    import shutil

    lines = []
    for row in rows:
        measured = collect(row, out, preset)
        if measured is None:
            lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: {_not_run(row, out, preset)}; "
                         f"{_paper_time(row, None, out)}.")
            continue
        res = measured["results"]
        path, rel = _figure_path(figures, markdown, f"figure5-{row.name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(measured["folder"]) / "sweep.png", path)
        lines.append(f"- **{row.name}** — paper: {row.paper}. Ours ({measured['settings']}, `{measured['command']}`, "
                     f"{_duration(measured['seconds'])}): {_trend_verdict(row.name, res['values'], res['gaps'])}. "
                     f"{_paper_time(row, measured, out)}. ![{row.name}]({rel})")
    return "\n".join(lines) + "\n"


def _figure6_section(rows, out, preset, figures, markdown) -> str:
    import shutil

    lines = []
    for row in rows:
        measured = collect(row, out, preset)
        if measured is None:
            lines.append(f"- **{row.name}** — paper: {row.paper}. Ours: {_not_run(row, out, preset)}.")
            continue
        res = measured["results"]
        at = res["fractions"].index(0.2)
        found = {k: res["curves"][k][at] for k in ("influence", "pbrf")}
        verdict = "reproduces" if min(found.values()) > 0.2 else "differs"
        path, rel = _figure_path(figures, markdown, f"figure6-{row.name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(measured["folder"]) / "mislabel.png", path)
        lines.append(f"![Figure 6, ours]({rel})\n\n- **{row.name}** — paper: {row.paper}. Ours "
                     f"({measured['settings']}, {len(res['candidates'])} points scored, "
                     f"`{measured['command']}`, {_duration(measured['seconds'])}): inspecting the top 20% by "
                     f"self-influence finds {100 * found['influence']:.1f}% (IF) and {100 * found['pbrf']:.1f}% "
                     f"(PBRF) of the corrupted labels, against 20% at random — **{verdict}**. "
                     f"{_paper_time(row, measured, out)}.")
    return "\n".join(lines) + "\n"


VERDICTS = ("reproduces", "partly", "differs", "no trend claimed", "failed here", "not run here")


def _tally(section: str) -> dict[str, int]:
    """How many of a section's rows (table lines `| | ours |`, figure bullets) got each verdict."""
    counts = dict.fromkeys(VERDICTS, 0)
    for line in section.splitlines():
        if line.startswith("|  | ours |"):
            verdict = line.rstrip(" |").rsplit("|", 1)[-1].strip()
        elif line.startswith("- **"):
            verdict = line.split("Ours", 1)[-1].split("paper preset not run here", 1)[0]
        else:
            continue
        first = min(VERDICTS, key=lambda v: (verdict.find(v) if v in verdict else len(verdict) + 1))
        if first in verdict:
            counts[first] += 1
    return counts


def _summary(sections: dict[str, str]) -> str:
    from .report import markdown_table

    rows = [[t, *[str(c[v]) for v in VERDICTS]] for t, c in ((t, _tally(text)) for t, text in sections.items())]
    return ("\n## Summary: the verdicts per table and figure (quick preset)\n\n"
            + markdown_table(["target", *VERDICTS], rows)
            + "\n\"partly\": some of the paper's claims for the row hold and some do not (each row says which).\n")


def write_report(out, markdown=None, figures=None, preset: str = "quick") -> Path:
    """REPRODUCTION.md from the results under ``out``: every row, paper beside ours, with verdicts."""
    out = Path(out)
    markdown = Path(markdown) if markdown else out / "REPRODUCTION.md"
    figures = Path(figures) if figures else markdown.parent / "figures"
    parts, sections = [], {}
    for target in ("table5", "figure4", "table4", "table2", "table6", "table7", "table8", "figure1", "figure5",
                   "figure6"):
        rows = [r for r in ROWS if r.target == target]
        if rows[0].measure == "gaps":
            text = _gap_section(rows, out, preset)
        elif rows[0].measure in ("correlations", "two_stage"):
            text = _corr_section(rows, out, preset)
        elif target == "figure1":
            text = _figure1_section(rows, out, preset, figures, markdown)
        elif target == "figure4":
            text = _figure4_section(rows[0], out, preset, figures, markdown)
        elif target == "figure5":
            text = _figure5_section(rows, out, preset, figures, markdown)
        else:
            text = _figure6_section(rows, out, preset, figures, markdown)
        parts.append(_target_header(target) + text)
        if target != "figure4":
            sections[target] = text
    atomic_write_text(markdown, HEADER + _summary(sections) + "".join(parts))
    return markdown


def reproduce(target: str, row: str | None, preset: str, out, data_dir: str | None = None,
              list_only: bool = False, markdown=None, figures=None, progress: bool = True, log=print,
              device: str = "cpu") -> int:
    """The ``pbrf-fast reproduce`` command: list, run or report."""
    if preset not in ("quick", "paper"):
        raise ReproduceError(f"--preset must be quick or paper, got {preset!r}")
    if target == "report":
        log(str(write_report(out, markdown, figures, preset)))
        return 0
    if target == "steps":
        costs = measure_step_costs(select_rows("all"), out)
        log("\n".join(f"{k:32s} {v['seconds_per_step']:.3f} s per {v['batch']}-example step" for k, v in costs.items()))
        return 0
    rows = select_rows(target, row)
    if not list_only:
        from .jobs import resolve_device

        resolve_device(device)  # a bad --device fails before any row starts, not once per row
    if list_only:
        log(list_rows(rows, preset))
        return 0
    _, failures = run_rows(rows, out, preset, data_dir, progress=progress, log=log, keep_going=len(rows) > 1,
                           device=device)
    if target == "all":
        log(str(write_report(out, markdown, figures, preset)))
    if failures:
        log(f"{len(failures)} row(s) failed: {', '.join(failures)} (see failed.json in their folders)")
        return 1
    return 0
