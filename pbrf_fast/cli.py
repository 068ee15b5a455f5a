"""The ``pbrf-fast`` command line: the paper's experiments, resumable, with tables and figures."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]


def _common(parser: argparse.ArgumentParser, dataset_default: str = "concrete") -> None:
    from .experiments import DATASETS, PRESETS

    parser.add_argument("--dataset", choices=DATASETS, default=dataset_default)
    parser.add_argument("--model", choices=["auto", "logreg", "mlp", "autoencoder", "lenet", "alexnet", "vgg13",
                                            "resnet20", "transformer"], default="auto",
                        help="auto: logistic regression for cancer/diabetes, ResNet-20 for cifar10, an MLP otherwise")
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="pbrf-fast-out", help="results folder")
    parser.add_argument("--data-dir", default=None, help="data sets folder (default: $PBRF_DATA)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished work")
    parser.add_argument("--overwrite", action="store_true", help="discard results in --out made with other arguments")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _points_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--removed", type=int, default=None, help="removed points (default: preset's)")
    parser.add_argument("--test-points", type=int, default=None, help="test points for correlations")
    parser.add_argument("--chunk", type=int, default=10, help="removed points retrained together")
    parser.add_argument("--damping", type=float, default=None)
    parser.add_argument("--curvature", choices=["gnh", "hessian"], default="gnh")
    parser.add_argument("--solver", choices=["lissa", "cg", "direct", "kernel", "auto"], default=None,
                        help="influence estimate's solver (default: preset's)")


def _experiment(args, **overrides):
    from .experiments import build

    if args.model == "logreg" and args.dataset not in ("cancer", "diabetes"):
        raise SystemExit("--model logreg is available for cancer and diabetes")
    if args.model == "mlp" and args.dataset in ("cancer", "diabetes"):
        raise SystemExit("--model mlp is not set up for cancer/diabetes; use logreg")
    exp = build(args.dataset, args.preset, args.seed, args.data_dir, model=args.model, **overrides)
    if getattr(args, "damping", None) is not None:
        exp.responses.damping = args.damping
    if getattr(args, "curvature", None):
        exp.responses.curvature = args.curvature
    if getattr(args, "solver", None):
        exp.responses.influence_solver = args.solver
        if args.solver != "lissa":
            exp.responses.influence_options = {}
    if getattr(args, "removed", None):
        exp.n_removed = args.removed
    if getattr(args, "test_points", None):
        exp.n_test_points = args.test_points
    return exp


def _arguments(args, exp) -> dict:
    keep = {k: v for k, v in vars(args).items() if k not in ("func", "resume", "overwrite", "threads", "out")}
    return keep | {"experiment": exp.describe()}


def run_decomposition(args, exp=None, out=None, quiet=False) -> dict:
    from .report import correlation_table, figure_gap_bars, figure_scatter, gap_table, write_tables
    from .runner import RunFolder, choose_removed_points, choose_test_points, run_points, train_base

    exp = exp or _experiment(args)
    out = Path(out or args.out)
    folder = RunFolder(out, _arguments(args, exp), resume=args.resume, overwrite=args.overwrite)
    base = train_base(exp, folder, progress=not quiet)
    removed = choose_removed_points(exp.problem.n, exp.n_removed, args.seed)
    tests = choose_test_points(len(exp.x_test), exp.n_test_points, args.seed)
    records = run_points(exp, base, removed, tests, folder, chunk=args.chunk, progress=not quiet)
    gaps, corr = gap_table(records), correlation_table(records)
    payload = {"arguments": folder.arguments, "removed": removed, "test_points": tests,
               "base_objective": base.final_objective, "records": records}
    md = write_tables(out, exp.name, gaps, corr, payload)
    figure_gap_bars(out / "decomposition.png", {exp.name: gaps})
    figure_scatter(out / "correlation.png", records, exp.name)
    if not quiet:
        print(md)
        print(f"results in {out}/ (results.json, table.csv, table.md, decomposition.png, correlation.png)")
    return {"gaps": gaps, "correlations": corr, "markdown": md}


def _cmd_decompose(args) -> int:
    run_decomposition(args)
    return 0


def _cmd_train(args) -> int:
    from .runner import RunFolder, train_base

    exp = _experiment(args)
    folder = RunFolder(Path(args.out), _arguments(args, exp), resume=args.resume, overwrite=args.overwrite)
    base = train_base(exp, folder)
    x, t = exp.problem.check_data(exp.x_test, exp.t_test)
    with torch.no_grad():
        test_loss = float(exp.problem.example_losses(exp.problem.theta, x, t).mean())
    summary = {"train_objective": base.final_objective, "test_loss": test_loss, "n_train": exp.problem.n,
               "dim": exp.problem.dim, "config": dataclasses.asdict(base.config)}
    from .io import atomic_write_json

    atomic_write_json(Path(args.out) / "train.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_mislabel(args) -> int:
    from .mislabel import run_mislabel

    run_mislabel(args, _experiment(args, corrupt_fraction=args.corrupt))
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import run_sweep

    run_sweep(args)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), seed=args.seed)
    return 0


def _cmd_backends(args) -> int:
    from .backends import backends

    print(json.dumps(backends(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbrf-fast", description="Influence functions and their ground truth (PBRF).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="decomposition and correlations on built-in data (< 3 minutes)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="pbrf-fast-out/demo")
    demo.add_argument("--threads", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    for name, func, helptext in [
        ("decompose", _cmd_decompose, "five-term decomposition of IF vs leave-one-out (Table 5, Figure 4)"),
        ("correlate", _cmd_decompose, "IF vs cold/warm/PBRF/two-stage test-loss changes (Tables 2, 6-8, Figure 1)"),
    ]:
        p = sub.add_parser(name, help=helptext)
        _common(p)
        _points_args(p)
        p.set_defaults(func=func)

    train = sub.add_parser("train", help="train (or load) the base network and report its losses")
    _common(train)
    train.set_defaults(func=_cmd_train)

    mislabel = sub.add_parser("mislabel", help="find corrupted labels by self-influence, IF vs PBRF (Figure 6)")
    _common(mislabel, dataset_default="digits")
    _points_args(mislabel)
    mislabel.add_argument("--corrupt", type=float, default=0.1, help="fraction of labels corrupted")
    mislabel.add_argument("--candidates", type=int, default=None,
                          help="training points scored by PBRF (default: all in paper, 300 in quick)")
    mislabel.set_defaults(func=_cmd_mislabel)

    sweep = sub.add_parser("sweep", help="each term against width/depth/epochs/weight decay/damping/removed (Figure 5)")
    _common(sweep)
    _points_args(sweep)
    sweep.add_argument("--parameter", required=True,
                       choices=["width", "depth", "epochs", "weight_decay", "damping", "fraction_removed"])
    sweep.add_argument("--values", required=True, type=float, nargs="+")
    sweep.set_defaults(func=_cmd_sweep)

    back = sub.add_parser("backends", help="which compute backends are usable here, and why not")
    back.set_defaults(func=_cmd_backends)
    _add_scale_commands(sub)
    return parser


def _add_scale_commands(sub) -> None:
    # The scale pipeline registers its own subcommand when present.
    try:
        from .scale.cli import add_scores_parser
    except ImportError:
        return
    add_scores_parser(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
