"""One place that starts torch.distributed for training and evaluation (torchrun sets WORLD_SIZE)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "PHOTON_DIST_TIMEOUT"   # seconds a collective may wait for the other processes (default 1800)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts a process group under torchrun (nccl on CUDA, gloo on CPU).

    A process that waits longer than ``$PHOTON_DIST_TIMEOUT`` seconds in a collective (another rank
    died or took another path) fails with an error naming it instead of hanging; the default is
    torch's 30 minutes, room for rank 0 writing a large checkpoint while the others wait.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
