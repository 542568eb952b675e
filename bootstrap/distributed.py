"""Data-parallel bootstrapping under `torchrun` (one process per GPU, or CPU ranks with gloo), multi-node included.

A run launched without `torchrun` is a world of one and uses none of `torch.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a per-rank scalar over all ranks (the scalar itself in a world of one)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.size

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of dataset indices: every `size`-th, from `rank`."""
        return batch[self.rank :: self.size]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: str) -> World:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, ...).

    Args:
        device: "cuda" or "cpu"; under torchrun a CUDA rank takes GPU `LOCAL_RANK` and NCCL, a CPU rank gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        target, backend = torch.device("cuda", local_rank), "nccl"
    else:
        target, backend = torch.device(device), "gloo"
    dist.init_process_group(backend)
    return World(rank, size, target)
