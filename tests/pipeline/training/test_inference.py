"""Inference on a plain module: sliding windows and centre crops cover the image."""

import pytest
import torch

from pipeline.training.inference import center_crop, sliding_window


class _PixelModel(torch.nn.Module):
    """Per-pixel classifier (1x1 conv): its output does not depend on the window."""

    def __init__(self, classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, classes, 1)

    def forward(self, x):
        from model.deeplab import SegOutput

        return SegOutput(logits=self.conv(x))


@pytest.mark.parametrize("classes", [3, 30])
def test_sliding_window_covers_the_image_for_any_class_count(classes):
    torch.manual_seed(0)
    model = _PixelModel(classes)
    image = torch.randn(2, 3, 37, 53)
    scores = sliding_window(model, image, classes, window=16, stride=2 / 3)
    assert scores.shape == (2, classes, 37, 53)
    assert torch.allclose(scores.sum(1), torch.ones(2, 37, 53), atol=1e-5)  # averaged softmax everywhere
    assert torch.equal(scores.argmax(1), model(image).logits.argmax(1))
    whole = sliding_window(model, image, classes, window=64, stride=2 / 3)  # window larger than image
    assert torch.allclose(whole, model(image).logits.softmax(1), atol=1e-6)


def test_center_crop_pads_small_images():
    image, label = torch.ones(1, 3, 10, 30), torch.zeros(1, 10, 30, dtype=torch.long)
    img, lab = center_crop(image, label, 20)
    assert img.shape == (1, 3, 20, 20) and lab.shape == (1, 20, 20)
    assert (lab == 255).sum() == 20 * 10 and img[0, 0, 0, 0] == 0
