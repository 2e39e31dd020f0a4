"""The views of SPEC §3.1, built from torchvision ``transforms.v2`` on (image, mask) pairs.

- weak: random rescale (0.5-2.0 of the image's own size), crop with padding, horizontal flip;
- strong: the weak view plus colour jitter (p 0.8), grayscale (p 0.2) and Gaussian blur (p 0.5);
- CutMix boxes (p 0.5), one per strong view.

Padding takes the mean colour (0 after normalisation) in the image and 255 in every mask, so
a padding mask rides along and padding never counts in a loss.
"""

from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_UINT8 = tuple(round(255 * m) for m in MEAN)
IGNORE = 255


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32, ImageNet-normalised."""
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), MEAN, STD)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised (..., 3, H, W) -> float in [0, 1], for pictures."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


PADS = ("black_bottom_right", "mean_random")


class WeakView:
    """Rescale, crop and flip an image together with any number of masks.

    An image smaller than the crop is padded first (masks with 255, void): ``black_bottom_right`` pads
    with black on the right and bottom, as UniMatch does; ``mean_random`` pads with the mean colour
    (0 after normalisation) around a random position.
    """

    def __init__(self, crop: int, scale_range: tuple[float, float] = (0.5, 2.0), pad: str = "black_bottom_right"):
        if pad not in PADS:
            raise ValueError(f"pad {pad!r}: choose one of {', '.join(PADS)}")
        self.crop = crop
        self.scale_range = scale_range
        self.pad = pad
        fill = {tv_tensors.Image: 0 if pad == "black_bottom_right" else MEAN_UINT8, tv_tensors.Mask: IGNORE}
        self.crop_and_flip = v2.Compose(
            [v2.RandomCrop(crop, pad_if_needed=pad == "mean_random", fill=fill), v2.RandomHorizontalFlip()]
        )

    def __call__(self, image: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand(()).item()
        h, w = image.shape[-2:]
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        image = TF.resize(tv_tensors.Image(image), size, antialias=True)
        # NEAREST_EXACT samples pixel centres as bilinear does; NEAREST would shift masks by up to a pixel.
        masks = tuple(
            TF.resize(tv_tensors.Mask(m), size, interpolation=v2.InterpolationMode.NEAREST_EXACT) for m in masks
        )
        if self.pad == "black_bottom_right":
            right, bottom = max(self.crop - size[1], 0), max(self.crop - size[0], 0)
            if right or bottom:
                image = TF.pad(image, [0, 0, right, bottom], fill=0)
                masks = tuple(TF.pad(m, [0, 0, right, bottom], fill=IGNORE) for m in masks)
        out = self.crop_and_flip(image, *masks)
        return tuple(t.as_subclass(torch.Tensor) for t in out)


class StrongView:
    """Photometric perturbations applied on top of a weak view (uint8 image). Defaults are UniMatch's."""

    def __init__(
        self,
        jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_p: float = 0.5,
    ):
        kernel = 2 * math.ceil(3 * blur_sigma[1]) + 1
        self.transform = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p),
                v2.RandomGrayscale(p=grayscale_p),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=blur_sigma)], p=blur_p),
            ]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def cutmix_box(
    size: int,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """A (size, size) bool box covering ``area`` of the crop with aspect ``ratio``; empty with 1 - p.

    As UniMatch draws it: the area once, then the aspect and the top-left corner (anywhere in the crop)
    again until the box fits.
    """
    box = torch.zeros(size, size, dtype=torch.bool)
    if torch.rand(()).item() > p:
        return box
    a = size * size * (area[0] + (area[1] - area[0]) * torch.rand(()).item())
    for _ in range(1000):
        r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(()).item()
        w, h = int(math.sqrt(a / r)), int(math.sqrt(a * r))
        x, y = int(torch.randint(0, size, ())), int(torch.randint(0, size, ()))
        if x + w <= size and y + h <= size:
            box[y : y + h, x : x + w] = True
            return box
    return box
