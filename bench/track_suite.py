"""Quick performance-tracking suite (pytest-benchmark), run by ``bash bench/track.sh``.

Each tracked benchmark is a pair measured in the same run: ``fast`` is what the
library does, ``reference`` the plain way a user would do the same thing with
torch (or with the library's plain path). ``bench/track.py`` turns each pair into
one ratio, reference time / fast time (a speed-up: higher is better), because a
ratio measured in one run survives this shared machine's drifting load far better
than an absolute time does.

Run it through ``bash bench/track.sh`` (saves the run, compares with
``bench/baseline.json``); directly: ``.venv/bin/pytest bench/track_suite.py --benchmark-only``.

Environment (read here, never by the library):

- ``PBRF_BENCH_DEVICE``: ``cpu`` or ``cuda``; unset, cuda when torch sees a GPU.
- ``PBRF_BENCH_THREADS``: torch / OpenMP threads (the compiled kernels take torch's
  count). Unset: 1 on CPU, torch's default on CUDA. On this shared 2-core box two
  threads turn every call into a wait for the scheduler while another job runs
  (bench/RESULTS.md, "Tracking"); one thread measures the code, not the neighbours.
- ``PBRF_BENCH_REPEATS``: how many times each side is measured, alternating with
  the other side (default 5); bench/track.py keeps each side's best.
- ``PBRF_BENCH_SLOWDOWN``: ``name:seconds[,name:seconds]`` sleeps that long inside the
  measured call of the ``fast`` side of benchmark ``name``. Test-only: it is how
  tests/test_bench_tracking.py proves that a regression is caught.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

import pytest
import torch

import pbrf_fast
from pbrf_fast.kernels import BackendUnavailable
from pbrf_fast.kernels.score_contraction import score_contraction, score_contraction_reference
from pbrf_fast.paper.models import lenet, mlp
from pbrf_fast.inverses import solve


def _device() -> str:
    chosen = os.environ.get("PBRF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if chosen not in ("cpu", "cuda"):
        raise ValueError(f"PBRF_BENCH_DEVICE must be 'cpu' or 'cuda', not {chosen!r}")
    return chosen


def device_kind(device: str) -> str:
    """The baseline key: ratios move with the hardware, so each kind keeps its own."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return "cuda-" + "-".join(name.replace("_", " ").split())


def parse_slowdown(text: str) -> dict[str, float]:
    delays = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, seconds = item.rpartition(":")
        if not sep or not name:
            raise ValueError(f"PBRF_BENCH_SLOWDOWN: expected name:seconds, got {item!r}")
        delays[name] = float(seconds)
    return delays


DEVICE = _device()
DEVICE_KIND = device_kind(DEVICE)
THREADS = int(os.environ.get("PBRF_BENCH_THREADS") or 0) or (1 if DEVICE == "cpu" else None)
SLOWDOWN = parse_slowdown(os.environ.get("PBRF_BENCH_SLOWDOWN", ""))
REPEATS = int(os.environ.get("PBRF_BENCH_REPEATS") or 5)


@dataclasses.dataclass
class Pair:
    fast: Callable[[], object]
    reference: Callable[[], object]
    # Rounds for calls too long for pytest-benchmark's calibration to be cheap
    # (None: let it calibrate, as for sub-10 ms calls).
    rounds: int | None = None


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _problem(model, x, t, loss, batch_size=1024):
    return pbrf_fast.Problem(model.to(DEVICE), loss, x.to(DEVICE), t.to(DEVICE), batch_size=batch_size)


def _regression_data(n, d_in, seed=0):
    g = _generator(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, 1, generator=g)


def _rhs(dim, m, seed=1):
    shape = (dim,) if m is None else (dim, m)
    return torch.randn(*shape, generator=_generator(seed)).to(DEVICE)


def _gnh_pair(problem, m, rounds=None):
    """One GNH product on an operator that is applied repeatedly (as in a solver):
    the dispatch's choice against torch.func, each on its own operator."""
    V = _rhs(problem.dim, m)
    fast = pbrf_fast.GaussNewton(problem, 1e-3, backend="auto")
    reference = pbrf_fast.GaussNewton(problem, 1e-3, backend="torch")
    return Pair(lambda: fast.matvec(V), lambda: reference.matvec(V), rounds)


def gnh_product_mlp(m):
    x, t = _regression_data(128, 8)
    return _gnh_pair(_problem(mlp(8, (128, 128), 1, activation="tanh", seed=0), x, t, "mse"), m)


def gnh_product_lenet():
    """No compiled path exists for convolutions: this pins "auto" to costing no more than torch.func."""
    g = _generator()
    x, t = torch.randn(32, 1, 28, 28, generator=g), torch.randint(10, (32,), generator=g)
    return _gnh_pair(_problem(lenet(seed=0), x, t, "cross_entropy"), 4)


def output_space_solve():
    """Concrete-sized (930 x 8, one output) MLP small enough (d = 1377) that the dense
    route is the one a user would take: both solves start from a fresh operator, so
    the Gram / eigendecomposition each caches is paid in every round."""
    x, t = _regression_data(930, 8)
    problem = _problem(mlp(8, (32, 32), 1, seed=0), x, t, "mse")
    B = _rhs(problem.dim, 20)

    def solve(method):
        return pbrf_fast.solve(pbrf_fast.GaussNewton(problem, 1e-3), B, method, compute_residual=False)
    return Pair(lambda: solve("kernel"), lambda: solve("direct"), rounds=3)


def block_cg():
    """16 right-hand sides in one block CG against 16 single-column CG solves, same tolerance."""
    x, t = _regression_data(128, 8)
    op = pbrf_fast.GaussNewton(_problem(mlp(8, (128, 128), 1, seed=0), x, t, "mse"), 1e-2)
    B = _rhs(op.dim, 16)

    def cg(rhs):
        return pbrf_fast.solve(op, rhs, "cg", tol=1e-4, compute_residual=False)
    return Pair(lambda: cg(B), lambda: [cg(B[:, j]) for j in range(B.shape[1])], rounds=3)


def lissa_native():
    """The seeded LiSSA recursion (paper setting: N = 930, batch 128), same operator and
    depth: the compiled engine against the Python loop over the same products."""
    x, t = _regression_data(930, 8)
    op = pbrf_fast.GaussNewton(_problem(mlp(8, (128, 128), 1, activation="tanh", seed=0), x, t, "mse"), 1e-3)
    b = _rhs(op.dim, None)

    def run(engine):
        return solve(op, b, "lissa", depth=100, batch_size=128, scale=50.0, engine=engine, compute_residual=False)
    # Calibrated, not 3 rounds a block: the best of 15 calls still swung 23-35 ms per run.
    return Pair(lambda: run("native"), lambda: run("python"))


def score_contraction_conv():
    """ResNet-20 stage-2 conv shape (64 images x 256 positions, 32 x 288, 10 queries):
    the dispatched contraction against the torch reference."""
    g = _generator()
    b, t, o, i, m = 64, 256, 32, 288, 10
    a, delta, S = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((b, t, i), (b, t, o), (m, o, i)))
    return Pair(lambda: score_contraction(a, delta, S), lambda: score_contraction_reference(a, delta, S))


PAIRS: dict[str, Callable[[], Pair]] = {
    "gnh_product_mlp_m1": lambda: gnh_product_mlp(1),
    "gnh_product_mlp_m32": lambda: gnh_product_mlp(32),
    "gnh_product_lenet": gnh_product_lenet,
    "output_space_solve": output_space_solve,
    "block_cg": block_cg,
    "lissa_native": lissa_native,
    "score_contraction": score_contraction_conv,
}
VARIANTS = ("fast", "reference")
if set(SLOWDOWN) - set(PAIRS):  # a misspelt name would slow nothing and prove nothing
    raise ValueError(f"PBRF_BENCH_SLOWDOWN names no benchmark: {sorted(set(SLOWDOWN) - set(PAIRS))}; "
                     f"benchmarks: {sorted(PAIRS)}")


@pytest.fixture(scope="module", autouse=True)
def _thread_count():
    """Set for this module's benchmarks only: other bench files in the same pytest
    session keep torch's count."""
    before = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _pair(name: str) -> Pair:
    # Built once per benchmark and shared by its two sides: same data, same seeds.
    return PAIRS[name]()


def _measured(fn, delay):
    def call():
        if delay:
            time.sleep(delay)
        out = fn()
        if DEVICE == "cuda":  # launches are asynchronous: time until the work is done
            torch.cuda.synchronize()
        return out
    return call


# The machine's speed drifts over seconds (other jobs come and go): the two sides of
# a pair alternate in short blocks, fast / reference / fast / ..., so that both
# sides get measured in the calm spells, which each side's best time picks out.
CASES = [(n, k, v) for n in PAIRS for k in range(REPEATS) for v in VARIANTS]


@pytest.mark.benchmark(max_time=0.4)  # per block of a calibrated side; 5 blocks each
@pytest.mark.parametrize("name,repeat,variant", CASES, ids=[f"{n}-{v}-{k}" for n, k, v in CASES])
def test_track(benchmark, name, repeat, variant):
    pair = _pair(name)
    delay = SLOWDOWN.get(name, 0.0) if variant == "fast" else 0.0
    call = _measured(getattr(pair, variant), delay)
    benchmark.group = name
    benchmark.extra_info.update(pair=name, variant=variant, repeat=repeat, device=DEVICE_KIND,
                                threads=torch.get_num_threads(), slowdown_s=delay,
                                compiled=pbrf_fast.backends()[DEVICE]["available"])
    try:
        if repeat == 0:
            call()  # warm-up outside the timing: first-call caches and allocations
        if pair.rounds:
            benchmark.pedantic(call, rounds=pair.rounds, warmup_rounds=0)
        else:
            benchmark(call)
    except BackendUnavailable as exc:  # e.g. a GPU machine without pbrf_fast._C_cuda: "not run"
        pytest.skip(f"{name}: {exc}")
