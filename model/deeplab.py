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
from functools import lru_cache

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


class PaddedConv2d(nn.Conv2d):
    """A 3x3 convolution padded by its dilation, which skips the taps that can only read the padding.

    When the dilation is at least the map's height and width, every off-centre tap of every output pixel
    falls in the zero padding, so the convolution equals a 1x1 convolution with the centre weights: the
    same outputs and the same gradients (the off-centre weights get zero from the loss either way). At
    the testbed's crop 48 the stride-16 map is 3x3, and ASPP's rates 4 and 6 are such convolutions; the
    1x1 form costs about a third of the dilated one's forward and backward on a CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.dilation[0] >= h and self.dilation[1] >= w:
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        return super().forward(x)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    if kernel == 1:
        conv = nn.Conv2d(cin, cout, 1, bias=False)
    else:
        conv = PaddedConv2d(cin, cout, kernel, padding=dilation, dilation=dilation, bias=False)
    return nn.Sequential(
        conv,
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class StemMaxPool2d(nn.MaxPool2d):
    """The encoder stem's max pooling, run over a channels-last copy of the map on a CPU.

    torch's CPU kernel for a contiguous (NCHW) map takes about five times as long, forward and backward,
    as the channels-last one with the layout copies included (the testbed's 16 x 24 x 24 stem maps). The
    gradient is copied back to the input's layout too: a channels-last gradient reaching the stem's ReLU
    and convolution would cost them more than the pooling saves.
    The maxima are the same; where a window ties, its maximum is 0 after the stem's ReLU, whose
    backward stops the gradient at 0 whichever tied pixel receives it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()):
            return super().forward(x)
        copy = x.contiguous(memory_format=torch.channels_last)
        if copy.requires_grad:  # the gradient leaves in the input's layout, or the stem's backward slows down
            copy.register_hook(lambda grad: grad.contiguous())
        return super().forward(copy).contiguous()


@lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype) -> torch.Tensor:
    """The (n_out, n_in) matrix of 1-D linear interpolation, with the source coordinates of
    ``F.interpolate(mode="bilinear")``."""
    dst = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros(n_out, dtype=torch.float64)
    else:
        src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = src - low
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(dtype)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear")`` (no antialiasing), as two matrix products on a CPU.

    Bilinear resizing is separable, ``A_h @ x @ A_w^T``. On a CPU the matrix products and their backward
    take about an eighth of the time of the library's kernels for the testbed's logits (9 classes, 12x12
    to 48x48), and agree with them to float rounding. Elsewhere, and under autocast, the library kernel
    runs.
    """
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not x.is_floating_point():
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    (h, w), (out_h, out_w) = x.shape[-2:], size
    rows = _interpolation_matrix(h, out_h, align_corners, x.dtype)
    cols = _interpolation_matrix(w, out_w, align_corners, x.dtype)
    return rows @ (x @ cols.T)  # the width first: one plain matrix product over every row of the batch


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
        pooled = self.pool(x).expand(-1, -1, h, w)  # what bilinear resizing of a 1x1 map gives
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
            out = resize_bilinear(out, size, align_corners=False)
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
        pool = self.backbone.stem[-1]  # the stem's max pooling, swapped for the same pooling on a faster path
        self.backbone.stem[-1] = StemMaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                               ceil_mode=pool.ceil_mode)  # fmt: skip
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
        high = resize_bilinear(high, low.shape[-2:], align_corners=True)
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
        return resize_bilinear(logits, size, align_corners=True)


class ClassScores(nn.Module):
    """A segmentation model seen from outside: normalised images (B, 3, H, W) -> class logits (B, K, H, W).

    The form a trained model is served and logged in (MLflow's pyfunc calls ``forward`` with a batch).
    """

    def __init__(self, model: DeepLabV3Plus):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits
