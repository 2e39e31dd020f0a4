"""Joining the torchrun process group: the one place that knows which backend and device a rank uses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.paths import rank as process_rank
from pipeline.paths import world_size


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group when there is one; returns rank, world size and device."""
    world = world_size()
    rank = process_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
