"""Patch masks and the class-isolated inputs of class-wise masked image modeling (SPEC §3.2).

All functions are batched tensor code: no Python loop over images, pixels or classes, and no
host-device synchronisation, so a step that calls them stays asynchronous on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE = 255


def patch_mask(
    batch: int,
    height: int,
    width: int,
    patch: int,
    ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random square patches of side ``patch`` covering a fraction ``ratio`` of the patch grid.

    Returns a bool mask (B, H, W), True where masked. Each image masks exactly
    ``round(ratio * patches)`` patches; patches on the right and bottom edge may be cut by the image.
    """
    grid_h, grid_w = math.ceil(height / patch), math.ceil(width / patch)
    cells = grid_h * grid_w
    masked_cells = round(ratio * cells)
    scores = torch.rand(batch, cells, device=device, generator=generator)
    chosen = scores.argsort(dim=1)[:, :masked_cells]  # (B, masked_cells)
    grid = torch.zeros(batch, cells, dtype=torch.bool, device=device)
    grid.scatter_(1, chosen, True)
    grid = grid.view(batch, grid_h, grid_w)
    full = grid.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return full[:, :height, :width]


def sample_classes(
    class_map: torch.Tensor,
    num_classes: int,
    max_classes: int,
    min_pixels: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``max_classes`` classes per image, uniformly among those with ``min_pixels`` pixels.

    ``class_map`` is (B, H, W) with class indices and ``IGNORE`` for unassigned pixels.
    Returns ``class_ids`` (B, K) and ``valid`` (B, K); K = min(max_classes, num_classes). A slot is
    invalid when the image has fewer eligible classes than K: the batch keeps a fixed shape.
    """
    b = class_map.shape[0]
    flat = class_map.reshape(b, -1).long().clamp(max=num_classes)  # IGNORE -> overflow bin
    counts = torch.zeros(b, num_classes + 1, device=class_map.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
    eligible = counts[:, :num_classes] >= min_pixels  # (B, C)
    scores = torch.rand(b, num_classes, device=class_map.device, generator=generator)
    scores = scores.masked_fill(~eligible, -1.0)
    top_scores, class_ids = scores.topk(min(max_classes, num_classes), dim=1)  # (B, K)
    return class_ids, top_scores >= 0


@dataclass
class MaskedInputs:
    """N scored pairs of a masked forward pass, and what their reconstruction and feature losses need.

    Two indices tie a pair to its tensors, and they differ when the forward runs once per image:
    ``forward_row`` is the row of the masked forward that holds the pair's output (reconstruction,
    features); ``image_index`` is the source image, whose original pixels are the target.
    """

    inputs: torch.Tensor  # (N', 3, H, W) the masked forward's input, fill 0 outside the kept pixels
    image_index: torch.Tensor  # (N,) the source image of each pair, in 0..B-1
    forward_row: torch.Tensor  # (N,) the row of the masked forward that holds each pair's output, in 0..N'-1
    region: torch.Tensor  # (N, H, W) bool: the pixels the pair is about (class c, or the whole image)
    masked: torch.Tensor  # (N, H, W) bool: the patch mask of the source image
    valid: torch.Tensor  # (N,) bool: False for filler slots that must not count

    @property
    def target_pixels(self) -> torch.Tensor:
        """Pixels whose reconstruction is scored: in the region *and* masked."""
        return self.region & self.masked


def class_isolated_inputs(
    images: torch.Tensor,
    class_map: torch.Tensor,
    masked: torch.Tensor,
    class_ids: torch.Tensor,
    valid: torch.Tensor,
) -> MaskedInputs:
    """x_c = x * 1[class = c] * (1 - M) for every chosen (image, class) pair, as one batch.

    images (B, 3, H, W) normalised, so 0 is the fill (mean colour); class_map (B, H, W);
    masked (B, H, W) bool; class_ids and valid (B, K). Returns N = B*K inputs, image-major: the
    forward runs once per pair, so pair n's output is row n of it.
    """
    b, k = class_ids.shape
    region = (class_map[:, None] == class_ids[:, :, None, None]) & valid[:, :, None, None]  # (B,K,H,W)
    keep = region & ~masked[:, None]
    inputs = images[:, None] * keep[:, :, None].to(images.dtype)  # (B, K, 3, H, W)
    h, w = class_map.shape[-2:]
    return MaskedInputs(
        inputs=inputs.reshape(b * k, *images.shape[1:]),
        image_index=torch.arange(b, device=images.device).repeat_interleave(k),
        forward_row=torch.arange(b * k, device=images.device),
        region=region.reshape(b * k, h, w),
        masked=masked[:, None].expand(b, k, h, w).reshape(b * k, h, w),
        valid=valid.reshape(b * k),
    )


def plain_masked_inputs(
    images: torch.Tensor,
    masked: torch.Tensor,
    padding: torch.Tensor,
    class_map: torch.Tensor | None = None,
    class_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[MaskedInputs, MaskedInputs | None]:
    """Basic (SimMIM-style) MIM: mask the whole image, reconstruct every masked non-padding pixel.

    Returns the whole-image inputs and, when class ids are given, the (image, class) pairs scored
    on the same forward pass: it runs once per image, so a pair's output is its source image's row.
    """
    b = images.shape[0]
    rows = torch.arange(b, device=images.device)
    whole = MaskedInputs(
        inputs=images * (~masked)[:, None].to(images.dtype),
        image_index=rows,
        forward_row=rows,
        region=~padding,
        masked=masked,
        valid=torch.ones(b, dtype=torch.bool, device=images.device),
    )
    if class_ids is None:
        return whole, None
    k = class_ids.shape[1]
    h, w = masked.shape[-2:]
    region = (class_map[:, None] == class_ids[:, :, None, None]) & valid[:, :, None, None]
    pairs = MaskedInputs(
        inputs=whole.inputs,
        image_index=rows.repeat_interleave(k),
        forward_row=rows.repeat_interleave(k),
        region=region.reshape(b * k, h, w),
        masked=masked[:, None].expand(b, k, h, w).reshape(b * k, h, w),
        valid=valid.reshape(b * k),
    )
    return whole, pairs


def unscored_pixels(padding: torch.Tensor, masked: torch.Tensor, pixels: str) -> torch.Tensor:
    """The pixels a masked view's loss leaves out, as a padding mask (B, H, W): the padding, plus the masked
    pixels (``pixels="visible"``) or the visible ones (``"masked"``); ``"all"`` leaves out the padding only."""
    if pixels == "all":
        return padding
    if pixels == "visible":
        return padding | masked
    if pixels == "masked":
        return padding | ~masked
    raise ValueError(f"pixels must be all, visible or masked, not {pixels!r}")


def apply_patch_mask(images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Fill the masked pixels of normalised images (B, 3, H, W) with 0, the mean colour."""
    return images * (~masked)[:, None].to(images.dtype)
