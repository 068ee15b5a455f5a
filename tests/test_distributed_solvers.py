"""Every solver gives the same answer on two gloo processes (data sharded, products
all-reduced) as on one: cg, lissa (the one-process run on the native engine, the
two-process run on the Python loop, one seed), lowrank, direct and kernel."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pbrf_fast
from pbrf_fast.inverses import LowRankInverse
from pbrf_fast.scale import DistributedGaussNewton
from pbrf_fast.scale.distributed import shard_range

from factories import rel_err

N, DAMPING = 23, 0.1
LISSA = dict(depth=40, repeats=2, batch_size=5, seed=7, scale=50.0)


def problem_and_rhs(rows=slice(None)):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(N, 4, dtype=torch.float64, generator=g)
    t = torch.randint(0, 3, (N,), generator=g)
    problem = pbrf_fast.Problem(model, "cross_entropy", x[rows], t[rows], batch_size=4)
    B = torch.randn(problem.dim, 3, dtype=torch.float64, generator=g)
    return problem, B


def solve_all(op, B):
    out = {method: pbrf_fast.solve(op, B, method, tol=1e-12).solution for method in ("cg", "direct", "kernel")}
    out["lissa"] = pbrf_fast.solve(op, B, "lissa", **LISSA)
    out["lowrank"] = LowRankInverse(op, 8, seed=0).solve(B).solution
    return out


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lo, hi = shard_range(N, rank, world)
        problem, B = problem_and_rhs(slice(lo, hi))
        op = DistributedGaussNewton(problem, DAMPING)
        assert op.num_examples == N and op.spans_processes
        results = solve_all(op, B)
        results["lissa_engine"] = results["lissa"].info["engine"]
        results["lissa"] = results["lissa"].solution
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_every_solver_two_processes_equal_one(tmp_path):
    problem, B = problem_and_rhs()
    single = solve_all(pbrf_fast.GaussNewton(problem, DAMPING), B)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "dual.pt")), nprocs=2, join=True)
    dual = torch.load(tmp_path / "dual.pt")
    assert dual["lissa_engine"] == "python"           # all-reduced steps run from Python
    for method in ("cg", "direct", "kernel", "lissa", "lowrank"):
        expected = single[method].solution if method == "lissa" else single[method]
        assert rel_err(dual[method], expected) < 1e-9, method
