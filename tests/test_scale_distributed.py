"""Two gloo processes (torch.multiprocessing.spawn) give the same scores and
self-influence as one process."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pbrf_fast.paper.models import mlp
from pbrf_fast.scale import compute_scores
from pbrf_fast.paper.builtin_scores import load_dataset


OPTIONS = {"cg": {"tol": 1e-12, "max_iter": 300}, "lissa": {"depth": 60, "batch_size": 16, "scale": 20.0}}


def _run(out, solver, lanczos_seed=0):
    x_tr, y_tr, x_te, y_te = load_dataset("synthetic", n_train=61, n_test=3, seed=2)
    model = mlp(12, (6,), 4, seed=0, dtype=torch.float64)
    compute_scores(model, "cross_entropy", x_tr.double(), y_tr, x_te.double(), y_te, out, damping=1e-2,
                   solver=solver, solver_options=OPTIONS[solver], rank=8, query_chunk=2,
                   batch_size=16, progress=False, seed=lanczos_seed, self_influence=True)


def _worker(rank, world, init_file, out, solver):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _run(out, solver)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_two_processes_match_one(tmp_path, solver):
    _run(tmp_path / "single", solver)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "dual"), solver), nprocs=2, join=True)
    for name in ("scores.npy", "self_influence.npy"):
        one, two = np.load(tmp_path / "single" / name), np.load(tmp_path / "dual" / name)
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
