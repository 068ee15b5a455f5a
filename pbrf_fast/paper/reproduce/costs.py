"""The cost model: how long a row's paper preset would take on this machine, from the
quick run's seconds per unit of work (example passes x parameters x tokens) or from a
measured per-step cost (``pbrf-fast reproduce steps``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ...atomic_io import atomic_write_json
from .rows import Row, owner

__all__ = ["paper_sizes", "STEP_COSTS", "expected_paper_seconds", "measure_step_costs", "expected_seconds_from_step"]


# Each data set's input shape as the experiments feed it (the PTB vocabulary for the language
# model), so a network is sized from its recipe without loading the data.
INPUT_SHAPES = {"cancer": (30,), "diabetes": (8,), "concrete": (8,), "energy": (8,), "digits": (64,),
                "cifar10": (3, 32, 32), "ptb": (10000,)}


def _dimension(dataset: str, model: str, width: int | None = None, depth: int | None = None,
               preset: str = "paper") -> int:
    """Parameter count of the preset's network (its :mod:`..recipes` row), built without its data."""
    from ..experiments import recipe_model
    from ..recipes import recipe

    row = recipe("experiment", dataset, recipe_model(dataset, model), preset)
    shape = INPUT_SHAPES.get(dataset) or ((784,) if row.model in ("mlp", "autoencoder") else (1, 28, 28))
    net = row.build_model(shape, row.outputs, 0, width=width, depth=depth)
    return sum(p.numel() for p in net.parameters())


# Each data set's full training-set size (the recipes say which share the paper preset trains on).
TRAIN_SET_SIZES = {"cancer": 400, "diabetes": 691, "concrete": 930, "energy": 691, "mnist": 60000,
                   "fashion_mnist": 60000, "cifar10": 50000, "ptb": 25357}
STEP_COSTS = "step_costs.json"
PAPER_REMOVED = 20   # the paper preset's removed points (experiments.py)


def paper_sizes(dataset: str, model: str) -> tuple[int, int, int, int, int]:
    """The paper preset's training-set size, epochs, removed points, LiSSA steps (depth x repeats)
    and LiSSA batch, from the experiment's recipe row (Appendix E.3)."""
    from ..experiments import LISSA_REPEATS, recipe_model
    from ..recipes import recipe

    row = recipe("experiment", dataset, recipe_model(dataset, model), "paper")
    n = round(TRAIN_SET_SIZES[dataset] * (row.data.train_fraction or 1.0))
    if row.lissa_depth is None:   # logistic regression: a direct solve, no LiSSA
        return n, int(row.train.epochs), PAPER_REMOVED, 0, 0
    return n, int(row.train.epochs), PAPER_REMOVED, row.lissa_depth * LISSA_REPEATS["paper"], row.lissa_batch_size


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
    n, epochs, removed, steps, batch = paper_sizes(dataset, model)
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

    from ..jobs import build_experiment

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


