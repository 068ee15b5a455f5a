"""The ``scores`` subcommand: train (or load) a base model, then stream influence
scores over the whole training set into ``--out``.

    pbrf-fast scores --model resnet20 --dataset cifar10 --test-points 10 \\
        --memory-gb 8 --solver cg --damping 1e-3 --out runs/cifar --train-epochs 1

Rerunning the same command resumes from what is on disk. Wire it into a parser
with :func:`add_scores_parser` (``pbrf_fast.cli`` does). Under
``torchrun --nproc_per_node=K`` the work is sharded across K processes (gloo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["add_scores_parser", "run_scores", "load_dataset", "build_model", "main"]


def add_scores_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("scores", help="train x test influence scores over a full training set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["resnet20", "mlp"], default="resnet20")
    p.add_argument("--dataset", choices=["cifar10", "digits", "synthetic"], default="cifar10")
    p.add_argument("--data-dir", default=None, help="data directory (default $PBRF_DATA)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default $PBRF_CACHE or ~/.cache/pbrf_fast)")
    p.add_argument("--train-points", type=int, default=None, help="use the first N training points (default all)")
    p.add_argument("--test-points", type=int, default=10)
    p.add_argument("--memory-gb", type=float, default=4.0, help="memory budget that sizes the query chunks")
    p.add_argument("--query-chunk", type=int, default=None, help="test points per chunk (overrides --memory-gb)")
    p.add_argument("--solver", choices=["cg", "lissa", "lowrank"], default="cg")
    p.add_argument("--cg-iters", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--lissa-depth", type=int, default=200)
    p.add_argument("--rank", type=int, default=32, help="Lanczos eigenpairs (lowrank solver, self-influence)")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--curvature-samples", type=int, default=5000,
                   help="training points the GNH is averaged over (0: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--curvature-batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--no-self-influence", action="store_true")
    p.add_argument("--train-epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device for the model and data (e.g. cuda)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_scores)
    return p


def load_dataset(name, data_dir=None, cache_dir=None, n_train=None, n_test=None, seed=0):
    """(x_train, y_train, x_test, y_test) float32 inputs, int64 labels."""
    if name == "cifar10":
        from ..data.cifar import load_cifar10

        x_tr, y_tr, x_te, y_te = load_cifar10(data_dir, cache_dir)
        # Image-folder copies are stored class by class: take seeded random
        # subsets, never the first N (which would all be one class).
        gen = torch.Generator().manual_seed(seed)
        if n_train is not None and n_train < len(x_tr):
            keep = torch.randperm(len(x_tr), generator=gen)[:n_train].sort().values
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        if n_test is not None:
            keep = torch.randperm(len(x_te), generator=gen)[:n_test].sort().values
            x_te, y_te = x_te[keep], y_te[keep]
        return x_tr, y_tr, x_te, y_te
    if name == "digits":
        from ..data import load_digits

        x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
        return x_tr[:n_train], y_tr[:n_train].long(), x_te[:n_test], y_te[:n_test].long()
    if name == "synthetic":
        gen = torch.Generator().manual_seed(seed)
        n_tr, n_te = n_train or 512, n_test or 16
        x = torch.randn(n_tr + n_te, 12, generator=gen)
        w = torch.randn(12, 4, generator=gen)
        y = (x @ w + 0.5 * torch.randn(n_tr + n_te, 4, generator=gen)).argmax(1)
        return x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:]
    raise ValueError(f"unknown dataset {name!r}")


def build_model(name, x_example, num_classes, seed=0):
    if name == "resnet20":
        from ..resnet import resnet20

        if x_example.dim() != 3:
            raise ValueError("resnet20 needs image inputs (C, H, W)")
        return resnet20(num_classes, seed=seed)
    from ..models import mlp

    return mlp(x_example.numel(), (64, 64), num_classes, seed=seed)


def _init_distributed():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")


def run_scores(args) -> dict:
    from ..losses import get_loss
    from .pipeline import compute_scores
    from .train import load_or_train

    if args.threads:
        torch.set_num_threads(args.threads)
    _init_distributed()
    timings = {}
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_dataset(args.dataset, args.data_dir, args.cache_dir, args.train_points,
                                          args.test_points, args.seed)
    timings["load_data"] = time.perf_counter() - start
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    model = build_model(args.model, x_tr[0], num_classes, args.seed).to(args.device)
    x_tr, y_tr, x_te, y_te = (v.to(args.device) for v in (x_tr, y_tr, x_te, y_te))
    loss = get_loss("cross_entropy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tag = f"{args.model}-{args.dataset}-n{len(x_tr)}-e{args.train_epochs}-lr{args.lr}-s{args.seed}"
    train_log = load_or_train(out / f"model-{tag}.pt", model, loss, x_tr, y_tr, epochs=args.train_epochs,
                              lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                              progress=not args.no_progress)
    timings["train_or_load"] = time.perf_counter() - start
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean()) if len(x_te) else float("nan")
    options = ({"max_iter": args.cg_iters, "tol": args.tol} if args.solver == "cg" else
               {"depth": args.lissa_depth} if args.solver == "lissa" else {})
    summary = compute_scores(
        model, loss, x_tr, y_tr, x_te, y_te, out, damping=args.damping, weight_decay=args.weight_decay,
        solver=args.solver, solver_options=options, rank=args.rank, memory_gb=args.memory_gb,
        query_chunk=args.query_chunk, curvature_samples=args.curvature_samples or None,
        batch_size=args.batch_size, curvature_batch_size=args.curvature_batch_size, top_k=args.top_k,
        self_influence=not args.no_self_influence, seed=args.seed, overwrite=args.overwrite,
        progress=not args.no_progress, extra={"model": args.model, "dataset": args.dataset, "train": tag})
    summary = dict(summary, setup_seconds=timings, train_log=train_log, test_accuracy_of_base_model=acc)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pbrf-fast-scores")
    add_scores_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
