"""Small dataset trees in the real layouts of VOC, Cityscapes and the custom format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.palette import voc_palette


def write_image(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_palette_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def write_gray_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def voc_tree(root: Path, n_fine: int = 6, n_aug: int = 6, n_val: int = 3, size=(20, 24)) -> Path:
    """VOC2012 with palette SegmentationClass masks (with 255 boundaries), SegmentationClassAug
    grayscale masks for the extra images, and ImageSets lists (no trainaug.txt)."""
    h, w = size
    fine = [f"2007_{i:06d}" for i in range(n_fine)]
    aug = [f"2008_{i:06d}" for i in range(n_aug)]
    val = [f"2009_{i:06d}" for i in range(n_val)]
    for k, image_id in enumerate(fine + aug + val):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", h, w, seed=k)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[: h // 2, : w // 2] = 1 + k % 20
        mask[h // 2, :] = 255  # object boundary, void
        if image_id in aug:
            write_gray_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        else:
            write_palette_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
            write_gray_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(fine) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    return root


def cityscapes_tree(root: Path, size=(16, 32)) -> Path:
    """leftImg8bit and gtFine with city folders; labelIds use raw Cityscapes ids."""
    h, w = size
    k = 0
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("frankfurt",))):
        for city in cities:
            for n in range(2):
                stem = f"{city}_{n:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", h, w, seed=k)
                ids = np.full((h, w), 7, dtype=np.uint8)  # road
                ids[:, : w // 2] = 26  # car
                ids[0, :] = 1  # ego vehicle: ignored
                write_gray_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
                k += 1
    return root


def custom_tree(root: Path, n_labeled: int = 5, n_unlabeled: int = 3, size=(16, 16)) -> Path:
    h, w = size
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\nground\ntree\n")
    for i in range(n_labeled + n_unlabeled):
        write_image(root / "images" / f"img{i:03d}.png", h, w, seed=i)
        if i < n_labeled:
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[h // 2 :] = 1
            mask[:2, :2] = i % 3
            write_gray_mask(root / "masks" / f"img{i:03d}.png", mask)
    (root / "val.txt").write_text("img000\n")
    return root


def damage_voc_sample(root: Path, image_id: str, kind: str, value: int = 99) -> None:
    """Break one VOC sample: ``corrupt`` image bytes, a mask ``range`` value, or a mask of the wrong ``size``."""
    if kind == "corrupt":
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    elif kind == "range":
        write_palette_mask(root / "SegmentationClass" / f"{image_id}.png", np.full((20, 24), value))
    elif kind == "size":
        write_palette_mask(root / "SegmentationClass" / f"{image_id}.png", np.zeros((5, 24)))
    else:
        raise ValueError(kind)
