"""The views of SPEC §3.1: alignment of image and mask, padding that never counts, seeding."""

import torch

from data_prep.augment import MEAN_UINT8, WeakView, cutmix_box, normalize
from data_prep.datasets import LabeledDataset, ShardedSampler, UnlabeledDataset


def test_weak_view_keeps_image_and_mask_aligned_and_marks_padding():
    # The image's red channel encodes the class, so any misalignment shows up as a mismatch.
    label = torch.zeros(1, 20, 30, dtype=torch.uint8)
    label[:, 5:15, 10:25] = 3
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[0] = label[0] * 60
    view = WeakView(crop=48, scale_range=(0.5, 2.0), pad="mean_random")
    for seed in range(20):
        torch.manual_seed(seed)
        img, lab, pad = view(image, label, torch.zeros_like(label))
        assert img.shape == (3, 48, 48) and lab.shape == (1, 48, 48)
        padded = pad[0] == 255
        assert torch.equal(padded, lab[0] == 255)  # padding is void in the label too
        inside = ~padded
        # Edges blur under bilinear resizing; a flip or crop applied to one side only would
        # disagree on a large part of the object.
        agree = ((img[0][inside] > 90) == (lab[0][inside] == 3)).float().mean()
        assert agree > 0.95
        assert torch.all(img[:, padded].T == torch.tensor(MEAN_UINT8, dtype=torch.uint8))
    assert normalize(torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1)).abs().max() < 0.01


def test_default_padding_is_black_on_the_right_and_bottom():
    # UniMatch pads a small image with black on the right and bottom, then crops at random: the
    # padding is a band along the bottom and right edges of the image, never above or left of it.
    label = torch.ones(1, 20, 30, dtype=torch.uint8)
    image = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    view = WeakView(crop=48, scale_range=(1.0, 1.0))
    flipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        img, lab, pad = view(image, label, torch.zeros_like(label))
        padded = pad[0] == 255
        assert torch.equal(padded, lab[0] == 255)
        assert torch.all(img[:, padded] == 0)  # black
        # Padded to 48 x 48 with the image in the top-left corner, so the crop is the whole of it.
        assert padded[20:].all()  # the bottom band
        image_on_left = not padded[:20, :30].any() and padded[:20, 30:].all()
        image_on_right = not padded[:20, 18:].any() and padded[:20, :18].all()  # flipped
        assert image_on_left != image_on_right
        flipped += image_on_right
    assert 0 < flipped < 20  # the horizontal flip takes the right band to the left half of the time


def test_cutmix_box_area_and_probability():
    torch.manual_seed(0)
    boxes = [cutmix_box(32, p=0.5) for _ in range(200)]
    empty = sum(not b.any() for b in boxes)
    assert 60 < empty < 140
    areas = [b.float().mean().item() for b in boxes if b.any()]
    assert max(areas) <= 0.4 + 1e-6 and min(areas) > 0


def test_datasets_are_seeded_per_key(tiny_shapes):
    from data_prep.manifest import prepare

    manifest, _, _ = prepare("shapes", tiny_shapes, tiny_shapes.parent / "manifests")
    rows = [r for r in manifest.rows("train")]
    labeled = LabeledDataset(rows, crop=32)
    a, b, c = labeled[(0, 11)], labeled[(0, 11)], labeled[(0, 12)]
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    unlabeled = UnlabeledDataset([{**r, "mask": None} for r in rows], crop=32)
    u = unlabeled[(1, 5)]
    assert set(u) == {"weak", "strong1", "strong2", "padding", "box1", "box2"}
    assert u["weak"].shape == u["strong1"].shape == (3, 32, 32) and u["padding"].dtype == torch.bool


def test_a_sample_seeds_the_cpu_generator_alone_and_leaves_the_callers_stream(tiny_shapes, monkeypatch):
    """Samples draw from the CPU generator seeded by their key; the accelerators' generators are not touched
    (torch.manual_seed would seed them too, at about 1 ms a sample on a CUDA build), nor is the caller's
    stream of random numbers."""
    from data_prep.manifest import prepare

    manifest, _, _ = prepare("shapes", tiny_shapes, tiny_shapes.parent / "manifests")
    rows = [r for r in manifest.rows("train")]
    expected = LabeledDataset(rows, crop=32)[(0, 11)]

    def refuse(seed):
        raise AssertionError("a sample called torch.manual_seed")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    torch.random.default_generator.manual_seed(5)
    before = torch.rand(4)
    torch.random.default_generator.manual_seed(5)
    sample = LabeledDataset(rows, crop=32)[(0, 11)]
    UnlabeledDataset([{**r, "mask": None} for r in rows], crop=32)[(1, 5)]
    assert torch.equal(torch.rand(4), before)  # the caller's stream goes on as if no sample had been drawn
    assert torch.equal(sample["image"], expected["image"]) and torch.equal(sample["label"], expected["label"])


def test_unlabeled_truth_is_the_weak_views_mask_and_changes_no_view(tiny_shapes):
    from data_prep.manifest import prepare

    manifest, _, _ = prepare("shapes", tiny_shapes, tiny_shapes.parent / "manifests")
    rows = [r for r in manifest.rows("train")]
    plain = UnlabeledDataset(rows, crop=48, scale_range=(0.5, 0.8))  # small rescales: padding in most views
    measured = UnlabeledDataset(rows, crop=48, scale_range=(0.5, 0.8), truth=True)
    labeled = LabeledDataset(rows, crop=48, scale_range=(0.5, 0.8))
    for key in [(0, 3), (1, 7), (2, 11)]:
        a, b = plain[key], measured[key]
        assert set(b) - set(a) == {"truth"}
        for name in a:  # the views, padding and boxes do not depend on reading the mask
            assert torch.equal(a[name], b[name]), name
        # The same key gives the labeled dataset's weak view: its label is the truth of the unlabeled view.
        assert torch.equal(labeled[key]["label"], b["truth"])
        assert (b["truth"][b["padding"]] == 255).all()


def test_sharded_sampler_splits_ranks_and_reshuffles_each_epoch():
    full = ShardedSampler(10, 6, rank=0, world=1, seed=1)
    full.set_epoch(2)
    keys = list(full)
    ranks = []
    for rank in range(2):
        s = ShardedSampler(10, 3, rank=rank, world=2, seed=1)
        s.set_epoch(2)
        ranks.append(list(s))
    assert sorted(ranks[0] + ranks[1]) == sorted(keys)
    full.set_epoch(3)
    assert list(full) != keys
    repeated = ShardedSampler(3, 8, seed=0)  # a small labeled set repeats within an epoch
    idx = [i for i, _ in repeated]
    assert len(idx) == 8 and set(idx) == {0, 1, 2}
