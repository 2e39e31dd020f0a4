"""The S4MIM losses (SPEC §3), each a small pure function.

Shapes: B images, K classes, N masked inputs, D feature channels, (H, W) pixels, (h, w) feature cells.
Labels use 255 for void and padding. No function synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from model.masking import IGNORE, MaskedInputs


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_x: cross-entropy of logits (B, K, H, W) against labels (B, H, W), ignoring 255."""
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)


def ohem_loss(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.7, min_kept: int = 200_000):
    """L_x with online hard example mining (UniMatch's Cityscapes recipe): cross-entropy over the labeled
    pixels whose probability of their true class is at most ``threshold``, widened to the ``min_kept``
    hardest labeled pixels of the batch when fewer are that hard (all of them when there are no more).
    Logits (B, K, H, W), labels (B, H, W)."""
    labels = labels.long()
    valid = labels != IGNORE  # (B, H, W)
    with torch.no_grad():
        probs = logits.detach().float().softmax(dim=1)  # (B, K, H, W)
        truth = probs.gather(1, labels.clamp_max(logits.shape[1] - 1).unsqueeze(1)).squeeze(1)  # (B, H, W)
        truth = truth.masked_fill(~valid, 2.0)  # void sorts after every probability
        k = min(min_kept, truth.numel())
        cut = truth.flatten().kthvalue(k).values if k > 0 else truth.new_zeros(())  # k-th hardest pixel
        kept = valid & (truth <= cut.clamp_min(threshold))
    return F.cross_entropy(logits, labels.masked_fill(~kept, IGNORE), ignore_index=IGNORE)


def pseudo_label_loss(
    logits: torch.Tensor,
    pseudo: torch.Tensor,
    confidence: torch.Tensor,
    padding: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """CE against pseudo labels, kept where confidence >= threshold and not padding.

    logits (B, K, H, W); pseudo, confidence, padding (B, H, W). The sum is divided by the number of
    non-padding pixels (UniMatch's normalisation), so unconfident pixels lower the loss, not its scale.
    """
    per_pixel = F.cross_entropy(logits, pseudo.long(), reduction="none")  # (B, H, W)
    keep = (confidence >= threshold) & ~padding
    return (per_pixel * keep).sum() / (~padding).sum().clamp_min(1)


def confident_fraction(confidence: torch.Tensor, padding: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fraction of non-padding pixels whose pseudo label passes the threshold (train/mask_ratio)."""
    keep = (confidence >= threshold) & ~padding
    return keep.sum() / (~padding).sum().clamp_min(1)


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax and confidence of (detached) logits (B, K, H, W) -> labels, confidence (B, H, W)."""
    confidence, labels = logits.detach().float().softmax(dim=1).max(dim=1)
    return labels, confidence


def mix_in_box(own: torch.Tensor, other: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """CutMix: take ``other`` inside ``box`` (B, H, W), ``own`` elsewhere; images or label maps."""
    if own.dim() == box.dim() + 1:
        box = box[:, None]
    return torch.where(box, other, own)


def reconstruction_loss(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    batch: MaskedInputs,
    kind: str = "l1",
) -> torch.Tensor:
    """L_cmim: per-pixel L1 (or L2) over the pixels in the region *and* masked.

    reconstruction (N', 3, H, W) is the masked forward's output, of which pair n reads row
    ``forward_row[n]``; images (B, 3, H, W) are the normalised source images, of which it reads
    ``image_index[n]`` as the target. The error is averaged per (image, class) pair, then over the
    pairs that have such pixels; filler pairs never count.
    """
    diff = reconstruction[batch.forward_row].float() - images[batch.image_index].float()  # (N, 3, H, W)
    err = (diff.abs() if kind == "l1" else diff.square()).mean(dim=1)  # (N, H, W)
    pixels = batch.target_pixels
    count = pixels.sum(dim=(1, 2))  # (N,)
    per_pair = (err * pixels).sum(dim=(1, 2)) / count.clamp_min(1)
    use = (batch.valid & (count > 0)).to(per_pair.dtype)
    return (per_pair * use).sum() / use.sum().clamp_min(1)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bool mask (N, H, W) -> (N, h, w) by majority over each cell."""
    area = F.interpolate(mask[:, None].float(), size=size, mode="area")
    return area[:, 0] >= 0.5


def feature_aggregation_loss(
    features: torch.Tensor,
    batch: MaskedInputs,
    stop_grad: bool = True,
) -> torch.Tensor:
    """L_fa: mean over pairs of the mean over masked cells p in c of 1 - cos(F(p), v_c).

    features (N', D, h, w) from the masked forward pass, of which pair n reads row ``forward_row[n]``:
    its own class-isolated input, or its source image when the forward ran once per image. v_c, the
    visible prototype, is the mean feature over the visible cells of c. Pairs with no masked or no
    visible cell are skipped.
    """
    feats = features[batch.forward_row].float()  # (N, D, h, w)
    size = feats.shape[-2:]
    region = downsample_mask(batch.region, size)
    masked = downsample_mask(batch.masked, size)
    visible, hidden = region & ~masked, region & masked  # (N, h, w)
    n_visible = visible.sum(dim=(1, 2))
    n_hidden = hidden.sum(dim=(1, 2))
    visible_prototype = (feats * visible[:, None]).sum(dim=(2, 3)) / n_visible.clamp_min(1)[:, None]
    if stop_grad:
        visible_prototype = visible_prototype.detach()
    cos = F.cosine_similarity(feats, visible_prototype[:, :, None, None], dim=1)  # (N, h, w)
    per_pair = ((1 - cos) * hidden).sum(dim=(1, 2)) / n_hidden.clamp_min(1)
    use = (batch.valid & (n_visible > 0) & (n_hidden > 0)).to(per_pair.dtype)
    return (per_pair * use).sum() / use.sum().clamp_min(1)


def loss_coefficients(terms: Mapping[str, object], weights: Mapping[str, float]) -> dict[str, float]:
    """Each computed term's coefficient in the total loss L (SPEC §3.5).

    ``terms`` holds the computed losses by name (``x``, ``s1``, ``s2``, ``fp``, ``cmim``, ``fa``,
    ``smim``); a missing term is switched off. With only ``x`` the total is L_x (supervised);
    otherwise L_base = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, and the S4MIM terms add with
    their weights λ.
    """
    if any(name in terms for name in ("s1", "s2", "fp")):
        base = {"x": 1.0, "s1": 0.25, "s2": 0.25, "fp": 0.5}
        out = {name: w / 2 for name, w in base.items() if name in terms}
    else:
        out = {"x": 1.0}
    return out | {name: weights[name] for name in ("cmim", "fa", "smim") if name in terms}


def total_loss(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """L = L_base + λ_cmim L_cmim + λ_fa L_fa + λ_smim L_smim: the terms with their coefficients."""
    coefficients = loss_coefficients(terms, weights)
    return sum(coefficients[name] * terms[name] for name in coefficients)
