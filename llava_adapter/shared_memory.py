"""DeepSpeed's shared-memory all-reduce on the CPU leaves its buffers in /dev/shm: release them once mapped.

With every rank on one machine, DeepSpeed's CPU accelerator gives each rank a 69 MB buffer named
`/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` and never unlinks it, so every run
(finished or killed) keeps its buffers in memory-backed tmpfs until reboot, and a later run that reuses the port opens
a dead run's buffer and waits on it forever. Once every rank has mapped every buffer the names are not needed: the
mappings keep the memory alive for the run, and the kernel frees it when the last rank exits, even after kill -9.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def allreduce_buffer(rank: int, master_addr: str, master_port: str) -> Path:
    """The buffer DeepSpeed's CPU all-reduce names for `rank` of the run whose master is `master_addr:master_port`."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def uses_shared_memory_allreduce() -> bool:
    """Whether DeepSpeed set up its CPU shared-memory all-reduce: the same answer on every rank (the launcher's
    LOCAL_SIZE and the backend DeepSpeed built), so a barrier behind it cannot deadlock."""
    comm = sys.modules.get("deepspeed.comm.comm")  # only a run that imported DeepSpeed can have one
    backend = getattr(comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None or not (dist.is_available() and dist.is_initialized()):
        return False
    return int(os.environ.get("LOCAL_SIZE", "0")) == dist.get_world_size()


def release_allreduce_buffers() -> None:
    """Unlink this rank's buffer once every rank has mapped all of them (a barrier); a no-op without one."""
    if not uses_shared_memory_allreduce():
        return
    dist.barrier()  # every rank returned from DeepSpeed's set-up, which maps each peer's buffer before returning
    allreduce_buffer(dist.get_rank(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")).unlink(
        missing_ok=True
    )
