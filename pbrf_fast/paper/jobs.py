"""The paper's experiments as functions of typed settings: build an experiment from
an :class:`~.config.ExperimentConfig`, then decompose, correlate or train.

The command line (:mod:`pbrf_fast.cli`), the demo and the sweeps call these; none
of them reads command-line arguments.
"""
from __future__ import annotations

import dataclasses

import torch

from ..atomic_io import atomic_write_json
from ..errors import PBRFError
from ..results_folder import ResultsFolder
from .config import ExperimentConfig, RunOptions
from .experiments import Experiment, build, to_device

__all__ = ["ConfigError", "resolve_device", "build_experiment", "open_results", "run_decomposition", "run_train"]


class ConfigError(PBRFError, ValueError):
    """Settings that do not describe an experiment the harness can run."""


def resolve_device(device: str) -> torch.device:
    """``--device`` as a torch device that this machine has, or a ConfigError that says why not."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be a torch device such as cpu, cuda or cuda:1; got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this torch build or machine has no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        if resolved.index is None:  # one device, so the problem's tensors and its parameters compare equal
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise ConfigError(f"--device must be cpu or cuda[:N]; got {device!r}")
    return resolved


def build_experiment(config: ExperimentConfig, device: str = "cpu", **overrides) -> Experiment:
    """The experiment of ``config``: its preset, with the config's overrides applied, on ``device``.

    ``overrides`` go to :func:`.experiments.build` (width, depth, epochs, weight_decay,
    corrupt_fraction: the sweeps and mislabel detection use them).
    """
    target = resolve_device(device)  # before loading any data: a bad --device fails at once
    if config.model == "logreg" and config.dataset not in ("cancer", "diabetes"):
        raise ConfigError("--model logreg is available for cancer and diabetes")
    if config.model == "mlp" and config.dataset in ("cancer", "diabetes"):
        raise ConfigError("--model mlp is not set up for cancer/diabetes; use logreg")
    exp = build(config.dataset, config.preset, config.seed, config.data_dir, model=config.model, **overrides)
    if config.damping is not None:
        exp.responses.damping = config.damping
    exp.responses.curvature = config.curvature
    exp.responses.cold_start_order = config.cold_start_order
    if config.solver:
        exp.responses.influence_solver = config.solver
        if config.solver != "lissa":
            exp.responses.influence_options = {}
    if config.removed:
        exp.n_removed = config.removed
    if config.test_points:
        exp.n_test_points = config.test_points
    return to_device(exp, target)


def open_results(config: ExperimentConfig, exp: Experiment, run: RunOptions, **extra) -> ResultsFolder:
    """The run's results folder, bound to every setting that shapes its numbers."""
    arguments = config.arguments() | extra | {"experiment": exp.describe()}
    return ResultsFolder(run.out, arguments, resume=run.resume, overwrite=run.overwrite)


def run_decomposition(config: ExperimentConfig, run: RunOptions, exp: Experiment | None = None,
                      quiet: bool = False) -> dict:
    """The five-term decomposition and the correlations (Table 5, Figure 4; Tables 2, 6-8).

    Writes results.json, table.csv, table.md, decomposition.png and correlation.png
    into ``run.out``; returns the gaps, correlations and the markdown tables.
    """
    from .report import correlation_table, figure_gap_bars, figure_scatter, gap_table, write_tables
    from .runner import choose_removed_points, choose_test_points, run_points, train_base

    exp = exp or build_experiment(config, device=run.device)
    folder = open_results(config, exp, run)
    progress = run.progress and not quiet
    base = train_base(exp, folder, progress=progress)
    removed = choose_removed_points(exp.problem.n, exp.n_removed, config.seed)
    tests = choose_test_points(len(exp.x_test), exp.n_test_points, config.seed)
    records = run_points(exp, base, removed, tests, folder, chunk=config.chunk, progress=progress)
    gaps, corr = gap_table(records), correlation_table(records)
    payload = {"arguments": folder.arguments, "removed": removed, "test_points": tests,
               "base_objective": base.final_objective, "records": records}
    out = folder.path
    md = write_tables(out, exp.name, gaps, corr, payload)
    run_name = f"{exp.name} (seed {config.seed}, {config.preset} preset)"  # which run each figure shows
    figure_gap_bars(out / "decomposition.png", {exp.name: gaps},
                    title=f"Five-term decomposition, {run_name}: {len(records)} removed points")
    figure_scatter(out / "correlation.png", records, run_name)
    if not quiet:
        print(md)
        print(f"results in {out}/ (results.json, table.csv, table.md, decomposition.png, correlation.png)")
    return {"gaps": gaps, "correlations": corr, "markdown": md}


def run_train(config: ExperimentConfig, run: RunOptions) -> dict:
    """Train (or load) the base network; writes and returns train.json's summary."""
    from .runner import train_base

    exp = build_experiment(config, device=run.device)
    folder = open_results(config, exp, run)
    base = train_base(exp, folder, progress=run.progress)
    x, t = exp.problem.check_data(exp.x_test, exp.t_test)
    with torch.no_grad():
        test_loss = float(exp.problem.example_losses(exp.problem.theta, x, t).mean())
    summary = {"train_objective": base.final_objective, "test_loss": test_loss, "n_train": exp.problem.n,
               "dim": exp.problem.dim, "config": dataclasses.asdict(base.config)}
    atomic_write_json(folder.file("train.json"), summary)
    return summary
