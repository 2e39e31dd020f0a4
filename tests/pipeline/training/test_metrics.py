"""The metrics: a confusion matrix, then IoU per class and a dataset-level mIoU."""

import pytest
import torch

from pipeline.training.metrics import confusion_matrix, iou_per_class, mean_iou


def test_confusion_matrix_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 7, 9), generator=gen)
    target = torch.randint(0, 5, (3, 7, 9), generator=gen)
    target[0, :2] = 255
    expected = torch.zeros(5, 5, dtype=torch.long)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    got = confusion_matrix(pred, target, 5)
    assert torch.equal(got, expected)
    ious = iou_per_class(got)
    for c in range(5):
        tp = expected[c, c].item()
        union = expected[c].sum().item() + expected[:, c].sum().item() - tp
        assert ious[c].item() == pytest.approx(tp / union)
    assert mean_iou(got) == pytest.approx(float(ious.mean()) * 100)


def test_miou_is_dataset_level_and_skips_absent_classes():
    # Class 2 never occurs and is never predicted: it does not drag the mean down.
    confusion = torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    assert mean_iou(confusion) == pytest.approx((3 / 4 + 4 / 5) / 2 * 100)
