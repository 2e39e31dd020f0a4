"""Joining the torchrun process group: the one place that knows which backend and device a rank uses."""

from __future__ import annotations

import atexit
import gc
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
        # A gloo group still alive when the interpreter finalizes can abort the process after the
        # work is done ("terminate called without an active exception"): leave it at exit instead.
        atexit.register(leave_distributed)
    return rank, world, device


def leave_distributed() -> None:
    """Destroy this process's group, if it joined one; safe to call more than once.

    Collecting garbage first frees DDP models that are no longer used: each holds the group, and one
    still alive keeps the group's threads running into the interpreter's finalization."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
