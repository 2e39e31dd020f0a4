"""The voc, cityscapes, custom and shapes readers on small trees in the real layouts."""

import pytest
import torch

from data_prep import shapes
from data_prep.decode import read_mask
from data_prep.errors import DataError
from data_prep.manifest import Manifest, prepare
from data_prep.readers import CITYSCAPES_CLASSES, VOC_CLASSES, read_dataset
from tests.data_prep.trees import cityscapes_tree, custom_tree, damage_voc_sample, voc_tree


def test_voc_reader_classic_and_blended_sets(tmp_path):
    root = voc_tree(tmp_path / "VOCdevkit" / "VOC2012")
    index = read_dataset("voc", tmp_path)  # finds VOCdevkit/VOC2012 under the given root
    train = [s for s in index.samples if s.split == "train"]
    val = [s for s in index.samples if s.split == "val"]
    assert index.classes == VOC_CLASSES and len(val) == 3
    assert len(train) == 12 and sum(s.fine for s in train) == 6  # blended: fine + SegmentationClassAug
    fine = next(s for s in train if s.fine)
    extra = next(s for s in train if not s.fine)
    assert "SegmentationClass/" in fine.mask and "SegmentationClassAug" in extra.mask
    mask = read_mask(fine.mask)  # palette PNG -> class indices, not colours
    assert set(torch.unique(mask).tolist()) == {0, 1, 255}
    assert index.root == root


def test_voc_manifest_histograms_skip_void(tmp_path, runs):
    voc_tree(tmp_path / "voc")
    manifest, bad, reused = prepare("voc", tmp_path / "voc", runs / "manifests")
    assert not bad and not reused
    rows = {r["id"]: r for r in manifest.rows()}
    row = rows["2007_000001"]
    h, w = row["height"], row["width"]
    assert len(row["class_hist"]) == 21
    assert sum(row["class_hist"]) == h * w - w  # the boundary row is void
    assert row["class_hist"][2] == (h // 2) * (w // 2)  # rows above the void row
    again, _, reused = prepare("voc", tmp_path / "voc", runs / "manifests")
    assert reused and again.content_hash == manifest.content_hash
    on_disk = Manifest.read(manifest.path)
    assert on_disk.table.column_names[:7] == ["id", "image", "mask", "height", "width", "class_hist", "split"]


def test_cityscapes_reader_maps_ids_to_train_ids(tmp_path, runs):
    cityscapes_tree(tmp_path / "cs")
    manifest, _, _ = prepare("cityscapes", tmp_path / "cs", runs / "manifests")
    assert manifest.classes == CITYSCAPES_CLASSES
    assert len(manifest.rows("train")) == 4 and len(manifest.rows("val")) == 2
    row = manifest.rows("train")[0]
    hist = row["class_hist"]
    # road (id 7) -> train id 0, car (id 26) -> 13, ego vehicle (id 1) -> ignored
    assert hist[0] == 15 * 16 and hist[13] == 15 * 16 and sum(hist) == 15 * 32
    lut = torch.tensor(manifest.label_lut, dtype=torch.uint8)
    mask = read_mask(row["mask"], lut)
    assert set(torch.unique(mask).tolist()) == {0, 13, 255}


def test_custom_reader_images_without_mask_are_unlabeled(tmp_path, runs):
    custom_tree(tmp_path / "mine")
    manifest, _, _ = prepare("custom", tmp_path / "mine", runs / "manifests")
    assert manifest.classes == ("sky", "ground", "tree")
    assert [r["id"] for r in manifest.rows("val")] == ["img000"]
    unlabeled = [r for r in manifest.rows("train") if r["mask"] is None]
    assert len(unlabeled) == 3 and all(r["class_hist"] == [] for r in unlabeled)


def test_shapes_is_deterministic_in_its_seed():
    a_img, a_lab = shapes.render(3, 7)
    b_img, b_lab = shapes.render(3, 7)
    c_img, _ = shapes.render(4, 7)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img) if a_img.shape == c_img.shape else True
    assert a_lab.max() < len(shapes.CLASSES)


def test_shapes_written_in_voc_layout(tiny_shapes):
    index = read_dataset("shapes", tiny_shapes)
    assert index.classes == shapes.CLASSES
    assert sum(s.split == "train" for s in index.samples) == 40
    assert (tiny_shapes / "JPEGImages").is_dir() and (tiny_shapes / "ImageSets" / "Segmentation" / "val.txt").is_file()


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(DataError, match="does-not-exist.*--data-root"):
        read_dataset("voc", tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("corrupt", "image does not decode"),
        ("range", "label value 99 is outside 0..20"),
        ("size", "mask is 24x5 but image is 24x20"),
    ],
)
def test_bad_samples_are_named(tmp_path, runs, damage, message):
    root = voc_tree(tmp_path / "voc")
    damage_voc_sample(root, "2007_000002", damage)
    with pytest.raises(DataError, match=message) as err:
        prepare("voc", root, runs / "manifests")
    assert "2007_000002" in str(err.value)
    assert not list((runs / "manifests").glob("*.parquet")) if (runs / "manifests").exists() else True
    manifest, bad, _ = prepare("voc", root, runs / "manifests", skip_bad=True)
    assert [b.id for b in bad] == ["2007_000002"]
    assert "2007_000002" not in {r["id"] for r in manifest.rows()}
