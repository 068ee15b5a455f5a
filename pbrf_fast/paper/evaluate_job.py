"""The ``evaluate`` job: how good is each solver's attribution, against retraining and
against the PBRF?

For one setting (data set x model, trained by its recipe below) it

1. trains ``max(checkpoints)`` base models (seeds ``seed``, ``seed + 1``, ...);
2. draws ``subsets`` seeded random training subsets of fraction ``alpha`` and
   retrains a model on each (``repeats`` seeds, averaged; vectorised), and
   computes the PBRF response to removing each subset's complement at the first
   base model (Eq. 8, warm-started at theta^s);
3. scores every training point against every test point with each solver
   (``identity`` is the gradient dot product: no curvature at all) at each base
   model; an ensemble of c checkpoints averages the first c score matrices;
4. reports the linear datamodeling score (LDS) of each solver and ensemble
   against retraining and against the PBRF, the leave-one-out correlation when
   ``loo`` points are retrained, each solver's time, and with ``brittleness``
   the share of test predictions flipped by removing (and retraining without)
   each solver's top-k proponents.

Settings (their rows in :mod:`.recipes`; ``None`` fields of :class:`~.config.EvaluateConfig` take these):

=================  ================================================================
digits / logreg    1000 train (of 1500), 297 test; multinomial LR, float64, L-BFGS
                   to convergence, weight decay 1e-3
digits / mlp       64-width one-hidden-layer ReLU MLP, SGD lr 0.1, 30 epochs
mnist / logreg     5000 train / 500 test (seeded); multinomial LR as above
mnist / mlp        784-``width``-10 ReLU MLP, float32, SGD lr 0.1, batch 128,
                   10 epochs, weight decay 1e-3
cifar10 / resnet20 1000 train / 100 test; batch norm calibrated on 512 other
                   training images and folded into the weights, residual branches
                   zero-initialised; SGD momentum 0.9, lr 0.05, 8 epochs, weight
                   decay 5e-4, batch 32 (128 takes 8 steps an epoch)
=================  ================================================================

Everything is written into the results folder as it finishes (base models,
each subset's measurements, each score matrix) and a rerun with ``resume``
skips it; a rerun may name other ``solvers`` / ``checkpoints`` / solver options
(score files are named by solver and options) and reuses everything else. Outputs: ``table.md``, ``results.json``, ``lds.png``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import atomic_save_tensor, atomic_write, atomic_write_json, atomic_write_text, load_tensor
from ..evaluation import brittleness, linear_datamodeling_score, loo_correlation, random_subsets
from ..influence import Influence
from ..problem import Problem
from ..results_folder import ResultsFolder
from ..inverses import DIRECT_MAX_DIM, KERNEL_MEMORY_BYTES
from ..curvatures import CURVATURES, GaussNewton
from ..damping import AUTO as AUTO_DAMPING, AUTO_DAMPING_FACTORS, auto_damping
from .config import EVALUATE_SOLVERS, EvaluateConfig, RunOptions
from .ground_truth import pbrf_ground_truth, retraining_ground_truth, train_on_subsets
from .jobs import ConfigError
from .recipes import RECIPES, Recipe, recipe
from . import plotting
from .report import markdown_table
from .responses import ResponseSettings, ResponseSolver
from .training import TrainConfig, TrainResult, train

__all__ = ["Setting", "build_setting", "run_evaluate", "solver_scores", "EVALUATE_SETTINGS"]

# Settings that change no stored piece, or only score matrices and PBRF rows, whose file
# names carry them (see _solver_tag, _damping_tag), or that only add pieces of their own (the PBRF subsets; LOO
# retrainings, stored by the removed point's index; brittleness files, which record
# their test points and k): a rerun with other values reuses everything else on disk.
REPORT_ONLY = ("solvers", "checkpoints", "damping", "cg_iters", "tol", "preconditioner", "preconditioner_rank",
               "lissa_depth", "lissa_batch_size", "rank",
               "pbrf", "loo", "brittleness", "brittleness_ks")
EVALUATE_SETTINGS = {(dataset, model) for job, dataset, model, _ in RECIPES if job == "evaluate"}


@dataclasses.dataclass
class Setting:
    """A data set, a model family (``make_model(seed)``) and its training recipe."""

    name: str
    make_model: object
    loss: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train: TrainConfig
    weight_decay: float
    chunk: int | None = None  # examples per pass of the problem's chunked sums (None: see problem)

    def problem(self, seed: int) -> Problem:
        # Full-batch L-BFGS objectives run over the whole set at once: one chunk.
        chunk = self.chunk or (len(self.x) if self.train.optimizer == "lbfgs" else 1024)
        return Problem(self.make_model(seed), self.loss, self.x, self.y, weight_decay=self.weight_decay,
                       batch_size=chunk)

    def theta0(self, seed: int) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.make_model(seed).parameters() if p.requires_grad])


def _seeded_rows(n_total: int, count: int | None, default: int, seed: int) -> torch.Tensor:
    count = min(n_total, count or default)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:count]


def _load(config: EvaluateConfig, row: Recipe):
    """The setting's full train and test sets, in its recipe's dtype (float32 by default)."""
    from .data import load_digits, load_mnist

    dtype = row.dtype or torch.float32
    if config.dataset == "digits":
        return load_digits(seed=config.seed, dtype=dtype)
    if config.dataset == "mnist":
        return load_mnist(config.data_dir, dtype=dtype)
    from .data.cifar import load_cifar10

    return load_cifar10(config.data_dir)


def is_user_model(model: str) -> bool:
    """``file.py:make_model`` / ``module:make_model``: the user's own model, not a built-in name."""
    return ":" in model


def _user_setting(config: EvaluateConfig) -> Setting:
    """The user's model factory, data file and retraining recipe (given as flags)."""
    from ..scale.loading import build_user_model, load_data_file

    if config.data is None:
        raise ConfigError(f"--model {config.model} is your own model: give its data with --data data.pt|data.npz "
                          "(x_train, y_train, x_test, y_test)")
    if config.epochs is None or config.lr is None:
        raise ConfigError(f"--model {config.model}: evaluate retrains your model on every subset, so it needs the "
                          "recipe you trained it with: give --epochs and --lr (and --optimizer, --batch-size, "
                          "--weight-decay when they differ from sgd, 128 and 0)")
    if config.loss not in ("cross_entropy", "mse", "bce"):
        raise ConfigError(f"--loss must be cross_entropy, mse or bce, got {config.loss!r}")
    data = load_data_file(config.data)
    x, y, xt, yt = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    rows = _seeded_rows(len(x), config.train_points, len(x), config.seed + 3)
    cols = _seeded_rows(len(xt), config.test_points, len(xt), config.seed + 5)
    x, y, xt, yt = x[rows], y[rows], xt[cols], yt[cols]
    build_user_model(config.model)  # a factory that fails is named here, before any training

    def make_model(s):
        torch.manual_seed(s)  # each base model (seed, seed + 1, ...) starts from its own initialisation
        model = build_user_model(config.model)
        return model.to(x.dtype) if x.is_floating_point() else model

    try:
        train_config = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size or 128,
                                   optimizer=config.optimizer or "sgd", seed=config.seed)
    except ValueError as exc:
        raise ConfigError(f"the retraining recipe: {exc}") from None
    name = f"{config.model} on {Path(config.data).name} ({len(x)} train, {len(xt)} test)"
    return Setting(name, make_model, config.loss, x, y, xt, yt, train_config, config.weight_decay or 0.0)


def build_setting(config: EvaluateConfig) -> Setting:
    """The data, model family and training recipe of ``config`` (its :mod:`.recipes` row, or
    the user's own model, data and recipe)."""
    if is_user_model(config.model):
        return _user_setting(config)
    if config.data is not None:
        raise ConfigError(f"--data is your own data for your own --model file.py:make_model; the built-in --model "
                          f"{config.model} uses --dataset {config.dataset}")
    key = (config.dataset, config.model)
    if key not in EVALUATE_SETTINGS:
        raise ConfigError(f"evaluate supports --dataset/--model {sorted(EVALUATE_SETTINGS)}, got {key}")
    row, seed = recipe("evaluate", *key), config.seed
    x, y, xt, yt = _load(config, row)
    rows = _seeded_rows(len(x), config.train_points, row.data.train_points, seed + 3)
    cols = _seeded_rows(len(xt), config.test_points, row.data.test_points or len(xt), seed + 5)
    # ResNet-20's batch-norm calibration images: the next rows of the same permutation,
    # so they are never training points (see _resnet_recipe).
    calibration = row.data.calibration_points
    x_calibration = (x[_seeded_rows(len(x), len(rows) + calibration, 0, seed + 3)[len(rows):]]
                     if calibration else None)
    x, y, xt, yt = x[rows], y[rows], xt[cols], yt[cols]
    if config.model == "resnet20":
        make_model, train_config, wd = _resnet_recipe(config, x_calibration)
    else:
        make_model, train_config, wd = _recipe(config, row, x.shape[1:])
    wd = wd if config.weight_decay is None else config.weight_decay
    name = f"{config.dataset} / {config.model} ({len(x)} train, {len(xt)} test)"
    # ResNet-20 in chunks of 128: EK-FAC's conv factors over 1,000 images at once took 8.3 GB
    # (killed for memory on the shared 24 GB machine); the chunk changes only summation order.
    chunk = 128 if config.model == "resnet20" else None
    return Setting(name, make_model, "cross_entropy", x, y, xt, yt, train_config, wd, chunk)


def _recipe(config: EvaluateConfig, row: Recipe, in_shape):
    """Logistic regression's and the MLP's model family, training recipe and weight decay; L-BFGS
    trains to convergence, so the SGD options (--epochs, --lr, --batch-size) do not apply to it."""
    width = min(config.width, row.max_width) if row.max_width else config.width
    d_in = (int(np.prod(in_shape)),)

    def make_model(s):
        return row.build_model(d_in, row.outputs, s, width=width)

    if row.train.optimizer == "lbfgs":
        return make_model, row.train.config(config.seed), row.train.weight_decay
    return make_model, _sgd_config(config, row), row.train.weight_decay


def _sgd_config(config: EvaluateConfig, row: Recipe) -> TrainConfig:
    """The row's SGD training with the job's --epochs, --lr and --batch-size where given."""
    return row.train.config(config.seed, epochs=config.epochs or row.train.epochs, lr=config.lr or row.train.lr,
                            batch_size=config.batch_size or row.train.batch_size)


def _resnet_recipe(config: EvaluateConfig, x_calibration: torch.Tensor):
    """ResNet-20's model family, training recipe and weight decay.

    Batch norm stays in eval mode (the GNH is then exact), so a fresh net is unnormalised:
    lr 0.05 with momentum diverged in the first epoch and lr 0.003 left it at chance
    (bench/RESULTS.md). Every initialisation, the base models' and each subset model's, is
    therefore calibrated (:func:`.bn_calibration.calibrate_batchnorm`: the batch statistics
    folded into the weights) on the same ``x_calibration`` images, which are *not*
    training points: removing training points then changes nothing but the data a subset
    model is trained on, and all models share the default running statistics, as the
    vectorised retraining needs. Each residual block's last batch norm then starts at zero
    scale and shift (the block is the identity), so the frozen-normalisation net does not
    start with the sum of nine branches. Measured on 1,000 CIFAR-10 images
    (bench/results/lds-cifar.md): with both, SGD with momentum at lr 0.05 and batch 32 trains.
    """
    from .bn_calibration import calibrate_batchnorm, zero_residual_branches

    row = recipe("evaluate", "cifar10", "resnet20")

    def make_model(s):
        return zero_residual_branches(calibrate_batchnorm(row.build_model((3, 32, 32), row.outputs, s),
                                                          x_calibration))

    return make_model, _sgd_config(config, row), row.train.weight_decay


# ----------------------------------------------------------------------------- pieces
def _base_models(setting: Setting, count: int, seed: int, folder: ResultsFolder, progress: bool):
    """``count`` trained base models: [(problem at theta^s, TrainResult)], loaded when on disk."""
    models = []
    for c in range(count):
        problem = setting.problem(seed + c)
        path = folder.file(f"base/{c}.pt")
        if path.exists():
            saved = load_tensor(path)
            problem.set_theta(saved["theta"])
            result = TrainResult(saved["theta0"], problem.theta.clone(), TrainConfig(**saved["config"]),
                                 saved["final_objective"])
        else:
            result = train(problem, dataclasses.replace(setting.train, seed=seed + c))
            atomic_save_tensor(path, {"theta0": result.theta0, "theta": result.theta,
                                      "config": dataclasses.asdict(result.config),
                                      "final_objective": result.final_objective})
        models.append((problem, result))
    return models


def _solver_tag(solver: str, config: EvaluateConfig) -> str:
    """The solver and the options its scores depend on, as a file-name stem."""
    pcg = f"iters{config.cg_iters}-tol{config.tol:g}-{config.preconditioner}"
    if config.preconditioner.startswith("nystrom"):
        pcg += f"{config.preconditioner_rank}"
    options = {"cg": f"iters{config.cg_iters}-tol{config.tol:g}", "pcg": pcg,
               "lissa": f"depth{config.lissa_depth}-batch{config.lissa_batch_size}",
               "lowrank": f"rank{config.rank}"}.get(solver)
    return f"{solver}-{options}" if options else solver


def _damping_tag(damping) -> str:
    """A damping of the job as a file-name piece: the number, or ``auto`` with its rule's factors
    (another rule is another file)."""
    if damping == AUTO_DAMPING:
        return "auto-" + "-".join(f"{k}{v:g}" for k, v in sorted(AUTO_DAMPING_FACTORS.items()))
    return f"{damping:g}"


def _damping_label(damping) -> str:
    return damping if isinstance(damping, str) else f"{damping:g}"


def _skip_reason(solver: str, problem: Problem) -> str | None:
    outputs = problem.n * problem.num_outputs
    if solver == "direct" and problem.dim > 2 * DIRECT_MAX_DIM:
        return f"d = {problem.dim} > {2 * DIRECT_MAX_DIM}: no dense eigendecomposition"
    if solver == "kernel" and 3 * 8 * outputs ** 2 > KERNEL_MEMORY_BYTES:
        return f"N*C = {outputs} training outputs: the output-space Gram matrix exceeds the memory budget"
    return None


def _solver_options(solver: str, config: EvaluateConfig) -> dict:
    """The evaluate flags that are options of ``solver``'s options dataclass."""
    nystrom = config.preconditioner.startswith("nystrom")
    return {"cg": {"tol": config.tol, "max_iter": config.cg_iters},
            "pcg": {"tol": config.tol, "max_iter": config.cg_iters, "preconditioner": config.preconditioner,
                    "preconditioner_rank": config.preconditioner_rank if nystrom else None,
                    "preconditioner_options": {"seed": config.seed}},
            "lissa": {"depth": config.lissa_depth, "batch_size": config.lissa_batch_size, "scale": "auto",
                      "seed": config.seed},
            "lowrank": {"rank": config.rank, "seed": config.seed}}.get(solver, {})


def solver_scores(problem: Problem, solver: str, config: EvaluateConfig, x_test, t_test,
                  damping=None, reuse: dict | None = None) -> tuple[np.ndarray, dict]:
    """Scores (n_train, m) of one solver at the problem's parameters and ``damping`` (a number or
    "auto"; default: the config's first), and what it did. ``reuse``: a dict kept across calls,
    so another damping of the same solver and problem shares the operator's cached work
    (:meth:`Influence.with_damping`); the first call's time includes building it."""
    if solver not in EVALUATE_SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; choose from {EVALUATE_SOLVERS}")
    damping = config.damping[0] if damping is None else damping
    start = time.perf_counter()
    key = (solver, id(problem), problem.version)
    if reuse is not None and key in reuse:
        influence = reuse[key].with_damping(damping)
    elif solver in CURVATURES:
        # Exact pseudo-gradients up to 16 outputs (kronecker's "auto"), sampled ones seeded by the run.
        influence = Influence(problem, damping, curvature=solver, solver="auto",
                              curvature_options={"seed": config.seed})
    else:
        influence = Influence(problem, damping, solver=solver, solver_options=_solver_options(solver, config))
    if reuse is not None:
        reuse.setdefault(key, influence)
    scores = influence.scores(x_test, t_test)
    # the time includes what "auto" spent measuring the spectrum (and K-FAC's factors)
    info = {"seconds": time.perf_counter() - start, "damping": influence.damping}
    if influence.damping_choice is not None:
        info["damping_choice"] = influence.damping_choice.as_dict()
    last = influence.last_solve
    if last is not None and last.converged is not None:  # a solve that measured its residuals
        info["iterations"] = int(torch.as_tensor(last.iterations).max())
        info["converged_columns"] = int(torch.as_tensor(last.converged).sum())
        if last.residual_norms is not None:
            info["max_relative_residual"] = float(torch.as_tensor(last.residual_norms).max())
    return scores.detach().double().cpu().numpy(), info


def _all_scores(models, config: EvaluateConfig, setting: Setting, folder: ResultsFolder, progress: bool) -> dict:
    """{solver: {damping label: {"scores": [per checkpoint (n, m)], "info": [...]}} or {"skipped": reason}}."""
    from tqdm.auto import tqdm

    out, reuse = {}, {}  # reuse: one operator per solver and model, shared by its dampings
    bar = tqdm(total=len(config.solvers) * len(config.damping) * len(models), desc="scores", leave=False,
               disable=not progress)
    for solver in config.solvers:
        reason = _skip_reason(solver, models[0][0])
        if reason:
            out[solver] = {"skipped": reason}
            bar.update(len(models) * len(config.damping))
            continue
        out[solver] = {}
        for damping in config.damping:
            entry = {"scores": [], "info": []}
            for c, (problem, _) in enumerate(models):
                stem = f"scores/{_solver_tag(solver, config)}-damping{_damping_tag(damping)}-{c}"
                path, meta = folder.file(f"{stem}.npy"), folder.file(f"{stem}.json")
                if path.exists() and meta.exists():
                    scores, info = np.load(path), json.loads(meta.read_text())
                else:
                    bar.set_postfix_str(f"{solver} at damping {_damping_label(damping)}")
                    scores, info = solver_scores(problem, solver, config, setting.x_test, setting.y_test, damping,
                                                 reuse)
                    atomic_write(path, lambda handle: np.save(handle, scores))
                    atomic_write_json(meta, info)
                entry["scores"].append(scores)
                entry["info"].append(info)
                bar.update(1)
            out[solver][_damping_label(damping)] = entry
        reuse.clear()  # the next solver's operators replace this one's (memory)
    bar.close()
    return out


def _pbrf_damping(config: EvaluateConfig, damping, problem: Problem) -> float:
    """The PBRF's proximity weight for one damping of the job: the number, or what "auto" gives
    the exact GNH at the first base model (the question the exact solver answers there)."""
    if damping != AUTO_DAMPING:
        return damping
    return auto_damping(GaussNewton(problem, 0.0), "gnh").value


def _starts(setting: Setting, base_problem: Problem):
    """Where subset models start: fresh initialisations, or theta^s for a convex
    L-BFGS recipe (its optimum does not depend on the start; this is only faster)."""
    if setting.train.optimizer == "lbfgs":
        return lambda seed: base_problem.theta.clone()
    return setting.theta0


def _loo_changes(setting, config, base_problem, folder, progress):
    """Measured leave-one-out changes of the test losses for ``config.loo`` seeded points: (points, (k, m))."""
    n = base_problem.n
    points = sorted(np.random.default_rng(config.seed + 211).choice(n, size=min(config.loo, n), replace=False).tolist())
    masks = np.ones((len(points) + 1, n), dtype=bool)
    for row, i in enumerate(points):
        masks[row, i] = False
    common = dict(repeats=config.repeats, seed=config.seed, chunk=config.chunk, progress=progress, shared_seeds=True,
                  lbfgs_max_iter=config.lbfgs_iters)
    # stored by the removed point's index: another --loo count reuses the points it shares
    loo = retraining_ground_truth(base_problem, setting.train, masks[:-1], _starts(setting, base_problem), setting.x_test,
                                  setting.y_test, folder=folder, kind="loo", keys=points, **common)
    full = retraining_ground_truth(base_problem, setting.train, masks[-1:], _starts(setting, base_problem), setting.x_test,
                                   setting.y_test, folder=folder, kind="loo_full", **common)
    return points, loo["truth"] - full["truth"], loo["seconds"] + full["seconds"]


def _predictions(problem: Problem, params: torch.Tensor, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.vmap(lambda th: problem.forward(th, x.to(problem.device)).argmax(1))(params).cpu()


def _brittleness(setting, config, problem0, base0, scores, folder, progress) -> dict:
    """Per solver: the fewest top proponents (of ``config.brittleness_ks``) whose removal flips
    the prediction of each of ``config.brittleness`` seeded, correctly classified test points,
    each removal retrained with the base recipe from the base run's start and seed. The row
    ``random`` removes random points instead: with a stochastic recipe, retraining itself
    flips some predictions, and that row is the floor a solver must beat."""
    from tqdm.auto import tqdm

    base_prediction = _predictions(problem0, problem0.theta[None], setting.x_test)[0]
    correct = torch.nonzero(base_prediction == setting.y_test).squeeze(1).numpy()
    rng = np.random.default_rng(config.seed + 307)
    tests = sorted(rng.choice(correct, size=min(config.brittleness, len(correct)), replace=False).tolist())
    start = problem0.theta if setting.train.optimizer == "lbfgs" else base0.theta0
    seed, n = base0.config.seed, problem0.n

    def flips(j, removal_sets):
        masks = torch.ones(len(removal_sets), n, dtype=torch.bool)
        for row, removed in enumerate(removal_sets):
            masks[row, torch.as_tensor(removed)] = False
        # one stack when the recipe allows subsets of different sizes (L-BFGS), else one at a time
        groups = [range(len(masks))] if setting.train.optimizer == "lbfgs" else [[r] for r in range(len(masks))]
        params = torch.cat([train_on_subsets(problem0, base0.config, masks[list(g)], start.repeat(len(g), 1),
                                             [seed] * len(g), lbfgs_max_iter=config.lbfgs_iters) for g in groups])
        return (_predictions(problem0, params, setting.x_test[j : j + 1])[:, 0] != base_prediction[j]).tolist()

    # each solver ranked at the job's first damping
    first = _damping_label(config.damping[0])
    rankings = {solver: entry[first]["scores"][0] for solver, entry in scores.items() if "skipped" not in entry}
    rankings["random"] = rng.random((n, len(setting.x_test)))
    out = {}
    for solver, ranking in rankings.items():
        path = folder.file(f"brittleness/{_solver_tag(solver, config) if solver in scores else solver}.json")
        stored = json.loads(path.read_text()) if path.exists() else None
        # another --brittleness count or --brittleness-ks recomputes; the same ones reuse the file
        if stored is not None and stored.get("test_points") == tests and stored.get("ks") == list(config.brittleness_ks):
            out[solver] = stored
            continue
        bar = tqdm(total=len(tests), desc=f"brittleness {solver}", leave=False, disable=not progress)

        def counted(j, sets):
            bar.update(1)
            return flips(j, sets)

        out[solver] = brittleness(ranking, counted, config.brittleness_ks, test_points=tests).as_dict()
        out[solver]["test_points"] = tests
        out[solver]["ks"] = list(config.brittleness_ks)
        bar.close()
        atomic_write_json(path, out[solver])
    return out


# ------------------------------------------------------------------------------- job
def run_evaluate(config: EvaluateConfig, run: RunOptions) -> dict:
    """Run the evaluation of ``config`` into ``run.out``; returns the results dict."""
    for solver in config.solvers:
        if solver not in EVALUATE_SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; choose from {', '.join(EVALUATE_SOLVERS)}")
    if not config.checkpoints or min(config.checkpoints) < 1:
        raise ConfigError(f"checkpoints must be positive counts, got {config.checkpoints}")
    if not 0 < config.alpha < 1 or config.subsets < 3 or config.repeats < 1:
        raise ConfigError(f"need 0 < alpha < 1, at least 3 subsets and 1 repeat; got alpha {config.alpha}, "
                          f"{config.subsets} subsets, {config.repeats} repeats")
    setting = build_setting(config)
    arguments = config.arguments() | {"setting": setting.name}
    if not is_user_model(config.model):  # only your own model has these; folders made before them still resume
        for key in ("data", "loss", "optimizer"):
            arguments.pop(key)
    # Which solvers and ensembles are reported changes no stored piece (each score matrix
    # is kept per solver and checkpoint): a rerun with others reuses everything on disk.
    folder = ResultsFolder(run.out, arguments, result_keys=[k for k in arguments if k not in REPORT_ONLY],
                           resume=run.resume, overwrite=run.overwrite)
    progress = run.progress
    models = _base_models(setting, max(config.checkpoints), config.seed, folder, progress)
    problem0, base0 = models[0]
    masks = random_subsets(problem0.n, config.subsets, config.alpha, config.seed + 101)
    atomic_write(folder.file("masks.npy"), lambda handle: np.save(handle, masks))
    truths, timing = {}, {}
    retrain = retraining_ground_truth(problem0, setting.train, masks, _starts(setting, problem0), setting.x_test, setting.y_test,
                                      repeats=config.repeats, seed=config.seed, chunk=config.chunk, folder=folder,
                                      progress=progress, lbfgs_max_iter=config.lbfgs_iters)
    truths["retraining"], timing["retraining"] = retrain["truth"], retrain
    pbrf_dampings = {}
    if config.pbrf:  # one PBRF per damping: the proximity term is the damping's question
        for damping in config.damping:
            value = _pbrf_damping(config, damping, problem0)
            solver = ResponseSolver(problem0, base0, ResponseSettings(damping=value))
            name = "pbrf" if len(config.damping) == 1 else f"pbrf at damping {_damping_label(damping)}"
            pbrf = pbrf_ground_truth(solver, masks, setting.x_test, setting.y_test, chunk=config.chunk, folder=folder,
                                     progress=progress, lbfgs_max_iter=config.lbfgs_iters,
                                     kind=f"pbrf-damping{value:.6g}")
            truths[name], timing[name] = pbrf["truth"], pbrf
            pbrf_dampings[_damping_label(damping)] = (name, value)
    loo = _loo_changes(setting, config, problem0, folder, progress) if config.loo else None
    scores = _all_scores(models, config, setting, folder, progress)
    results = _evaluate(config, setting, masks, truths, scores, loo, pbrf_dampings)
    if config.brittleness:
        results["brittleness"] = _brittleness(setting, config, problem0, base0, scores, folder, progress)
    # every stored row's time, also those an earlier (killed) call of a resumed job finished
    results["ground_truth_seconds"] = {k: v["seconds"] for k, v in timing.items()}
    results["ground_truth_seconds_this_call"] = {k: v["call_seconds"] for k, v in timing.items()}
    results["ground_truth_computed_subsets"] = {k: v["computed"] for k, v in timing.items()}
    results["ground_truth_untimed_subsets"] = {k: v["untimed"] for k, v in timing.items()}
    if loo is not None:
        results["ground_truth_seconds"]["loo"] = loo[2]
    results["base_models"] = [{"final_objective": r.final_objective,
                               "test_accuracy": _accuracy(p, setting.x_test, setting.y_test)} for p, r in models]
    results["arguments"] = folder.arguments
    md = _table(setting.name, config, results)
    atomic_write_text(folder.file("table.md"), md)
    atomic_write_json(folder.file("results.json"), results)
    _figure(folder.file("lds.png"), setting.name, results)
    written = "table.md, results.json, lds.png"
    if len(config.damping) > 1:
        _damping_figure(folder.file("lds_damping.png"), setting.name, results)
        written += ", lds_damping.png"
    if progress:
        print(md)
        print(f"results in {folder.path}/ ({written})")
    return results


def _accuracy(problem: Problem, x, t) -> float:
    with torch.no_grad():
        return float((problem.forward(problem.theta, x.to(problem.device)).argmax(1).cpu() == t).double().mean())


def _evaluate(config, setting, masks, truths, scores, loo, pbrf_dampings) -> dict:
    """{"setting", "methods": {solver: {damping label: {checkpoint count: row}} or {"skipped"}}}.
    A row's ``lds_pbrf`` is against the PBRF at the row's own damping."""
    methods = {}
    for solver, by_damping in scores.items():
        if "skipped" in by_damping:
            methods[solver] = {"skipped": by_damping["skipped"]}
            continue
        methods[solver] = {}
        for label, entry in by_damping.items():
            rows = {}
            for count in config.checkpoints:
                mean_scores = np.mean(entry["scores"][:count], 0)
                info = entry["info"][:count]
                row = {"seconds": float(sum(i["seconds"] for i in info)), "info": info,
                       "damping": [i.get("damping") for i in info]}
                row["lds_retraining"] = linear_datamodeling_score(mean_scores, masks, truths["retraining"]).as_dict()
                # The PBRF is the response of the first base model: its LDS is reported for one checkpoint.
                if label in pbrf_dampings and count == 1:
                    name, value = pbrf_dampings[label]
                    row["lds_pbrf"] = linear_datamodeling_score(mean_scores, masks, truths[name]).as_dict()
                    row["pbrf_damping"] = value
                if loo is not None:
                    points, changes, _ = loo
                    for method in ("pearson", "spearman"):
                        row[f"loo_{method}"] = loo_correlation(mean_scores[points], changes, method).as_dict()
                rows[str(count)] = row
            methods[solver][label] = rows
    return {"setting": setting.name, "methods": methods}


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    text = "nan" if result["mean"] is None or not np.isfinite(result["mean"]) else f"{result['mean']:.3f}"
    return text + (f" ({result['n_undefined']} undefined)" if result["n_undefined"] else "")


def _damping_cell(label: str, row: dict) -> str:
    values = [v for v in row.get("damping", []) if v is not None]
    if label != AUTO_DAMPING or not values:
        return label
    return "auto (" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _table(name: str, config: EvaluateConfig, results: dict) -> str:
    header = ["solver", "damping", "checkpoints", "LDS vs retraining", "LDS vs PBRF"]
    header += ["LOO Pearson", "LOO Spearman"] if config.loo else []
    header += ["seconds"]
    rows = []
    for solver, by_damping in results["methods"].items():
        if "skipped" in by_damping:
            rows.append([solver, "-", "-", f"skipped: {by_damping['skipped']}", "-"]
                        + ["-"] * (2 if config.loo else 0) + ["-"])
            continue
        for label, entry in by_damping.items():
            for count, row in entry.items():
                cells = [_solver_tag(solver, config), _damping_cell(label, row), count,
                         _cell(row.get("lds_retraining")), _cell(row.get("lds_pbrf"))]
                if config.loo:
                    cells += [_cell(row.get("loo_pearson")), _cell(row.get("loo_spearman"))]
                rows.append(cells + [f"{row['seconds']:.1f}"])
    seconds = results["ground_truth_seconds"]
    missing = {k: v for k, v in results.get("ground_truth_untimed_subsets", {}).items() if v}
    untimed = ("" if not missing else " (subsets stored without a time, not counted: "
               + ", ".join(f"{k} {v}" for k, v in missing.items()) + ")")
    fragile = ""
    if results.get("brittleness"):
        ks = config.brittleness_ks
        fragile = ("\n\n**Brittleness** (share of correctly classified test points whose prediction flips "
                   "when the top-k proponents are removed and the model retrained):\n\n"
                   + markdown_table(["solver"] + [f"k = {k}" for k in ks],
                                    [[solver] + [f"{r['flipped_fraction'][str(k)]:.2f}" for k in ks]
                                     for solver, r in results["brittleness"].items()]))
    text = (f"**Attribution quality, {name}**: {config.subsets} subsets at alpha = {config.alpha}, "
            f"{config.repeats} retraining run(s) per subset; damping {', '.join(map(_damping_label, config.damping))} "
            "(auto: pbrf_fast.damping's rule); measurement: test loss\n\n"
            + markdown_table(header, rows)
            + "\n\nGround truth time (s, all subsets, including calls before a resume): "
            + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + untimed + fragile + "\n")
    return text


def _figure(path, name: str, results: dict) -> None:
    """LDS of each solver (x damping x ensemble size) against retraining and the PBRF, as
    horizontal bar pairs: the long row labels read level, and each bar carries its value."""
    groups = []  # (row label, {truth: LDS mean or None})
    for solver, by_damping in results["methods"].items():
        if "skipped" in by_damping:
            continue
        rows = [(label, count, row) for label, entry in by_damping.items() for count, row in entry.items()]
        for label, count, row in rows:
            means = {}
            for truth in ("retraining", "pbrf"):
                if f"lds_{truth}" in row:
                    mean = row[f"lds_{truth}"]["mean"]
                    means[truth] = mean if mean is not None and np.isfinite(mean) else None
            if means:
                groups.append((f"{solver}, damping {label}, {count} checkpoint{'s' if str(count) != '1' else ''}",
                               means))
    truths = [t for t in ("retraining", "pbrf") if any(t in m for _, m in groups)]
    with plotting.styled() as plt:
        fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.32 * max(1, len(groups)) * max(1, len(truths))))
        height = 0.8 / max(1, len(truths))
        for k, truth in enumerate(truths):
            at = np.arange(len(groups)) + (k - (len(truths) - 1) / 2) * height
            values = [m.get(truth) for _, m in groups]
            ax.barh(at, [0.0 if v is None else v for v in values], height, color=plotting.COLOURS[k],
                    label=f"vs {'the PBRF' if truth == 'pbrf' else truth}")
            for y, v in zip(at, values):  # the value beside its bar; nan where LDS is undefined
                ax.text(0 if v is None else v, y, " nan" if v is None else f" {v:.2f}", va="center",
                        ha="left" if v is None or v >= 0 else "right", fontsize=7)
        ax.set_yticks(np.arange(len(groups)), [g for g, _ in groups])
        ax.set_ylim(len(groups) - 0.5, -0.5)  # the first solver on top, as in table.md
        ax.axvline(0, color=plotting.REFERENCE, linewidth=0.6)
        ax.set_xlim(min(0.0, *(v for _, m in groups for v in m.values() if v is not None)) - 0.1, 1.1)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("LDS (Spearman correlation with the ground truth; 1 is perfect)")
        ax.set_title(f"Linear datamodeling score of each solver, {name}")
        plotting.legend_below(fig, ncols=max(1, len(truths)))
        plotting.save(fig, path)


def _damping_figure(path, name: str, results: dict) -> None:
    """LDS against retraining as a function of the damping, one line per solver (one checkpoint);
    ``auto`` is a marker at the value it chose."""
    with plotting.styled() as plt:
        fig, ax = plt.subplots(figsize=(6.8, 4.0))
        for i, (solver, by_damping) in enumerate(results["methods"].items()):
            if "skipped" in by_damping:
                continue
            style = plotting.line_style(i)
            colour = style["color"]
            points = sorted((float(label), entry["1"]["lds_retraining"]["mean"]) for label, entry in by_damping.items()
                            if label != AUTO_DAMPING and "1" in entry)
            if points:
                ax.plot(*zip(*points), label=solver, **style)
            auto = by_damping.get(AUTO_DAMPING, {}).get("1")
            if auto is not None and auto["damping"] and auto["damping"][0]:
                ax.plot([auto["damping"][0]], [auto["lds_retraining"]["mean"]], marker="*", markersize=13,
                        markeredgecolor=plotting.REFERENCE, markeredgewidth=0.6, color=colour, linestyle="none",
                        label=f"{solver} at auto")
        ax.set_xscale("log")
        ax.set_xlabel("damping lambda (added to the curvature's eigenvalues)")
        ax.set_ylabel("LDS vs retraining\n(Spearman, 1 checkpoint)")
        ax.set_title(f"LDS against damping, {name}")
        plotting.legend_beside(ax)
        plotting.save(fig, path)
