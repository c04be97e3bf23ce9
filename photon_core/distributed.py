"""One place that starts torch.distributed for training and evaluation (torchrun sets WORLD_SIZE)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts a process group under torchrun (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
