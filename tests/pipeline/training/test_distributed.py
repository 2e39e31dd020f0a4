"""Leaving the process group: what every torchrun rank does at exit."""

import torch
import torch.distributed as dist

from pipeline.training.distributed import leave_distributed


def _train_one_step() -> None:
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 3))
    model(torch.randn(1, 3, 8, 8)).sum().backward()  # the model, and its hold on the group, end here


def test_leave_distributed_destroys_the_group_once_its_models_are_gone():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _train_one_step()
        leave_distributed()
        assert not dist.is_initialized()
        leave_distributed()  # a second call (atexit after an explicit one) does nothing
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
