"""ResNet encoders with a dilated last stage (output stride 16).

Every backbone returns two feature maps: ``low`` at stride 4 (layer1) and ``high`` at stride 16
(layer4, dilated). torchvision supplies the blocks and, for ``resnet50``/``resnet101``, the whole
network and its ImageNet weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

BACKBONES = ("resnet18", "resnet18_slim", "resnet50", "resnet101")

_IMAGENET_WEIGHTS = {
    "resnet18": tv_resnet.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": tv_resnet.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": tv_resnet.ResNet101_Weights.IMAGENET1K_V1,
}


class BackboneInitError(RuntimeError):
    """The requested backbone initialisation cannot be loaded."""


class ResNetEncoder(nn.Module):
    """The stem and four stages of a torchvision ResNet, without pooling and classifier."""

    def __init__(self, net: tv_resnet.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels = _out_channels(net.layer1)
        self.high_channels = _out_channels(net.layer4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x))  # (B, C_low, H/4, W/4)
        high = self.layer4(self.layer3(self.layer2(low)))  # (B, C_high, H/16, W/16)
        return low, high


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a BasicBlock stage into a dilated stage with stride 1.

    torchvision refuses ``replace_stride_with_dilation`` for BasicBlock, so the strides, dilation
    and padding of the 3x3 convs are changed after construction instead.
    """
    for i, block in enumerate(layer):
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
        if i == 0 and block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


SLIM_WIDTH = 32


def _slim_resnet18(width: int = SLIM_WIDTH) -> tv_resnet.ResNet:
    """A ResNet-18 whose stages have width, 2, 4 and 8 x width channels: half width (32-64-128-256) by
    default, for CPU presets; 16 gives the quarter width of the cheap testbed."""
    net = tv_resnet.ResNet(tv_resnet.BasicBlock, [2, 2, 2, 2])
    norm = nn.BatchNorm2d
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = norm(width)
    net.layer1 = net._make_layer(tv_resnet.BasicBlock, width, 2)
    net.layer2 = net._make_layer(tv_resnet.BasicBlock, width * 2, 2, stride=2)
    net.layer3 = net._make_layer(tv_resnet.BasicBlock, width * 4, 2, stride=2)
    net.layer4 = net._make_layer(tv_resnet.BasicBlock, width * 8, 2, stride=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def build_backbone(name: str, init: str = "none", width: int = SLIM_WIDTH) -> ResNetEncoder:
    """Build a dilated ResNet encoder by name.

    ``init`` is ``none`` (random), ``imagenet`` (torchvision weights: needs the network or a warm
    torch hub cache) or the path of a local state dict (a ResNet or an encoder state dict).
    ``width`` is the first stage's channels of ``resnet18_slim``; the other backbones have their own.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    if width != SLIM_WIDTH and name != "resnet18_slim":
        raise ValueError(f"backbone width {width} applies to resnet18_slim only, not {name}")
    if init == "imagenet" and name not in _IMAGENET_WEIGHTS:
        raise BackboneInitError(f"backbone {name} has no ImageNet weights; use --set model.init=none or a local file")
    weights = _load_imagenet(name) if init == "imagenet" else None
    builders: dict[str, Callable[[], tv_resnet.ResNet]] = {
        "resnet18": lambda: tv_resnet.resnet18(),
        "resnet18_slim": lambda: _slim_resnet18(width),
        "resnet50": lambda: tv_resnet.resnet50(replace_stride_with_dilation=[False, False, True]),
        "resnet101": lambda: tv_resnet.resnet101(replace_stride_with_dilation=[False, False, True]),
    }
    net = builders[name]()
    if isinstance(net.layer4[0], tv_resnet.BasicBlock):
        _dilate_basic_layer(net.layer4, dilation=2)
    if weights is not None:
        net.load_state_dict(weights)
    encoder = ResNetEncoder(net)
    if init not in ("none", "imagenet"):
        _load_local(encoder, net, Path(init))
    return encoder


def check_init(name: str, init: str) -> None:
    """Raise BackboneInitError now if ``init`` cannot be loaded later (before any worker starts)."""
    if init == "none":
        return
    if init == "imagenet":
        if name not in _IMAGENET_WEIGHTS:
            raise BackboneInitError(
                f"backbone {name} has no ImageNet weights; use --set model.init=none or a local file"
            )
        _load_imagenet(name)
    else:
        _read_state(Path(init))


def _load_imagenet(name: str) -> dict[str, torch.Tensor]:
    weights = _IMAGENET_WEIGHTS[name]
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # urllib raises a zoo of types when offline
        raise BackboneInitError(
            f"cannot load ImageNet weights for {name} ({type(exc).__name__}): no network and no "
            "cached copy in the torch hub directory; use --set model.init=none, or "
            "--set model.init=/path/to/resnet.pth with a local torchvision state dict"
        ) from exc


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file, or a BackboneInitError that names the file and the cause."""
    if not path.is_file():
        raise BackboneInitError(f"model.init={path}: no such file; give 'none', 'imagenet' or a local state dict path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch raise several types for a file that is not a checkpoint
        raise BackboneInitError(
            f"model.init={path}: not a torch weights file ({type(exc).__name__}); give a state dict saved "
            "with torch.save, or model.init=none"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneInitError(f"model.init={path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_local(encoder: ResNetEncoder, net: tv_resnet.ResNet, path: Path) -> None:
    state = _read_state(path)
    try:
        if any(k.startswith("stem.") for k in state):
            encoder.load_state_dict(state)
        else:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except RuntimeError as exc:
        raise BackboneInitError(f"model.init={path}: state dict does not fit the backbone: {exc}") from exc
