"""What a training run sets up once around its model: the DDP wrapper, the optimiser and its learning-rate
schedule, the loss scaler for fp16 and the EMA teacher. Plain torch only.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model.deeplab import DeepLabV3Plus
from pipeline.config.schema import Config


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# BatchNorm's running statistics stay each rank's own between steps (rank 0's are saved). Newer torch
# names that ``forward_sync_buffers`` and warns on the old ``broadcast_buffers``; unlike the old flag,
# it still copies rank 0's buffers once at wrapping, where every rank holds the same ones anyway.
_RANK_LOCAL_BUFFERS = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def for_device(
    model: nn.Module, device: torch.device, memory_format: torch.memory_format
) -> tuple[nn.Module, nn.Module]:
    """The model on its device, and the module a step runs: wrapped in DDP when the process group has more
    than one rank (with synchronised BatchNorm on GPUs), the model itself otherwise."""
    model = model.to(device, memory_format=memory_format)
    if not is_distributed():
        return model, model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=ids, **_RANK_LOCAL_BUFFERS)


def sgd(model: DeepLabV3Plus, config: Config, lr: float) -> torch.optim.SGD:
    """SGD with the head at ``optim.head_lr_mult`` times the backbone's lr; each group keeps its
    ``base_lr`` for the poly schedule."""
    optim = config.optim
    head_lr = lr * optim.head_lr_mult
    return torch.optim.SGD(
        [
            {"params": list(model.backbone.parameters()), "lr": lr, "base_lr": lr},
            {"params": model.head_parameters(), "lr": head_lr, "base_lr": head_lr},
        ],
        lr=lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
    )


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - min(step, total) / max(total, 1)) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float) -> float:
    """Set every group's lr for step ``step`` (counted from 0) and return the first group's.

    As UniMatch does, the lr is set from the iterations done before the step, so step k uses the decay
    of step k - 1 (steps 0 and 1 both use the base lr)."""
    done = max(step - 1, 0)
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["base_lr"], done, total, power)
    return optimizer.param_groups[0]["lr"]


def loss_scaler(config: Config, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 autocast only."""
    return torch.amp.GradScaler(device.type, enabled=config.optim.amp == "fp16")


def ema_teacher(model: nn.Module, config: Config, variant: str) -> AveragedModel | None:
    """The exponential moving average of the student that labels the unlabeled images, where the config
    asks for one (``unimatch.teacher=ema``); ``None`` when the student labels them itself."""
    if variant == "supervised" or config.unimatch.teacher != "ema":
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.unimatch.ema_decay), use_buffers=True)
