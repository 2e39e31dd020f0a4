"""DeepLabV3+ (output stride 16, ASPP, stride-4 decoder) with the extras S4MIM needs.

The forward pass returns the logits and, on request:
- ``logits_fp``: the decode of Dropout2d-perturbed encoder features (UniMatch's feature perturbation);
- ``features``: the decoder feature map at stride 4, before the classifier;
- ``encoder_features``: the stride-16 encoder output (always: it costs nothing extra);
- ``reconstruction``: the normalised RGB image predicted by the light reconstruction head, which reads
  the decoder features (stride 4) or the encoder features (stride 16), as built.

A pass that needs neither logits nor decoder features stops after the encoder: the masked forward of
MIM with an encoder reconstruction head and encoder feature aggregation runs no ASPP and no decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import SLIM_WIDTH, build_backbone


@dataclass
class SegOutput:
    logits: torch.Tensor | None  # (B, K, H, W); None when not asked for
    logits_fp: torch.Tensor | None = None  # (B - perturb_from, K, H, W)
    features: torch.Tensor | None = None  # (B, D, H/4, W/4)
    encoder_features: torch.Tensor | None = None  # (B, C_high, H/16, W/16)
    reconstruction: torch.Tensor | None = None  # (B, 3, H, W)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three atrous branches and image pooling."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout)] + [_conv_bn_relu(cin, cout, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(cin, cout))
        # No dropout after the projection (UniMatch has none): in train mode it would randomise the weak
        # view's pseudo labels, which come from the same forward pass. (A Sequential of one keeps the
        # parameter names of checkpoints made when a dropout followed.)
        self.project = nn.Sequential(_conv_bn_relu(cout * (len(dilations) + 2), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = F.interpolate(self.pool(x), size=(h, w), mode="bilinear", align_corners=True)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class ReconstructionHead(nn.Module):
    """A 1x1 conv on a feature map at stride ``scale``, then a x``scale`` pixel shuffle to full resolution."""

    def __init__(self, cin: int, scale: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(cin, 3 * scale * scale, kernel_size=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.shuffle(self.proj(features))  # (B, 3, scale*h, scale*w)
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


class DeepLabV3Plus(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        init: str = "none",
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        dilations: tuple[int, ...] = (6, 12, 18),
        fp_dropout: float = 0.5,
        reconstruction: bool = False,
        reconstruct_from: str = "decoder",
        width: int = SLIM_WIDTH,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, init, width)
        self.aspp = ASPP(self.backbone.high_channels, aspp_channels, tuple(dilations))
        self.reduce = _conv_bn_relu(self.backbone.low_channels, low_level_channels)
        self.fuse = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)
        self.fp_dropout = nn.Dropout2d(fp_dropout)
        if reconstruct_from not in ("decoder", "encoder"):
            raise ValueError(f"reconstruct_from {reconstruct_from!r}: choose decoder or encoder")
        self.reconstruct_from = reconstruct_from
        self.reconstruction_head = None
        if reconstruction:
            cin, stride = (decoder_channels, 4) if reconstruct_from == "decoder" else (self.backbone.high_channels, 16)
            self.reconstruction_head = ReconstructionHead(cin, stride)

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone: these parameters learn at lr x head_lr_mult."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

    def _decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = self.aspp(high)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([self.reduce(low), high], dim=1))  # (B, D, H/4, W/4)

    def forward(
        self,
        x: torch.Tensor,
        *,
        perturb_from: int | None = None,
        need_features: bool = False,
        need_reconstruction: bool = False,
        need_logits: bool = True,
    ) -> SegOutput:
        """Segment ``x`` (B, 3, H, W).

        ``perturb_from=i`` also returns the logits of Dropout2d-perturbed encoder features of ``x[i:]``.
        As in UniMatch, the clean and the perturbed features of the whole batch are decoded in one call
        (2B rows), so both share the decoder's BatchNorm batch statistics and its running statistics
        are updated once per step.
        ``need_features`` returns the decoder features; ``need_logits=False`` skips the classifier and its
        upsampling (the masked forward of MIM), and the decoder too when nothing else reads it.
        """
        size = x.shape[-2:]
        low, high = self.backbone(x)  # (B, C_low, H/4, W/4), (B, C_high, H/16, W/16)
        out = SegOutput(logits=None, encoder_features=high)
        recon_from_decoder = need_reconstruction and self.reconstruct_from == "decoder"
        features = None
        if perturb_from is not None:
            both = self._decode(torch.cat([low, self.fp_dropout(low)]), torch.cat([high, self.fp_dropout(high)]))
            features, features_fp = both.chunk(2)  # (B, D, H/4, W/4) each
            out.logits_fp = self._upsample(self.classifier(features_fp[perturb_from:]), size)
        elif need_logits or need_features or recon_from_decoder:
            features = self._decode(low, high)
        if need_logits:
            out.logits = self._upsample(self.classifier(features), size)
        if need_features:
            out.features = features
        if need_reconstruction:
            if self.reconstruction_head is None:
                raise RuntimeError("model was built without a reconstruction head")
            out.reconstruction = self.reconstruction_head(features if recon_from_decoder else high, size)
        return out

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class ClassScores(nn.Module):
    """A segmentation model seen from outside: normalised images (B, 3, H, W) -> class logits (B, K, H, W).

    The form a trained model is served and logged in (MLflow's pyfunc calls ``forward`` with a batch).
    """

    def __init__(self, model: DeepLabV3Plus):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits
