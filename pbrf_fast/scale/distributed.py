"""torch.distributed helpers: rank/world queries that work without a process
group, contiguous sharding of training points, and a GNH whose products sum
over the ranks' data shards."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..curvatures import GaussNewton
from ..problem import as_index
from ..errors import InputError

__all__ = ["rank", "world_size", "is_distributed", "barrier", "shard_range", "DistributedGaussNewton",
           "broadcast_object"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Contiguous [start, stop) of n items owned by a rank (sizes differ by at most one)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return n * rank_ // world, n * (rank_ + 1) // world


class DistributedGaussNewton(GaussNewton):
    """Damped GNH over the union of every rank's data shard.

    Each rank builds its :class:`~pbrf_fast.Problem` on its own shard, the shards
    being consecutive pieces of one data set in rank order (as :func:`shard_range`
    cuts them). A product is the local sum of J_i^T H_i J_i V, all-reduced, divided
    by the total example count, plus the damping, so every rank holds the same
    result and the solvers run unchanged and in lock-step on all ranks.

    Indices (``matvec(V, idx)``, LiSSA's mini-batches) are *global*: positions in
    the union, so a seeded schedule drawn over :attr:`num_examples` picks the same
    examples with one process or K, and each rank serves the ones in its shard.
    """

    kind = "gnh"

    def __init__(self, problem, damping=0.0, **kwargs):
        super().__init__(problem, damping, **kwargs)
        counts = [problem.n]
        if is_distributed():
            counts = [None] * world_size()
            dist.all_gather_object(counts, problem.n)
        self.shard_counts = [int(c) for c in counts]
        self.shard_start = sum(self.shard_counts[:rank()])

    @property
    def spans_processes(self) -> bool:
        return is_distributed() and world_size() > 1

    @property
    def num_examples(self) -> int:
        return sum(self.shard_counts)

    def with_damping(self, damping: float) -> "DistributedGaussNewton":
        return type(self)(self.problem, damping, batch_size=self.batch_size, _cache=self._cache,
                          backend=self.backend)

    def _local_positions(self, idx: torch.Tensor) -> torch.Tensor:
        """The entries of the global positions ``idx`` in this rank's shard, as local positions."""
        inside = (idx >= self.shard_start) & (idx < self.shard_start + self.problem.n)
        return idx[inside] - self.shard_start

    def data_matvec(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        if idx is None:
            local_idx, total = None, self.num_examples
        else:
            idx = as_index(idx, self.num_examples)
            if len(idx) == 0:
                raise InputError("empty index batch")
            local_idx, total = self._local_positions(idx), len(idx)
        V2 = self.check_vectors(V)
        if local_idx is not None and len(local_idx) == 0:  # none of this batch lives here
            local = torch.zeros_like(V2)
        else:
            count = self.problem.n if local_idx is None else len(local_idx)
            local = super().data_matvec(V2, local_idx).mul_(count)
        if self.spans_processes:
            dist.all_reduce(local)
        return local.div_(total).reshape(V.shape)

    def gathered(self) -> GaussNewton:
        """The same operator on one process: every shard's data gathered onto each rank
        (for the output-space solver, which needs all N training outputs together;
        it is only chosen when N x C is small)."""
        if not self.spans_processes:
            return GaussNewton(self.problem, self.damping, batch_size=self.batch_size, backend=self.backend)
        parts = [None] * world_size()
        dist.all_gather_object(parts, (self.problem.inputs.cpu(), self.problem.targets.cpu()))
        p = self.problem
        device = p.inputs.device
        full = type(p)(p.model, p.loss, torch.cat([x for x, _ in parts]).to(device),
                       torch.cat([t for _, t in parts]).to(device), weight_decay=p.weight_decay,
                       batch_size=p.batch_size)
        full.set_theta(p.theta)
        return GaussNewton(full, self.damping, batch_size=self.batch_size, backend=self.backend)
