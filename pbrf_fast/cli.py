"""The ``pbrf-fast`` command line. Thin on purpose: each subcommand parses its
arguments into the typed settings of :mod:`pbrf_fast.paper.config` and calls one
harness or library function. Errors pbrf_fast raises on purpose (bad settings,
a results folder made with other arguments) exit with status 2 and one line on
stderr; success exits 0.

``python -m pbrf_fast ...`` (and ``torchrun -m pbrf_fast scores ...``) runs the same.

Nothing here imports torch (seconds to load) before the arguments are parsed:
``pbrf-fast --help`` lists the commands from the table :data:`COMMANDS` alone, and
a subcommand's options, which read the library's tables (solvers, curvatures,
data sets), are added only when that subcommand is used (:class:`_Command`). The
argparse ``type=`` helpers below are plain Python for the same reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import warnings

from .errors import InputError, PBRFError  # errors.py imports nothing

__all__ = ["main", "build_parser", "command_parser", "COMMANDS"]

MODELS = ["auto", "logreg", "mlp", "autoencoder", "lenet", "alexnet", "vgg13", "resnet20", "transformer"]


def _number(kind, minimum, strict: bool):
    """An argparse type: a ``kind`` number >= minimum (> minimum when strict), else a usage error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a finite value {'>' if strict else '>='} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _damping(text: str):
    """An argparse type: a damping >= 0 or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    return NONNEGATIVE(text)


def _damping_list(text: str) -> tuple:
    """An argparse type: comma-separated dampings (numbers >= 0 or ``auto``), e.g. 1e-3,1e-1,auto."""
    values = tuple(_damping(s) for s in text.split(",") if s.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated dampings (numbers >= 0 or auto), got {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers, e.g. 3,32,32."""
    try:
        values = tuple(int(s) for s in text.split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


POSITIVE_INT, COUNT = _number(int, 0, strict=True), _number(int, 0, strict=False)
POSITIVE, NONNEGATIVE = _number(float, 0.0, strict=True), _number(float, 0.0, strict=False)


def _fields(cls, args: argparse.Namespace, **extra):
    """An instance of the dataclass ``cls`` from the parsed arguments of the same names."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def _experiment_config(args):
    from .paper.config import ExperimentConfig

    return _fields(ExperimentConfig, args)


def _run_options(args):
    from .paper.config import RunOptions

    # evaluate and scores place their own tensors; the experiment commands take --device
    return RunOptions(args.out, resume=args.resume, overwrite=args.overwrite, device=getattr(args, "device", "cpu"))


# ---------------------------------------------------------------------------------- commands
def _cmd_decompose(args) -> int:
    from .paper.jobs import run_decomposition

    run_decomposition(_experiment_config(args), _run_options(args))
    return 0


def _cmd_train(args) -> int:
    from .paper.jobs import run_train

    print(json.dumps(run_train(_experiment_config(args), _run_options(args)), indent=2))
    return 0


def _cmd_mislabel(args) -> int:
    from .paper.mislabel import run_mislabel

    run_mislabel(_experiment_config(args), _run_options(args))
    return 0


def _cmd_sweep(args) -> int:
    from .paper.config import SweepConfig
    from .paper.sweep import run_sweep

    run_sweep(_experiment_config(args), SweepConfig(args.parameter, tuple(args.values)), _run_options(args))
    return 0


def _cmd_reproduce(args) -> int:
    from .paper.reproduce import reproduce

    if args.target is None:
        if not args.list:
            raise InputError("reproduce: give a target (table2, table4-8, figure1, figure4-6, all, report, steps); "
                             "--list prints every row")
        args.target = "all"  # --list alone lists every row
    return reproduce(args.target, args.row, args.preset, args.out, data_dir=args.data_dir, list_only=args.list,
                     markdown=args.markdown, figures=args.figures, progress=not args.no_progress, device=args.device)


def _cmd_demo(args) -> int:
    from .paper.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0


def _cmd_scores(args) -> int:
    from .inverses.flags import solver_options_from_flags
    from .paper.recipes import SCORES_MODELS
    from .scale.scores_job import ScoresConfig, run_scores, start_run

    args.checkpoint = tuple(args.checkpoint)  # a frozen config holds a tuple
    args.solver_options = solver_options_from_flags(args)
    config, inputs = _fields(ScoresConfig, args), None
    if args.model in SCORES_MODELS and args.data is not None:
        raise InputError(f"--data is your own data for your own --model file.py:make_model; the built-in --model "
                         f"{args.model} trains and scores on --dataset {args.dataset}")
    if args.model in SCORES_MODELS:  # a built-in model: the paper harness trains it first; yours goes straight on
        from .paper.builtin_scores import builtin_inputs
        from .paper.config import BuiltinModelConfig

        inputs = builtin_inputs(config, _fields(BuiltinModelConfig, args), start_run(config))
    run_scores(config, inputs)
    return 0


def _evaluate_model(text: str) -> str:
    """An argparse type: a built-in evaluate model or the user's file.py:make_model."""
    if text in ("logreg", "mlp", "resnet20") or ":" in text:
        return text
    raise argparse.ArgumentTypeError(f"expected logreg, mlp, resnet20 or your own file.py:make_model, got {text!r}")


def _cmd_evaluate(args) -> int:
    from .paper.config import EvaluateConfig
    from .paper.evaluate_job import is_user_model, run_evaluate

    if is_user_model(args.model):
        if args.dataset is not None:
            raise InputError(f"--dataset picks a built-in setting; your own --model {args.model} takes --data")
        args.dataset = "user"
    else:
        args.dataset = args.dataset or "digits"
        if args.optimizer is not None or args.loss != "cross_entropy":
            raise InputError("--optimizer and --loss describe your own --model file.py:make_model; the built-in "
                             f"--model {args.model} has its recipe (pbrf_fast/paper/recipes.py)")

    run_evaluate(_fields(EvaluateConfig, args, pbrf=not args.no_pbrf), _run_options(args))
    return 0


def _cmd_show(args) -> int:
    from .paper.show import show_scores

    with warnings.catch_warnings(record=True) as caught:  # on the terminal: one plain line each
        warnings.simplefilter("always")
        written = show_scores(args.out, test_points=args.test_points, k=args.k, data_dir=args.data_dir,
                              relative=args.relative)
    for warning in caught:
        print(f"pbrf-fast show: {warning.message}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def _cmd_backends(args) -> int:
    if not args.explain:
        from .backends import backends, format_backends

        report = backends()
        print(json.dumps(report, indent=2) if args.json else format_backends(report))
        return 0
    from .explain import explain, format_plans

    model, inputs = _explain_model(args)
    plans = explain(model, args.loss, inputs, columns=args.columns, backend=args.backend,
                    lissa_batch_size=args.lissa_batch_size)
    print(json.dumps([p.as_dict() for p in plans], indent=2) if args.json else format_plans(plans))
    return 0


def _explain_model(args):
    """The model and a random input batch that ``backends --explain`` plans for."""
    import math

    import torch

    from .paper.models import build_model, mlp

    shape, widths = args.inputs, args.widths
    model = (mlp(math.prod(shape), widths, args.outputs, seed=0) if args.model == "mlp"
             else build_model(args.model, shape, args.outputs, seed=0))
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype=dtype, device=args.device).eval()
    return model, torch.randn(args.batch, *shape, dtype=dtype, device=args.device)


# ------------------------------------------------------------------------------------ parser
DEVICE_HELP = ("where the experiment computes: cpu, cuda or cuda:N (networks and data are built on the CPU, "
               "then moved; results do not depend on it beyond rounding)")


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and appends each option's default to its
    help, unless the help already says what an unset option means."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default in ([], ())
        shown = action.option_strings and not unset and "default" not in text and "unset" not in text
        if shown:
            value = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
            text += f" (default: {value.replace('%', '%%')})"
        return text


def _common(parser: argparse.ArgumentParser, dataset_default: str = "concrete") -> None:
    from .paper.experiments import DATASETS, PRESETS

    parser.add_argument("--dataset", choices=DATASETS, default=dataset_default, help="built-in data set")
    parser.add_argument("--model", choices=MODELS, default="auto",
                        help="auto: logistic regression for cancer/diabetes, ResNet-20 for cifar10, an MLP otherwise")
    parser.add_argument("--preset", choices=PRESETS, default="quick",
                        help="quick: minutes on a laptop; paper: the paper's sizes (pbrf_fast/paper/recipes.py)")
    parser.add_argument("--seed", type=COUNT, default=0, help="seed of training and of every random choice")
    parser.add_argument("--out", default="pbrf-fast-out", help="results folder")
    parser.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished work")
    parser.add_argument("--overwrite", action="store_true", help="discard results in --out made with other arguments")
    parser.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)


def _points_args(parser: argparse.ArgumentParser) -> None:
    from .curvatures import CURVATURES, OWN_INVERSES
    from .inverses import AUTO, INVERSES

    parser.add_argument("--removed", type=POSITIVE_INT, default=None, help="removed points (default: preset's)")
    parser.add_argument("--test-points", type=POSITIVE_INT, default=None,
                        help="test points for correlations (default: preset's)")
    parser.add_argument("--chunk", type=POSITIVE_INT, default=10, help="removed points retrained together")
    parser.add_argument("--damping", type=NONNEGATIVE, default=None, help="lambda of the damped curvature "
                                                                          "(default: preset's)")
    parser.add_argument("--curvature", choices=[n for n, c in CURVATURES.items() if c.exact], default="gnh",
                        help="the exact curvature the influence estimate solves with")
    parser.add_argument("--solver", choices=[n for n in INVERSES if n not in OWN_INVERSES] + [AUTO], default=None,
                        help="influence estimate's solver (default: preset's)")
    parser.add_argument("--cold-start-order", choices=["replay", "fresh"], default="replay",
                        help="cold-start retraining replays the base run's batch order or draws a fresh one")


# ------------------------------------------------------------------ each command's options
def _demo_options(p) -> None:
    p.add_argument("--seed", type=COUNT, default=0, help="seed of training, removed points and test points")
    p.add_argument("--out", default="pbrf-fast-out/demo", help="results folder (tables, JSON, figures)")
    p.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=_cmd_demo)


def _decompose_options(p) -> None:
    _common(p)
    _points_args(p)
    p.set_defaults(func=_cmd_decompose)


def _train_options(p) -> None:
    _common(p)
    p.set_defaults(func=_cmd_train)


def _mislabel_options(p) -> None:
    _common(p, dataset_default="digits")
    _points_args(p)
    p.add_argument("--corrupt", type=NONNEGATIVE, default=0.1, help="fraction of labels corrupted")
    p.add_argument("--candidates", type=POSITIVE_INT, default=None,
                   help="training points scored by PBRF (default: all in paper, 300 in quick)")
    p.set_defaults(func=_cmd_mislabel)


def _sweep_options(p) -> None:
    from .paper.config import SWEEP_PARAMETERS

    _common(p)
    _points_args(p)
    p.add_argument("--parameter", required=True, choices=SWEEP_PARAMETERS, help="the setting varied")
    p.add_argument("--values", required=True, type=float, nargs="+", help="its values, one run each")
    p.set_defaults(func=_cmd_sweep)


def _reproduce_options(p) -> None:
    p.add_argument("target", nargs="?", default=None,
                   help="table2, table4-8, figure1, figure4-6, all (every row), report (write the markdown from "
                        "--out), or steps (measure each network's per-step cost into --out, for the expected "
                        "times of rows not run)")
    p.add_argument("--row", default=None, help="one row of the target, e.g. resnet20-cifar10 (default: every row; "
                                               "see --list)")
    p.add_argument("--preset", choices=["quick", "paper"], default="quick",
                   help="quick: minutes per row; paper: the paper's sizes")
    p.add_argument("--out", default="pbrf-fast-out/reproduce", help="results go to OUT/<target>/<row>/")
    p.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    p.add_argument("--list", action="store_true", help="print the rows and their settings; run nothing")
    p.add_argument("--markdown", default=None, help="report file (default: OUT/REPRODUCTION.md)")
    p.add_argument("--figures", default=None, help="report figures folder (default: beside the markdown)")
    p.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress line per row")
    p.set_defaults(func=_cmd_reproduce)


def _scores_options(p) -> None:
    from .paper.recipes import SCORES_DATASETS, SCORES_MODELS
    from .inverses.flags import add_solver_flags
    from .scale.pipeline import SCORE_CURVATURES
    from .scale.scores_job import ScoresConfig, __doc__ as scores_doc
    from .scale.measurement import MEASUREMENTS

    p.description = scores_doc
    p.add_argument("--model", default=SCORES_MODELS[0],  # a CLI default only: the library job needs a model named
                   help=f"your model, path/to/file.py:make_model or package.module:make_model (make_model() "
                        f"returns the nn.Module), or a built-in one trained here: {', '.join(SCORES_MODELS)}")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a state dict to score (repeat it: the scores are the mean over checkpoints; "
                        "unset: the model as make_model returns it, or the built-in one trained here)")
    p.add_argument("--data", default=None,
                   help="your data: data.pt or data.npz holding x_train, y_train, x_test, y_test "
                        "(unset: --dataset)")
    p.add_argument("--loss", choices=["cross_entropy", "mse", "bce", "token_cross_entropy"],
                   help="the training loss in output space (token_cross_entropy: a sequence model's (b, T, vocab) "
                        "outputs against (b, T) token targets, -100 where not scored, mean over each sequence)")
    p.add_argument("--measurement", choices=list(MEASUREMENTS),
                   help="what a score measures on a test point: its loss, or the margin of the true class")
    p.add_argument("--dataset", choices=SCORES_DATASETS, default="cifar10", help="built-in data (without --data)")
    p.add_argument("--data-dir", default=None, help="data directory (unset: $PBRF_DATA)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (unset: $PBRF_CACHE or ~/.cache/pbrf_fast)")
    p.add_argument("--train-points", type=POSITIVE_INT, default=None, help="use N seeded training points (unset: all)")
    p.add_argument("--test-points", type=POSITIVE_INT, help="test points scored (built-in data)")
    p.add_argument("--memory-gb", type=POSITIVE, help="memory budget that sizes the query chunks")
    p.add_argument("--query-chunk", type=POSITIVE_INT, help="test points per chunk (overrides --memory-gb)")
    add_solver_flags(p, default_solver=ScoresConfig.solver)
    p.add_argument("--curvature", choices=list(SCORE_CURVATURES),
                   help="gnh: the exact damped GNH (solved by --solver); kfac / ekfac: its Kronecker-factored "
                        "approximation, solved by its own inverse (use with --solver auto)")
    p.add_argument("--rank", type=POSITIVE_INT, help="Lanczos eigenpairs (lowrank solver, self-influence)")
    p.add_argument("--damping", type=_damping,
                   help="lambda added to the curvature, or auto: chosen from the curvature's spectrum "
                        "(pbrf_fast.damping; the value and why are printed and saved in summary.json)")
    p.add_argument("--weight-decay", type=NONNEGATIVE,
                   help="the weight decay your model was trained with (part of the objective, so of the GNH)")
    p.add_argument("--curvature-samples", type=COUNT,
                   help="training points the GNH is averaged over (0: all)")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="training points per scoring pass")
    p.add_argument("--curvature-batch-size", type=POSITIVE_INT, help="training points per GNH product batch")
    p.add_argument("--top-k", type=COUNT, help="proponents and opponents kept per test point in topk.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--self-influence", dest="self_influence", action="store_const", const=True,
                       help="compute self-influence (default auto: where it comes from the scores' own inverse -- "
                            "ekfac/kfac, solver lowrank -- not with the exact GNH solved iteratively, where this flag "
                            "gives its low-rank Lanczos approximation)")
    group.add_argument("--no-self-influence", dest="self_influence", action="store_const", const=False,
                       help="never compute self-influence")
    p.add_argument("--train-epochs", type=NONNEGATIVE, default=None,
                   help="a built-in model's training epochs (unset: its recipe's, pbrf_fast/paper/recipes.py)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="a built-in model's learning rate (unset: its recipe's)")
    p.add_argument("--seed", type=COUNT, help="seed of every random choice (samples, sketches, training)")
    p.add_argument("--threads", type=COUNT, default=None, help="torch threads (unset: torch's default)")
    p.add_argument("--device", help="torch device for the model and data, e.g. cuda (unset: cpu)")
    p.add_argument("--out", required=True, help="results folder (required)")
    p.add_argument("--overwrite", action="store_true", help="discard results in --out made with other arguments")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    # every default is ScoresConfig's (itself ScoreArguments' for the scoring settings): one set of
    # defaults for the CLI and Python, each shown by --help
    defaults = {f.name: f.default for f in dataclasses.fields(ScoresConfig) if f.default is not dataclasses.MISSING}
    p.set_defaults(func=_cmd_scores, **{**defaults, "checkpoint": []})  # --checkpoint appends to a list


def _name_list(allowed: tuple[str, ...], what: str):
    """An argparse type: comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(s for s in text.split(",") if s)
        if not names or any(s not in allowed for s in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} from {','.join(allowed)}, "
                                             f"got {text!r}")
        return names
    parse.__name__ = what
    return parse


def _evaluate_options(p) -> None:
    from .inverses import DEFAULT_PRECONDITIONER, PRECONDITIONERS
    from .paper.config import DEFAULT_EVALUATE_SOLVERS, EVALUATE_SOLVERS
    from .paper.evaluate_job import __doc__ as evaluate_doc

    p.description = evaluate_doc
    p.add_argument("--dataset", choices=["digits", "mnist", "cifar10"], default=None,
                   help="a built-in setting's data set (default digits)")
    p.add_argument("--model", type=_evaluate_model, default="logreg",
                   help="logreg, mlp or resnet20 (built-in settings), or your own: file.py:make_model with "
                        "--data, --loss and the recipe you trained it with (--epochs, --lr, --optimizer, "
                        "--batch-size, --weight-decay)")
    p.add_argument("--data", default=None, help="your own model's data: data.pt / data.npz with x_train, "
                                                "y_train, x_test, y_test")
    p.add_argument("--loss", choices=["cross_entropy", "mse", "bce"], default="cross_entropy",
                   help="your own model's training loss")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default=None,
                   help="your own model's optimizer (default sgd), for retraining on each subset")
    p.add_argument("--solvers", type=_name_list(EVALUATE_SOLVERS, "solvers"), default=DEFAULT_EVALUATE_SOLVERS,
                   help=f"comma-separated: {','.join(EVALUATE_SOLVERS)} (pcg: CG preconditioned by "
                        "--preconditioner, --cg-iters/--tol as cg; kfac/ekfac: the Kronecker approximations; "
                        "identity: gradient dot product; default: all but pcg)")
    p.add_argument("--subsets", type=POSITIVE_INT, default=100, help="random training subsets K")
    p.add_argument("--alpha", type=POSITIVE, default=0.5, help="fraction of the training set in each subset")
    p.add_argument("--repeats", type=POSITIVE_INT, default=1, help="retraining runs per subset (averaged)")
    p.add_argument("--checkpoints", type=_int_list, default=(1,),
                   help="ensemble sizes, e.g. 1,3,5: scores averaged over that many base models")
    p.add_argument("--train-points", type=POSITIVE_INT, default=None, help="training points (unset: the data set's "
                                                                           "recipe)")
    p.add_argument("--test-points", type=POSITIVE_INT, default=None, help="test points (unset: the recipe's)")
    p.add_argument("--no-pbrf", action="store_true", help="skip the PBRF ground truth")
    p.add_argument("--loo", type=COUNT, default=0, help="training points retrained leave-one-out (LOO correlation)")
    p.add_argument("--brittleness", type=COUNT, default=0,
                   help="correctly classified test points checked for brittleness (retraining per k and solver)")
    p.add_argument("--brittleness-ks", type=_int_list, default=(10, 20, 40, 80),
                   help="top-proponent counts removed")
    p.add_argument("--damping", type=_damping_list, default=("auto",),
                   help="comma-separated dampings, each a number or auto, e.g. 1e-4,1e-3,1e-2,1e-1,1,auto: "
                        "every solver at each, against one ground truth (a table row each and lds_damping.png)")
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=None,
                   help="weight decay (unset: the recipe's; your own model: 0)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None,
                   help="training epochs (unset: the recipe's; your own model: required)")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="learning rate (unset: the recipe's; your own model: required)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help="SGD mini-batch of the base and subset models (default: 32 for resnet20, else 128)")
    p.add_argument("--width", type=POSITIVE_INT, default=128, help="hidden width of --model mlp")
    p.add_argument("--cg-iters", type=POSITIVE_INT, default=200, help="iterations of cg and pcg")
    p.add_argument("--tol", type=POSITIVE, default=1e-4, help="relative residual at which cg and pcg stop")
    p.add_argument("--preconditioner", choices=sorted(PRECONDITIONERS), default=DEFAULT_PRECONDITIONER,
                   help=f"pcg's preconditioner (default {DEFAULT_PRECONDITIONER}: EK-FAC alone slows CG down on "
                        "ReLU nets)")
    p.add_argument("--preconditioner-rank", type=POSITIVE_INT, default=500, help="columns of pcg's Nystrom sketch")
    p.add_argument("--lissa-depth", type=POSITIVE_INT, default=1000, help="LiSSA recursion steps")
    p.add_argument("--lissa-batch-size", type=POSITIVE_INT, default=128, help="training points per LiSSA step")
    p.add_argument("--rank", type=POSITIVE_INT, default=64, help="Lanczos eigenpairs of the lowrank solver")
    p.add_argument("--chunk", type=POSITIVE_INT, default=50, help="subset models trained together")
    p.add_argument("--lbfgs-iters", type=POSITIVE_INT, default=500,
                   help="L-BFGS iterations of each subset model and PBRF (logreg; warm-started at theta^s)")
    p.add_argument("--seed", type=COUNT, default=0, help="seed of training, subsets and every random choice")
    p.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    p.add_argument("--out", default="pbrf-fast-out/evaluate", help="results folder")
    p.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished work")
    p.add_argument("--overwrite", action="store_true", help="discard results in --out made with other arguments")
    p.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=_cmd_evaluate)


def _backends_options(p) -> None:
    p.add_argument("--json", action="store_true",
                   help="print JSON: each backend's availability and full reason (with --explain: the plans)")
    p.add_argument("--explain", action="store_true",
                   help="plan every op for --model on a batch of --batch inputs (nothing is run)")
    p.add_argument("--model", default="mlp", help="mlp, logreg, lenet, resnet20, ... (the paper's models)")
    p.add_argument("--inputs", type=_int_list, default=(8,), help="input shape of one example, e.g. 8 or 3,32,32")
    p.add_argument("--outputs", type=POSITIVE_INT, default=1, help="network outputs (classes)")
    p.add_argument("--widths", type=_int_list, default=(128, 128), help="hidden widths of --model mlp")
    p.add_argument("--loss", default="mse", choices=["mse", "cross_entropy", "bce"], help="the training loss")
    p.add_argument("--batch", type=POSITIVE_INT, default=128, help="examples per product")
    p.add_argument("--columns", type=POSITIVE_INT, default=1, help="vectors per GNH product (test points solved together)")
    p.add_argument("--lissa-batch-size", type=POSITIVE_INT, default=128, help="training points per LiSSA step")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="the model's dtype")
    p.add_argument("--device", default="cpu", help="the model's device")
    p.add_argument("--backend", default="auto", help="auto, torch, cpu, cuda or triton")
    p.set_defaults(func=_cmd_backends)


def _show_options(p) -> None:
    p.add_argument("out", help="the scores run's --out folder")
    p.add_argument("--test-points", type=POSITIVE_INT, default=8, help="test images shown")
    p.add_argument("-k", type=POSITIVE_INT, default=5, help="proponents and opponents per test image")
    p.add_argument("--data-dir", default=None, help="built-in data sets folder (default: as recorded)")
    p.add_argument("--relative", action="store_true",
                   help="rank proponents by score / self-influence (relative influence) instead of the score")
    p.set_defaults(func=_cmd_show)


# ------------------------------------------------------------------------------------ parser
@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its name, the group --help lists it under, one line, and the
    function that adds its options (run only when the subcommand is used)."""

    name: str
    group: str
    summary: str
    options: object


YOURS, PAPERS = "your model and data", "the paper's experiments"
# --help lists them in this order: the user's own commands first
COMMANDS = (
    Command("scores", YOURS, "train x test influence scores over a full training set", _scores_options),
    Command("show", YOURS, "figures of a finished scores run: self-influence histogram, test images beside "
                           "their top proponents and opponents", _show_options),
    Command("evaluate", YOURS, "attribution quality of each solver: LDS against retraining and the PBRF, "
                               "LOO correlation, time", _evaluate_options),
    Command("backends", YOURS, "which compute backends are usable here; with --explain, which implementation "
                               "each op runs for a model and why", _backends_options),
    Command("demo", PAPERS, "what influence scores answer: decomposition and correlations on built-in data "
                            "(about 4 minutes on 2 cores)", _demo_options),
    Command("decompose", PAPERS, "five-term decomposition of IF vs leave-one-out (Table 5, Figure 4)",
            _decompose_options),
    Command("correlate", PAPERS, "IF vs cold/warm/PBRF/two-stage test-loss changes (Tables 2, 6-8, Figure 1)",
            _decompose_options),
    Command("train", PAPERS, "train (or load) the base network and report its losses", _train_options),
    Command("mislabel", PAPERS, "find corrupted labels by self-influence, IF vs PBRF (Figure 6)",
            _mislabel_options),
    Command("sweep", PAPERS, "each term against width/depth/epochs/weight decay/damping/removed (Figure 5)",
            _sweep_options),
    Command("reproduce", PAPERS, "run the paper's table rows and figure panels, and write REPRODUCTION.md "
                                 "(ours beside the paper's)", _reproduce_options),
)


class _Command(argparse.ArgumentParser):
    """A subcommand's parser whose options are added on first use (parsing its
    arguments or printing its help), so that only the command that runs pays for
    the imports its options need."""

    def __init__(self, *args, add_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_options = add_options

    def with_options(self) -> "_Command":
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(_Command, self.with_options()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(_Command, self.with_options()).format_help()

    def format_usage(self) -> str:
        return super(_Command, self.with_options()).format_usage()


def _command_listing(width: int = 80) -> str:
    """The commands by group, one wrapped line each: the top-level --help."""
    pad = max(len(c.name) for c in COMMANDS) + 4
    lines = []
    for group in dict.fromkeys(c.group for c in COMMANDS):
        lines += [""] if lines else []
        lines.append(f"{group}:")
        for c in (c for c in COMMANDS if c.group == group):
            lines += textwrap.wrap(c.summary, width, initial_indent=f"  {c.name:<{pad - 2}}",
                                   subsequent_indent=" " * pad)
    lines.append("\n`pbrf-fast COMMAND --help` describes a command's options and their defaults.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``pbrf-fast`` parser. Its subcommands add their options when used (see
    :class:`_Command`); :func:`command_parser` returns one with its options added."""
    parser = argparse.ArgumentParser(prog="pbrf-fast", usage="pbrf-fast [-h] COMMAND [options]",
                                     description="Influence functions and their ground truth (PBRF).",
                                     epilog=_command_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    # help=SUPPRESS: the epilog lists the commands in their groups instead of argparse's one flat list
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                parser_class=_Command, prog="pbrf-fast")
    for command in COMMANDS:
        sub.add_parser(command.name, description=textwrap.fill(command.summary, 80), add_options=command.options,
                       formatter_class=_Help)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` with every option added (what tests inspect)."""
    return build_parser()._subparsers._group_actions[0].choices[name].with_options()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    formatwarning = warnings.formatwarning
    # a warning on the terminal is one plain line, not Python's source location and code line
    warnings.formatwarning = lambda message, category, *_, **__: (f"pbrf-fast {args.command}: "
                                                                  f"{category.__name__}: {message}\n")
    try:
        return args.func(args)
    except PBRFError as exc:
        print(f"pbrf-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
