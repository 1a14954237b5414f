"""Which shards a (rank, dataloader worker) reads: the upstream ``DistributedSampler`` rule.

Train (``partition=True, shuffle=True``): shards shuffled with ``random.Random(epoch)``, dealt
round-robin to ranks, then to workers, so each epoch reads every shard exactly once overall (lists
shorter than the world size or the worker count are repeated, as upstream does). CV
(``partition=False``): every rank reads every shard, dealt only across its workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 1

    @classmethod
    def current(cls) -> Placement:
        """From ``torch.distributed`` and the DataLoader worker running this code."""
        import torch
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        info = torch.utils.data.get_worker_info()
        return cls(rank, world, info.id if info else 0, info.num_workers if info else 1)


def _repeat_to(items: list[int], n: int) -> list[int]:
    return (items * math.ceil(n / len(items)))[:n] if items and len(items) < n else items


def shard_indices(n_shards: int, placement: Placement, *, epoch: int = -1, shuffle: bool = True,
                  partition: bool = True) -> list[int]:
    indices = list(range(n_shards))
    if partition:
        if shuffle:
            random.Random(epoch).shuffle(indices)
        indices = _repeat_to(indices, placement.world_size)[placement.rank::placement.world_size]
    indices = _repeat_to(indices, placement.num_workers)
    return indices[placement.worker_id::placement.num_workers]
