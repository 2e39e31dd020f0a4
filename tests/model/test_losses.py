"""Each S4MIM loss on tensors small enough to check by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import (
    confident_fraction,
    feature_aggregation_loss,
    mix_in_box,
    ohem_loss,
    pseudo_label_loss,
    pseudo_labels,
    reconstruction_loss,
    supervised_loss,
    total_loss,
)
from model.masking import (
    MaskedInputs,
    class_isolated_inputs,
    patch_mask,
    plain_masked_inputs,
    sample_classes,
    unscored_pixels,
)


def _logits_for(labels: torch.Tensor, num_classes: int, margin: float) -> torch.Tensor:
    """Logits (B, K, H, W) with ``margin`` on the given class and 0 elsewhere."""
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * margin


def test_supervised_loss_ignores_void():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0, 0, 0] = math.log(3.0)  # p(class 0) = 3/4 at pixel 0
    labels = torch.tensor([[[0, 255]]])
    assert supervised_loss(logits, labels).item() == pytest.approx(-math.log(0.75))


def test_ohem_keeps_the_hard_pixels_or_the_min_kept_hardest():
    # 4 labeled pixels (class 0) with p(true class) = 0.9, 0.6, 0.3, 0.8 and one void pixel.
    p = torch.tensor([0.9, 0.6, 0.3, 0.8, 0.5])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, 5)
    labels = torch.tensor([[[0, 0, 0, 0, 255]]])
    ce = -p.log()
    # threshold 0.7: pixels with p <= 0.7 are hard (0.6 and 0.3); min_kept 1 adds nothing.
    assert ohem_loss(logits, labels, 0.7, 1).item() == pytest.approx(((ce[1] + ce[2]) / 2).item(), rel=1e-5)
    # min_kept 3: the 3 hardest (0.3, 0.6, 0.8) even though 0.8 is above the threshold.
    assert ohem_loss(logits, labels, 0.7, 3).item() == pytest.approx(((ce[1] + ce[2] + ce[3]) / 3).item(), rel=1e-5)
    # min_kept at or above the labeled count: every labeled pixel, the plain loss; void never counts.
    assert ohem_loss(logits, labels, 0.7, 4).item() == pytest.approx(supervised_loss(logits, labels).item())
    assert ohem_loss(logits, labels, 0.7, 10).item() == pytest.approx(supervised_loss(logits, labels).item())


def test_pseudo_label_loss_masks_unconfident_and_divides_by_non_padding():
    # 4 pixels, 2 classes, uniform logits: CE = log 2 at every pixel.
    logits = torch.zeros(1, 2, 1, 4)
    pseudo = torch.zeros(1, 1, 4, dtype=torch.long)
    confidence = torch.tensor([[[0.99, 0.99, 0.5, 0.99]]])
    padding = torch.tensor([[[False, False, False, True]]])
    # kept: pixels 0 and 1 (pixel 2 unconfident, pixel 3 padding); divided by 3 non-padding pixels.
    expected = 2 * math.log(2) / 3
    assert pseudo_label_loss(logits, pseudo, confidence, padding, 0.95).item() == pytest.approx(expected)
    assert confident_fraction(confidence, padding, 0.95).item() == pytest.approx(2 / 3)


def test_pseudo_labels_and_cutmix_mixing():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # (1, 2, 1, 1)
    label, conf = pseudo_labels(logits)
    assert label.item() == 0 and conf.item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    own, other = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    box = torch.tensor([[[True, False], [False, False]]])
    assert mix_in_box(own, other, box).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    images = mix_in_box(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2), box)
    assert images[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0] and images[0, :, 1, 1].sum() == 0


def test_patch_mask_masks_exact_patch_count():
    mask = patch_mask(3, 16, 16, 4, 0.25, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 16, 16)
    cells = mask.view(3, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(3, 16, 16)  # (B, cell, pixels)
    # Every 4x4 cell is either fully masked or fully visible, and 4 of 16 cells are masked.
    assert torch.all(cells.all(-1) | ~cells.any(-1))
    assert cells.all(-1).sum(1).tolist() == [4, 4, 4]


def test_sample_classes_only_picks_classes_with_enough_pixels():
    class_map = torch.tensor([[[0, 0, 1, 255], [0, 0, 1, 2]]])  # class 0: 4 px, 1: 2 px, 2: 1 px
    ids, valid = sample_classes(class_map, 3, max_classes=3, min_pixels=2, generator=torch.Generator().manual_seed(1))
    picked = set(ids[valid].tolist())
    assert picked == {0, 1} and valid.sum().item() == 2


def test_cmim_reconstruction_of_class_c_sees_no_pixel_of_another_class():
    """Gradient check through a network: the loss of pair (image, c) depends on no pixel outside c."""
    torch.manual_seed(0)
    images = torch.randn(1, 3, 8, 8, requires_grad=True)
    class_map = torch.zeros(1, 8, 8, dtype=torch.long)
    class_map[:, :, 4:] = 1  # left half class 0, right half class 1
    masked = torch.zeros(1, 8, 8, dtype=torch.bool)
    masked[:, 0:4, :] = True  # top half masked
    ids, valid = torch.tensor([[0, 1]]), torch.tensor([[True, True]])
    batch = class_isolated_inputs(images, class_map, masked, ids, valid)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    recon = net(batch.inputs)
    only_class_0 = MaskedInputs(
        batch.inputs[:1], batch.image_index[:1], batch.forward_row[:1], batch.region[:1], batch.masked[:1],
        batch.valid[:1],
    )  # fmt: skip
    loss = reconstruction_loss(recon, images, only_class_0)
    (grad,) = torch.autograd.grad(loss, images)
    seen = grad.abs().sum(1)[0] > 0
    # The input pixels the loss depends on: visible class-0 pixels (through the network) and the
    # masked class-0 pixels (as the target). Nothing of class 1.
    assert not seen[:, 4:].any()
    assert seen[:, :4].any()
    # And the class-isolated input itself holds nothing outside visible class-0 pixels.
    outside = ~((class_map[0] == 0) & ~masked[0])
    assert torch.all(batch.inputs[0][:, outside] == 0)


def test_reconstruction_loss_by_hand():
    # One pair, a 2x2 image; region = all, masked = top row. Errors (mean over 3 channels): 1 and 3.
    target = torch.zeros(1, 3, 2, 2)
    pred = torch.zeros(1, 3, 2, 2)
    pred[0, :, 0, 0] = 1.0
    pred[0, :, 0, 1] = -3.0
    pred[0, :, 1, :] = 100.0  # visible pixels never count
    batch = MaskedInputs(
        inputs=torch.zeros(1, 3, 2, 2),
        image_index=torch.tensor([0]),
        forward_row=torch.tensor([0]),
        region=torch.ones(1, 2, 2, dtype=torch.bool),
        masked=torch.tensor([[[True, True], [False, False]]]),
        valid=torch.tensor([True]),
    )
    assert reconstruction_loss(pred, target, batch, "l1").item() == pytest.approx(2.0)
    assert reconstruction_loss(pred, target, batch, "l2").item() == pytest.approx(5.0)
    # A filler pair (valid False) with a huge error does not count.
    two = MaskedInputs(
        torch.zeros(2, 3, 2, 2),
        torch.tensor([0, 0]),
        torch.tensor([0, 1]),
        batch.region.repeat(2, 1, 1),
        batch.masked.repeat(2, 1, 1),
        torch.tensor([True, False]),
    )
    preds = torch.cat([pred, torch.full_like(pred, 1e6)])
    assert reconstruction_loss(preds, target, two, "l1").item() == pytest.approx(2.0)


def _fa_batch(region, masked, valid=True):
    return MaskedInputs(
        inputs=torch.zeros(1, 3, *region.shape),
        image_index=torch.tensor([0]),
        forward_row=torch.tensor([0]),
        region=region[None],
        masked=masked[None],
        valid=torch.tensor([valid]),
    )


def test_feature_aggregation_is_zero_when_features_agree():
    features = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    region = torch.ones(4, 4, dtype=torch.bool)
    masked = torch.zeros(4, 4, dtype=torch.bool)
    masked[:2] = True
    loss = feature_aggregation_loss(features, _fa_batch(region, masked))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_feature_aggregation_by_hand():
    # Visible cells point along e0, masked cells along e1: cos = 0, loss 1. One masked cell along
    # -e0 (cos -1, loss 2) in a pair with 2 masked cells gives (1 + 2) / 2.
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0, 1, :] = 1.0  # bottom row visible, along e0
    features[0, 1, 0, 0] = 1.0  # masked, along e1
    features[0, 0, 0, 1] = -1.0  # masked, along -e0
    region = torch.ones(2, 2, dtype=torch.bool)
    masked = torch.tensor([[True, True], [False, False]])
    assert feature_aggregation_loss(features, _fa_batch(region, masked)).item() == pytest.approx(1.5)
    # No visible cell: the pair is skipped.
    assert feature_aggregation_loss(features, _fa_batch(region, torch.ones(2, 2, dtype=torch.bool))).item() == 0.0


def _two_images_two_classes():
    """B = 2 images with K = 2 classes each, every pair with masked and visible pixels: class maps of
    vertical stripes (image 0: classes 0 | 1, image 1: classes 2 | 1 | 0), the top half masked."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    class_map = torch.zeros(2, 8, 8, dtype=torch.long)
    class_map[0, :, 4:] = 1
    class_map[1, :, :3], class_map[1, :, 3:6] = 2, 1
    masked = torch.zeros(2, 8, 8, dtype=torch.bool)
    masked[:, :4] = True
    ids, valid = torch.tensor([[0, 1], [2, 0]]), torch.ones(2, 2, dtype=torch.bool)
    return images, class_map, masked, ids, valid


def _fa_of_one_pair(feature_map, region, masked):
    """L_fa of one pair, at the input's resolution (no downsampling): the mean over its masked cells of
    1 - cos(F(p), mean of F over its visible cells)."""
    prototype = feature_map[:, region & ~masked].mean(dim=1)  # (D,)
    hidden = feature_map[:, region & masked]  # (D, cells)
    return (1 - F.cosine_similarity(hidden, prototype[:, None], dim=0)).mean()


def _net(out_channels):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(6, out_channels, 1)
    )


def test_each_pair_of_the_class_isolated_forward_reads_its_own_row():
    """B = K = 2: pair n's FA and reconstruction losses are computed from row n of the forward (its own
    class-isolated input), and every input gets a gradient."""
    images, class_map, masked, ids, valid = _two_images_two_classes()
    batch = class_isolated_inputs(images, class_map, masked, ids, valid)
    inputs = batch.inputs.clone().requires_grad_()
    features, reconstruction = _net(4)(inputs), _net(3)(inputs)  # (N, D, 8, 8), (N, 3, 8, 8)
    pairs = range(batch.valid.shape[0])
    fa = torch.stack([_fa_of_one_pair(features[n], batch.region[n], batch.masked[n]) for n in pairs]).mean()
    recon = torch.stack(
        [
            (reconstruction[n] - images[batch.image_index[n]]).abs().mean(dim=0)[batch.target_pixels[n]].mean()
            for n in pairs
        ]
    ).mean()
    for loss, by_hand in (
        (lambda: feature_aggregation_loss(features, batch), fa),
        (lambda: reconstruction_loss(reconstruction, images, batch), recon),
    ):
        torch.testing.assert_close(loss(), by_hand)
        (grad,) = torch.autograd.grad(loss(), inputs)
        assert (grad.abs().sum(dim=(1, 2, 3)) > 0).tolist() == [True] * len(pairs)


def test_pairs_of_the_whole_image_forward_read_their_source_images_row():
    """mim.input=whole: the forward runs once per image, and pair (b, c) reads row b of it."""
    images, class_map, masked, ids, valid = _two_images_two_classes()
    whole, batch = plain_masked_inputs(images, masked, torch.zeros_like(masked), class_map, ids, valid)
    inputs = whole.inputs.clone().requires_grad_()
    features, reconstruction = _net(4)(inputs), _net(3)(inputs)  # (B, D, 8, 8), (B, 3, 8, 8)
    pairs = range(batch.valid.shape[0])
    source = batch.image_index.tolist()
    assert source == [0, 0, 1, 1]
    fa = torch.stack([_fa_of_one_pair(features[source[n]], batch.region[n], batch.masked[n]) for n in pairs]).mean()
    recon = torch.stack(
        [(reconstruction[b] - images[b]).abs().mean(dim=0)[batch.target_pixels[n]].mean() for n, b in enumerate(source)]
    ).mean()
    torch.testing.assert_close(feature_aggregation_loss(features, batch), fa)
    torch.testing.assert_close(reconstruction_loss(reconstruction, images, batch), recon)


def test_plain_masked_inputs_reconstruct_every_masked_non_padding_pixel():
    images = torch.ones(1, 3, 2, 2)
    masked = torch.tensor([[[True, False], [True, False]]])
    padding = torch.tensor([[[False, False], [True, False]]])
    whole, pairs = plain_masked_inputs(images, masked, padding)
    assert pairs is None
    assert whole.inputs[0, 0].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert whole.target_pixels[0].tolist() == [[True, False], [False, False]]


def test_total_loss_per_variant():
    t = {name: torch.tensor(v) for name, v in dict(x=1.0, s1=2.0, s2=4.0, fp=8.0, cmim=3.0, fa=5.0, smim=7.0).items()}
    w = {"cmim": 1.0, "fa": 0.1, "smim": 0.5}
    assert total_loss({"x": t["x"]}, w).item() == pytest.approx(1.0)
    base = (1.0 + 0.25 * 2 + 0.25 * 4 + 0.5 * 8) / 2
    unimatch = {k: t[k] for k in ("x", "s1", "s2", "fp")}
    assert total_loss(unimatch, w).item() == pytest.approx(base)
    assert total_loss(t, w).item() == pytest.approx(base + 3.0 + 0.5 + 3.5)
    without_fa = {k: v for k, v in t.items() if k != "fa"}
    assert total_loss(without_fa, w).item() == pytest.approx(base + 3.0 + 3.5)


def test_extra_terms_add_to_a_supervised_base():
    from model.losses import loss_coefficients

    t = {"x": torch.tensor(1.0), "cmim": torch.tensor(3.0)}
    assert loss_coefficients(t, {"cmim": 1.0, "fa": 0.1, "smim": 0.5}) == {"x": 1.0, "cmim": 1.0}
    assert total_loss(t, {"cmim": 1.0, "fa": 0.1, "smim": 0.5}).item() == pytest.approx(4.0)


def test_unscored_pixels_leave_out_the_padding_and_the_side_of_the_mask_not_scored():
    padding = torch.tensor([[[True, False], [False, False]]])
    masked = torch.tensor([[[False, True], [True, False]]])
    assert unscored_pixels(padding, masked, "all").tolist() == [[[True, False], [False, False]]]
    assert unscored_pixels(padding, masked, "visible").tolist() == [[[True, True], [True, False]]]
    assert unscored_pixels(padding, masked, "masked").tolist() == [[[True, False], [False, True]]]
    with pytest.raises(ValueError, match="all, visible or masked"):
        unscored_pixels(padding, masked, "some")


def test_a_pseudo_label_loss_on_the_visible_pixels_averages_over_them_alone():
    """pseudo_label_loss with unscored_pixels(..., "visible") as padding: the mean cross-entropy over the
    visible, unpadded pixels whose confidence passes the threshold, divided by the visible unpadded count."""
    torch.manual_seed(0)
    logits, pseudo = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    confidence = torch.rand(2, 4, 4)
    padding = torch.zeros(2, 4, 4, dtype=torch.bool)
    padding[:, 3] = True
    masked = patch_mask(2, 4, 4, 2, 0.5, generator=torch.Generator().manual_seed(1))
    loss = pseudo_label_loss(logits, pseudo, confidence, unscored_pixels(padding, masked, "visible"), 0.5)
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    visible = ~padding & ~masked
    by_hand = (ce * (visible & (confidence >= 0.5))).sum() / visible.sum()
    torch.testing.assert_close(loss, by_hand)
