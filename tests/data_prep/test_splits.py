"""Deterministic, class-aware labeled splits and labeled-id files."""

import pytest

from data_prep.errors import DataError
from data_prep.manifest import prepare
from data_prep.splits import class_aware_draw, labeled_count, make_split, normalise_id, read_labeled_ids
from tests.data_prep.trees import voc_tree


def _rows(n, rare_at):
    rows = []
    for i in range(n):
        hist = [10, 5, 0]
        if i == rare_at:
            hist[2] = 3  # class 2 occurs in one image only
        rows.append({"id": f"im{i:03d}", "class_hist": hist})
    return rows


def test_class_aware_draw_covers_rare_classes_and_is_deterministic():
    rows = _rows(50, rare_at=37)
    for seed in range(5):
        ids = class_aware_draw(rows, 3, seed)
        assert len(ids) == 3 and "im037" in ids
        assert ids == class_aware_draw(rows, 3, seed)
    assert len({tuple(class_aware_draw(rows, 3, s)) for s in range(10)}) > 1


def test_labeled_count_fractions_and_counts():
    assert labeled_count("1/8", 1024) == 128
    assert labeled_count("92", 1464) == 92
    with pytest.raises(DataError, match="neither a fraction"):
        labeled_count("abc", 10)
    with pytest.raises(DataError, match="pool has 10"):
        labeled_count("20", 10)


def test_labeled_ids_file_accepts_community_formats(tmp_path):
    assert normalise_id("JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png") == "2007_000032"
    assert normalise_id("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png x") == "aachen_000000_000019"
    f = tmp_path / "labeled.txt"
    f.write_text("2007_000001\nJPEGImages/2007_000003.jpg SegmentationClass/2007_000003.png\n")
    assert read_labeled_ids(f) == ["2007_000001", "2007_000003"]


def test_split_classic_draws_from_fine_images_and_leaves_the_rest_unlabeled(tmp_path, runs):
    voc_tree(tmp_path / "voc")
    manifest, _, _ = prepare("voc", tmp_path / "voc", runs / "manifests")
    split = make_split(manifest, "2", seed=0, fine_only=True)
    assert len(split.labeled) == 2 and all(i.startswith("2007_") for i in split.labeled)
    assert len(split.unlabeled) == 10 and not set(split.labeled) & set(split.unlabeled)
    assert split == make_split(manifest, "2", seed=0, fine_only=True)


def test_split_from_ids_file_rejects_unknown_ids(tmp_path, runs):
    voc_tree(tmp_path / "voc")
    manifest, _, _ = prepare("voc", tmp_path / "voc", runs / "manifests")
    split = make_split(manifest, "1/8", 0, labeled_ids=["2007_000001", "2008_000002"])
    assert split.labeled == ["2007_000001", "2008_000002"]
    with pytest.raises(DataError, match="'2042_000000', which is not a train image"):
        make_split(manifest, "1/8", 0, labeled_ids=["2007_000001", "2042_000000"])
