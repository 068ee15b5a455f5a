"""The ``pbrf-fast`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .io import atomic_write_json


def _cmd_demo(args) -> int:
    from .demo import run_demo

    torch.set_num_threads(args.threads) if args.threads else None
    result = run_demo(seed=args.seed)
    result["arguments"] = vars(args) | {"func": None}
    path = atomic_write_json(Path(args.out) / "demo.json", result)
    print(f"results written to {path}")
    return 0


def _cmd_backends(args) -> int:
    from .backends import backends

    print(json.dumps(backends(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbrf-fast", description="Influence functions and their ground truth.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="influence end to end on built-in data, checked against retraining")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="pbrf-fast-out", help="folder for demo.json")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo.set_defaults(func=_cmd_demo)
    back = sub.add_parser("backends", help="which compute backends are usable here, and why not")
    back.set_defaults(func=_cmd_backends)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
