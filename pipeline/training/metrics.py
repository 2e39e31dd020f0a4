"""Segmentation metrics as pure functions: the statistics first (a confusion matrix, which sums
across batches and ranks), then the reductions (IoU per class, mIoU over the dataset)."""

from __future__ import annotations

import math

import torch

from model.masking import IGNORE


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts of (ground truth, prediction) over pixels whose target is not 255."""
    valid = target != IGNORE
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of each class; NaN for a class that is neither in the ground truth nor predicted."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(confusion: torch.Tensor) -> float:
    """Dataset-level mIoU in percent, over the classes that occur (in truth or prediction)."""
    return float(iou_per_class(confusion).nanmean()) * 100
