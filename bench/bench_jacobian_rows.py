"""Time J's rows on ResNet-20 (issue 15): how a chunk's C output-gradient passes get their forward.

    python bench/bench_jacobian_rows.py [--images 64] [--rounds 3] [--threads 2]
        [--variants once,replicated]

ResNet-20 (pbrf_fast.paper.resnet, seed 0, eval mode), random CIFAR-shaped float32 images,
C = 10 outputs: ``JacobianRows(problem)(x)`` for one chunk of --images examples under each
``jacobian_rows.FORWARD`` variant, rounds interleaved (best of --rounds), after one warm-up
each. Prints seconds per example, the ratio to the first variant and the largest difference
between variants' rows (they compute the same numbers by different passes). Run it under
``flock /tmp/pbrf-bench.lock`` when its times are reported.
"""
import argparse
import os
import time

import torch

import pbrf_fast
from pbrf_fast import jacobian_rows
from pbrf_fast.paper.resnet import resnet20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="once,replicated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    problem = pbrf_fast.Problem(resnet20(seed=0).eval(), "cross_entropy", x, y)
    variants = args.variants.split(",")
    best, rows = {v: float("inf") for v in variants}, {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for v in variants:
            jacobian_rows.FORWARD = v
            op = jacobian_rows.JacobianRows(problem, chunk_bytes=1 << 40)
            start = time.perf_counter()
            rows[v] = op(x)
            seconds = time.perf_counter() - start
            assert op.source == "layers", op.reason
            if round_:
                best[v] = min(best[v], seconds)
    first = variants[0]
    for v in variants:
        diff = float((rows[v] - rows[first]).abs().max() / rows[first].abs().max())
        print(f"{v:12s} {best[v]:8.2f} s = {best[v] / args.images * 1e3:7.1f} ms/example, "
              f"{best[v] / best[first]:.2f}x {first}; max |diff| / max |rows| vs {first}: {diff:.1e}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
