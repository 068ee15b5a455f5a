"""The ``pbrf-fast`` command line. Thin on purpose: each subcommand parses its
arguments into the typed settings of :mod:`pbrf_fast.paper.config` and calls one
harness or library function. Errors pbrf_fast raises on purpose (bad settings,
a results folder made with other arguments) exit with status 2 and one line on
stderr; success exits 0.

``python -m pbrf_fast ...`` (and ``torchrun -m pbrf_fast scores ...``) runs the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

import torch

from .errors import InputError, PBRFError
from .curvatures import CURVATURES, OWN_INVERSES
from .inverses import AUTO, DEFAULT_PRECONDITIONER, INVERSES, PRECONDITIONERS

__all__ = ["main", "build_parser"]

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
        from .backends import backends

        print(json.dumps(backends(), indent=2))
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


def _common(parser: argparse.ArgumentParser, dataset_default: str = "concrete") -> None:
    from .paper.experiments import DATASETS, PRESETS

    parser.add_argument("--dataset", choices=DATASETS, default=dataset_default)
    parser.add_argument("--model", choices=MODELS, default="auto",
                        help="auto: logistic regression for cancer/diabetes, ResNet-20 for cifar10, an MLP otherwise")
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--seed", type=COUNT, default=0)
    parser.add_argument("--out", default="pbrf-fast-out", help="results folder")
    parser.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished work")
    parser.add_argument("--overwrite", action="store_true", help="discard results in --out made with other arguments")
    parser.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)


def _points_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--removed", type=POSITIVE_INT, default=None, help="removed points (default: preset's)")
    parser.add_argument("--test-points", type=POSITIVE_INT, default=None, help="test points for correlations")
    parser.add_argument("--chunk", type=POSITIVE_INT, default=10, help="removed points retrained together")
    parser.add_argument("--damping", type=NONNEGATIVE, default=None)
    parser.add_argument("--curvature", choices=[n for n, c in CURVATURES.items() if c.exact], default="gnh")
    parser.add_argument("--solver", choices=[n for n in INVERSES if n not in OWN_INVERSES] + [AUTO], default=None,
                        help="influence estimate's solver (default: preset's)")
    parser.add_argument("--cold-start-order", choices=["replay", "fresh"], default="replay",
                        help="cold-start retraining replays the base run's batch order (default) or draws a fresh one")


class _DescriptionAndDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every flag's default."""


def _scores_parser(sub) -> None:
    from .paper.recipes import SCORES_DATASETS, SCORES_MODELS
    from .inverses.flags import add_solver_flags
    from .scale.pipeline import SCORE_CURVATURES
    from .scale.scores_job import ScoresConfig, __doc__ as scores_doc
    from .scale.measurement import MEASUREMENTS

    p = sub.add_parser("scores", help="train x test influence scores over a full training set",
                       description=scores_doc, formatter_class=_DescriptionAndDefaults)
    p.add_argument("--model", default=SCORES_MODELS[0],  # a CLI default only: the library job needs a model named
                   help=f"your model, path/to/file.py:make_model or package.module:make_model (make_model() "
                        f"returns the nn.Module), or a built-in one trained here: {', '.join(SCORES_MODELS)}")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a state dict to score (repeat it: the scores are the mean over checkpoints)")
    p.add_argument("--data", default=None,
                   help="your data: data.pt or data.npz holding x_train, y_train, x_test, y_test")
    p.add_argument("--loss", choices=["cross_entropy", "mse", "bce"],
                   help="the training loss in output space")
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
    p.add_argument("--threads", type=COUNT, default=None)
    p.add_argument("--device", help="torch device for the model and data (e.g. cuda)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    # every default is ScoresConfig's (itself ScoreArguments' for the scoring settings): one set of
    # defaults for the CLI and Python, each shown by --help
    defaults = {f.name: f.default for f in dataclasses.fields(ScoresConfig) if f.default is not dataclasses.MISSING}
    p.set_defaults(func=_cmd_scores, **{**defaults, "checkpoint": []})  # --checkpoint appends to a list


def _solver_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated solver names of the evaluate job."""
    from .paper.config import EVALUATE_SOLVERS

    names = tuple(s for s in text.split(",") if s)
    unknown = [s for s in names if s not in EVALUATE_SOLVERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated solvers from {','.join(EVALUATE_SOLVERS)}, got {text!r}")
    return names


def _evaluate_parser(sub) -> None:
    from .paper.config import DEFAULT_EVALUATE_SOLVERS
    from .paper.evaluate_job import __doc__ as evaluate_doc

    p = sub.add_parser("evaluate", help="attribution quality of each solver: LDS against retraining and the PBRF, "
                                        "LOO correlation, time", description=evaluate_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--solvers", type=_solver_list, default=DEFAULT_EVALUATE_SOLVERS,
                   help="comma-separated: cg,pcg,lissa,lowrank,kernel,direct,kfac,ekfac,identity (pcg: CG "
                        "preconditioned by --preconditioner, --cg-iters/--tol as cg; kfac/ekfac: the Kronecker "
                        "approximations; identity: gradient dot product; default: all but pcg)")
    p.add_argument("--subsets", type=POSITIVE_INT, default=100, help="random training subsets K")
    p.add_argument("--alpha", type=POSITIVE, default=0.5, help="fraction of the training set in each subset")
    p.add_argument("--repeats", type=POSITIVE_INT, default=1, help="retraining runs per subset (averaged)")
    p.add_argument("--checkpoints", type=_int_list, default=(1,),
                   help="ensemble sizes, e.g. 1,3,5: scores averaged over that many base models")
    p.add_argument("--train-points", type=POSITIVE_INT, default=None)
    p.add_argument("--test-points", type=POSITIVE_INT, default=None)
    p.add_argument("--no-pbrf", action="store_true", help="skip the PBRF ground truth")
    p.add_argument("--loo", type=COUNT, default=0, help="training points retrained leave-one-out (LOO correlation)")
    p.add_argument("--brittleness", type=COUNT, default=0,
                   help="correctly classified test points checked for brittleness (retraining per k and solver)")
    p.add_argument("--brittleness-ks", type=_int_list, default=(10, 20, 40, 80),
                   help="top-proponent counts removed, e.g. 10,20,40,80")
    p.add_argument("--damping", type=_damping_list, default=("auto",),
                   help="comma-separated dampings, each a number or auto, e.g. 1e-4,1e-3,1e-2,1e-1,1,auto: "
                        "every solver at each, against one ground truth (a table row each and lds_damping.png)")
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=None)
    p.add_argument("--epochs", type=POSITIVE_INT, default=None)
    p.add_argument("--lr", type=POSITIVE, default=None)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help="SGD mini-batch of the base and subset models (default: 32 for resnet20, else 128)")
    p.add_argument("--width", type=POSITIVE_INT, default=128, help="hidden width of --model mlp")
    p.add_argument("--cg-iters", type=POSITIVE_INT, default=200)
    p.add_argument("--tol", type=POSITIVE, default=1e-4)
    p.add_argument("--preconditioner", choices=sorted(PRECONDITIONERS), default=DEFAULT_PRECONDITIONER,
                   help="pcg's preconditioner (default nystrom: EK-FAC alone slows CG down on ReLU nets)")
    p.add_argument("--preconditioner-rank", type=POSITIVE_INT, default=500, help="columns of pcg's Nystrom sketch")
    p.add_argument("--lissa-depth", type=POSITIVE_INT, default=1000)
    p.add_argument("--lissa-batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--rank", type=POSITIVE_INT, default=64, help="Lanczos eigenpairs of the lowrank solver")
    p.add_argument("--chunk", type=POSITIVE_INT, default=50, help="subset models trained together")
    p.add_argument("--lbfgs-iters", type=POSITIVE_INT, default=500,
                   help="L-BFGS iterations of each subset model and PBRF (logreg; warm-started at theta^s)")
    p.add_argument("--seed", type=COUNT, default=0)
    p.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    p.add_argument("--out", default="pbrf-fast-out/evaluate", help="results folder")
    p.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished work")
    p.add_argument("--overwrite", action="store_true", help="discard results in --out made with other arguments")
    p.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=_cmd_evaluate)


def _backends_parser(sub) -> None:
    p = sub.add_parser("backends", help="which compute backends are usable here; with --explain, "
                                        "which implementation each op runs for a model and why")
    p.add_argument("--explain", action="store_true",
                   help="plan every op for --model on a batch of --batch inputs (nothing is run)")
    p.add_argument("--model", default="mlp", help="mlp, logreg, lenet, resnet20, ... (the paper's models)")
    p.add_argument("--inputs", type=_int_list, default=(8,), help="input shape of one example, e.g. 8 or 3,32,32")
    p.add_argument("--outputs", type=POSITIVE_INT, default=1, help="network outputs (classes)")
    p.add_argument("--widths", type=_int_list, default=(128, 128), help="hidden widths of --model mlp")
    p.add_argument("--loss", default="mse", choices=["mse", "cross_entropy", "bce"])
    p.add_argument("--batch", type=POSITIVE_INT, default=128, help="examples per product")
    p.add_argument("--columns", type=POSITIVE_INT, default=1, help="vectors per GNH product (test points solved together)")
    p.add_argument("--lissa-batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="auto, torch, cpu, cuda or triton")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=_cmd_backends)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbrf-fast", description="Influence functions and their ground truth (PBRF).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="decomposition and correlations on built-in data (< 3 minutes)")
    demo.add_argument("--seed", type=COUNT, default=0)
    demo.add_argument("--out", default="pbrf-fast-out/demo")
    demo.add_argument("--threads", type=COUNT, default=0)
    demo.set_defaults(func=_cmd_demo)

    for name, helptext in [
        ("decompose", "five-term decomposition of IF vs leave-one-out (Table 5, Figure 4)"),
        ("correlate", "IF vs cold/warm/PBRF/two-stage test-loss changes (Tables 2, 6-8, Figure 1)"),
    ]:
        p = sub.add_parser(name, help=helptext)
        _common(p)
        _points_args(p)
        p.set_defaults(func=_cmd_decompose)

    train = sub.add_parser("train", help="train (or load) the base network and report its losses")
    _common(train)
    train.set_defaults(func=_cmd_train)

    mislabel = sub.add_parser("mislabel", help="find corrupted labels by self-influence, IF vs PBRF (Figure 6)")
    _common(mislabel, dataset_default="digits")
    _points_args(mislabel)
    mislabel.add_argument("--corrupt", type=NONNEGATIVE, default=0.1, help="fraction of labels corrupted")
    mislabel.add_argument("--candidates", type=POSITIVE_INT, default=None,
                          help="training points scored by PBRF (default: all in paper, 300 in quick)")
    mislabel.set_defaults(func=_cmd_mislabel)

    from .paper.config import SWEEP_PARAMETERS

    sweep = sub.add_parser("sweep", help="each term against width/depth/epochs/weight decay/damping/removed (Figure 5)")
    _common(sweep)
    _points_args(sweep)
    sweep.add_argument("--parameter", required=True, choices=SWEEP_PARAMETERS)
    sweep.add_argument("--values", required=True, type=float, nargs="+")
    sweep.set_defaults(func=_cmd_sweep)

    reproduce = sub.add_parser("reproduce", help="run the paper's table rows and figure panels, and write "
                                                 "REPRODUCTION.md (ours beside the paper's)")
    reproduce.add_argument("target", nargs="?", default=None, help="table2, table4-8, figure1, figure4-6, all (every row), report "
                                          "(write the markdown from --out), or steps (measure each network's "
                                          "per-step cost into --out, for the expected times of rows not run)")
    reproduce.add_argument("--row", default=None, help="one row of the target, e.g. resnet20-cifar10 (see --list)")
    reproduce.add_argument("--preset", choices=["quick", "paper"], default="quick")
    reproduce.add_argument("--out", default="pbrf-fast-out/reproduce", help="results go to OUT/<target>/<row>/")
    reproduce.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    reproduce.add_argument("--list", action="store_true", help="print the rows and their settings; run nothing")
    reproduce.add_argument("--markdown", default=None, help="report file (default OUT/REPRODUCTION.md)")
    reproduce.add_argument("--figures", default=None, help="report figures folder (default: beside the markdown)")
    reproduce.add_argument("--threads", type=COUNT, default=0, help="torch threads (0: torch's default)")
    reproduce.add_argument("--device", default="cpu", help=DEVICE_HELP)
    reproduce.add_argument("--no-progress", action="store_true")
    reproduce.set_defaults(func=_cmd_reproduce)

    _backends_parser(sub)
    _scores_parser(sub)
    _evaluate_parser(sub)
    show = sub.add_parser("show", help="figures of a finished scores run: self-influence histogram, "
                                       "test images beside their top proponents and opponents")
    show.add_argument("out", help="the scores run's --out folder")
    show.add_argument("--test-points", type=POSITIVE_INT, default=8, help="test images shown")
    show.add_argument("-k", type=POSITIVE_INT, default=5, help="proponents and opponents per test image")
    show.add_argument("--data-dir", default=None, help="built-in data sets folder (default: as recorded)")
    show.add_argument("--relative", action="store_true",
                      help="rank proponents by score / self-influence (relative influence) instead of the score")
    show.set_defaults(func=_cmd_show)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except PBRFError as exc:
        print(f"pbrf-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
