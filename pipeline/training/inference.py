"""A trained model at work: class scores in one of the evaluation modes, and the confusion matrix
over a val loader. It takes a plain ``nn.Module`` (no optimiser, no DDP wrapper), so that evaluate,
predict and the training loop's validation all score images the same way."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.masking import IGNORE
from pipeline.training.metrics import confusion_matrix

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Inference:
    """``model`` on ``device`` in eval mode, under the autocast of ``amp`` (none, bf16 or fp16)."""

    def __init__(self, model: nn.Module, num_classes: int, device: torch.device, *, amp: str = "none",
                 channels_last: bool = False):  # fmt: skip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.num_classes, self.device, self.amp_dtype = num_classes, device, AMP_DTYPES[amp]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def scores(self, image: torch.Tensor, mode: str, crop: int, stride: float) -> torch.Tensor:
        """Class scores (B, K, H, W) for normalised images: logits, or in ``sliding_window`` mode the
        windows' averaged softmax."""
        self.model.eval()
        image = image.to(self.device).contiguous(memory_format=self.memory_format)
        with self.autocast():
            if mode == "sliding_window":
                return sliding_window(self.model, image, self.num_classes, crop, stride).float()
            return self.model(image).logits.float()

    @torch.no_grad()
    def confusion(self, loader: Iterable[dict], mode: str, crop: int, stride: float = 2 / 3) -> torch.Tensor:
        """Confusion matrix (K, K) over the loader, summed across ranks; rows are ground truth."""
        total = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)
        for batch in loader:
            image, label = batch["image"], batch["label"]
            if mode == "center_crop":
                image, label = center_crop(image, label, crop)
            pred = self.scores(image, mode, crop, stride).argmax(dim=1)
            total += confusion_matrix(pred, label.to(self.device), self.num_classes)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return total


def center_crop(image: torch.Tensor, label: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre crop to ``crop`` (padding with fill 0 / label 255 where the image is smaller)."""
    h, w = image.shape[-2:]
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        image = F.pad(image, pad, value=0.0)
        label = F.pad(label, pad, value=IGNORE)
        h, w = image.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[..., top : top + crop, left : left + crop], label[..., top : top + crop, left : left + crop]


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def sliding_window(model: nn.Module, image: torch.Tensor, num_classes: int, window: int, stride: float) -> torch.Tensor:
    """Average of softmax scores over windows of side ``window`` at ``stride × window`` steps."""
    b, _, h, w = image.shape
    step = max(1, int(window * stride))
    scores = image.new_zeros(b, num_classes, h, w)
    counts = image.new_zeros(1, 1, h, w)
    for top in _window_starts(h, window, step):
        for left in _window_starts(w, window, step):
            tile = image[..., top : top + window, left : left + window]
            th, tw = tile.shape[-2:]
            scores[..., top : top + th, left : left + tw] += model(tile).logits.softmax(dim=1)
            counts[..., top : top + th, left : left + tw] += 1
    return scores / counts
