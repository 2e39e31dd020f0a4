"""Dataset readers: each turns a root folder into an index of samples, without decoding anything.

Layouts:
- ``voc``: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs), optional ``SegmentationClassAug/``
  and ``ImageSets/Segmentation/{train,val,trainaug}.txt``. The classic train set is ``train.txt``
  (1,464 images); the blended set (10,582) is ``trainaug.txt`` or, failing that, every id in
  ``SegmentationClassAug/`` that is not in ``val.txt``.
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids.
- ``shapes``: the embedded dataset, VOC layout with its own classes (``s4mim data synth``).
- ``custom``: ``images/``, ``masks/<id>.png`` (class indices), ``classes.txt`` (one name a line) and
  optional ``val.txt`` (ids held out for validation; without it every 10th annotated image, in id
  order, is held out). Images without a mask are unlabeled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_prep import shapes
from data_prep.errors import DataError

DATASETS = ("voc", "cityscapes", "shapes", "custom")
IGNORE = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# Cityscapes label id -> train id (cityscapesScripts' labels table); ids not listed are ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_MAX_ID = 33

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ROOT_OPTIONS = "--data-root (s4mim data prepare: --root)"  # how every command names the dataset folder


@dataclass(frozen=True)
class Sample:
    id: str
    image: str  # absolute path
    mask: str | None  # absolute path; None for an image without annotation (unlabeled only)
    split: str  # "train" or "val"
    fine: bool = False  # VOC: in the classic, finely annotated train set (train.txt)


@dataclass
class DatasetIndex:
    name: str
    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    # Raw mask value -> class index (IGNORE for void); None when masks already hold class indices.
    label_lut: list[int] | None = None
    raw_values: frozenset[int] = field(default_factory=frozenset)  # allowed raw mask values

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_dataset(name: str, root: Path) -> DatasetIndex:
    readers = {"voc": read_voc, "cityscapes": read_cityscapes, "shapes": read_shapes, "custom": read_custom}
    if name not in readers:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    root = Path(root).expanduser().absolute()  # manifests store absolute paths, whatever the cwd later
    if not root.is_dir():
        raise DataError(
            f"dataset root {root} does not exist; pass the dataset folder with {ROOT_OPTIONS}, or set S4MIM_DATA"
        )
    return readers[name](root)


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _voc_root(root: Path) -> Path:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"{root} has no JPEGImages/ folder; pass the VOC2012 folder with {ROOT_OPTIONS}")


def read_voc(root: Path, classes: tuple[str, ...] = VOC_CLASSES, name: str = "voc") -> DatasetIndex:
    root = _voc_root(root)
    sets = root / "ImageSets" / "Segmentation"
    for required in (sets / "train.txt", sets / "val.txt", root / "SegmentationClass"):
        if not required.exists():
            raise DataError(f"{required} is missing: {root} is not a complete VOC segmentation tree")
    fine_ids = _read_ids(sets / "train.txt")
    val_ids = _read_ids(sets / "val.txt")
    aug_dir = root / "SegmentationClassAug"
    if (sets / "trainaug.txt").is_file():
        train_ids = _read_ids(sets / "trainaug.txt")
    elif aug_dir.is_dir():
        val = set(val_ids)
        train_ids = sorted({p.stem for p in aug_dir.glob("*.png")} - val)
    else:
        train_ids = list(fine_ids)  # classic tree only: no blended set
    fine = set(fine_ids)
    train_ids = sorted(set(train_ids) | fine)

    def mask_for(image_id: str) -> str | None:
        classic = root / "SegmentationClass" / f"{image_id}.png"
        aug = aug_dir / f"{image_id}.png"
        if classic.is_file():
            return str(classic)
        return str(aug) if aug.is_file() else None

    samples = [Sample(i, str(root / "JPEGImages" / f"{i}.jpg"), mask_for(i), "train", i in fine) for i in train_ids]
    samples += [Sample(i, str(root / "JPEGImages" / f"{i}.jpg"), mask_for(i), "val") for i in val_ids]
    for s in samples:
        if s.split == "val" and s.mask is None:
            raise DataError(f"validation image {s.id} has no mask in {root / 'SegmentationClass'}")
    return DatasetIndex(name, root, classes, samples, raw_values=frozenset(range(len(classes))))


def read_shapes(root: Path) -> DatasetIndex:
    if not (root / "shapes.json").is_file():
        raise DataError(f"{root} holds no shapes dataset; create it with: s4mim data synth --root {root}")
    return read_voc(root, classes=shapes.CLASSES, name="shapes")


def read_cityscapes(root: Path) -> DatasetIndex:
    images_root, masks_root = root / "leftImg8bit", root / "gtFine"
    for required in (images_root, masks_root):
        if not required.is_dir():
            raise DataError(
                f"{required} is missing: pass the folder holding leftImg8bit/ and gtFine/ with {ROOT_OPTIONS}"
            )
    samples = []
    for split in ("train", "val"):
        for image in sorted((images_root / split).glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            mask = masks_root / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
            samples.append(Sample(stem, str(image), str(mask) if mask.is_file() else None, split))
    if not samples:
        raise DataError(f"no leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png images under {root}")
    lut = [IGNORE] * 256
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return DatasetIndex(
        "cityscapes", root, CITYSCAPES_CLASSES, samples, label_lut=lut,
        raw_values=frozenset(range(CITYSCAPES_MAX_ID + 1)),
    )  # fmt: skip


def read_custom(root: Path) -> DatasetIndex:
    images_dir, masks_dir, classes_file = root / "images", root / "masks", root / "classes.txt"
    for required in (images_dir, classes_file):
        if not required.exists():
            raise DataError(f"{required} is missing: a custom dataset needs images/, masks/ and classes.txt")
    classes = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
    if not classes:
        raise DataError(f"{classes_file} lists no class names; write one name a line")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    masks = {p.stem: p for p in images if (masks_dir / f"{p.stem}.png").is_file()}
    if not masks:
        raise DataError(
            f"no masks found: {masks_dir} holds no <image id>.png for any image in {images_dir}; "
            "annotate some images there (class indices, 255 = void)"
        )
    if (root / "val.txt").is_file():
        val_ids = set(_read_ids(root / "val.txt"))
    else:
        val_ids = set(sorted(masks)[::10])
    samples = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png" if image.stem in masks else None
        split = "val" if image.stem in val_ids else "train"
        samples.append(Sample(image.stem, str(image), str(mask) if mask else None, split))
    missing_val = sorted(val_ids - {s.id for s in samples})
    if missing_val:
        raise DataError(f"{root / 'val.txt'} names {missing_val[0]!r}, which has no image in {images_dir}")
    if any(s.split == "val" and s.mask is None for s in samples):
        bad = next(s.id for s in samples if s.split == "val" and s.mask is None)
        raise DataError(f"validation image {bad!r} has no mask {masks_dir / (bad + '.png')}")
    return DatasetIndex("custom", root, classes, samples, raw_values=frozenset(range(len(classes))))
