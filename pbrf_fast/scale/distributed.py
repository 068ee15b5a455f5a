"""torch.distributed helpers: rank/world queries that work without a process
group, contiguous sharding of training points, and a GNH whose products sum
over the ranks' data shards."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..curvature import GaussNewton
from ..problem import as_index

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

    Each rank builds its :class:`~pbrf_fast.Problem` on its own shard; a product
    is the local sum of J_i^T H_i J_i V, all-reduced, divided by the total
    example count, plus the damping. Every rank then holds the same result, so
    CG / LiSSA / Lanczos run unchanged and in lock-step on all ranks. With
    ``idx`` (LiSSA mini-batches) each rank uses those positions of its own shard.
    """

    kind = "gnh"

    def data_matvec(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        local_count = len(as_index(idx, self.problem.n))
        local = super().data_matvec(V, idx) * local_count
        if not is_distributed():
            return local / local_count
        count = torch.tensor([float(local_count)], dtype=torch.float64)
        dist.all_reduce(local)
        dist.all_reduce(count)
        return local / float(count)

    def dense_data(self):
        raise NotImplementedError("DistributedGaussNewton has no dense form; use cg, lissa or lowrank")
