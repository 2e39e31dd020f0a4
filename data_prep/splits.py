"""Labeled/unlabeled splits: a deterministic, class-aware draw, or a list of ids from a file.

A split names how many images are labeled: a fraction of the train pool (``1/8``) or a count
(``92``). The draw first covers every class that appears in the pool (rarest class first, one
random image that contains it), then fills up at random. Unlabeled is the rest of the train set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from data_prep.atomic import write_text_if_changed
from data_prep.errors import DataError
from data_prep.manifest import Manifest


@dataclass(frozen=True)
class Split:
    labeled: list[str]
    unlabeled: list[str]
    val: list[str]


def labeled_count(split: str, pool_size: int) -> int:
    """``1/8`` -> a fraction of the pool; ``92`` -> a count."""
    try:
        value = Fraction(split)
    except (ValueError, ZeroDivisionError):
        raise DataError(f"split {split!r} is neither a fraction like 1/8 nor a count like 92") from None
    count = round(value * pool_size) if value <= 1 and "/" in split else int(value)
    if not 1 <= count <= pool_size:
        raise DataError(f"split {split!r} asks for {count} labeled images but the pool has {pool_size}")
    return count


def class_aware_draw(candidates: list[dict], count: int, seed: int) -> list[str]:
    """Draw ``count`` ids from rows with a ``class_hist``; every class is covered where possible."""
    rng = random.Random(seed)
    rows = sorted(candidates, key=lambda r: r["id"])
    num_classes = max((len(r["class_hist"]) for r in rows), default=0)
    holders = {
        c: [r["id"] for r in rows if len(r["class_hist"]) > c and r["class_hist"][c] > 0] for c in range(num_classes)
    }
    chosen: list[str] = []
    picked: set[str] = set()
    for c in sorted((c for c in holders if holders[c]), key=lambda c: (len(holders[c]), c)):
        if len(chosen) == count:
            break
        if any(i in picked for i in holders[c]):
            continue
        choice = rng.choice(holders[c])
        chosen.append(choice)
        picked.add(choice)
    rest = [r["id"] for r in rows if r["id"] not in picked]
    rng.shuffle(rest)
    chosen += rest[: count - len(chosen)]
    return sorted(chosen)


def normalise_id(token: str) -> str:
    """Accept community split lines: ``2007_000032``, ``JPEGImages/2007_000032.jpg ...`` or a
    Cityscapes ``leftImg8bit/train/x/x_000000_000019_leftImg8bit.png``."""
    name = Path(token.split()[0]).name
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return stem.removesuffix("_leftImg8bit")


def read_labeled_ids(path: Path, source: str | None = None) -> list[str]:
    """The ids in a split file; ``source`` is how the user gave the path, for the error messages."""
    path = Path(path)
    source = source or f"--labeled-ids {path}"
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    ids = [normalise_id(line) for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{source} lists no ids")
    return ids


def make_split(
    manifest: Manifest,
    split: str,
    seed: int,
    *,
    fine_only: bool = False,
    labeled_ids: list[str] | None = None,
    labeled_ids_source: str = "--labeled-ids",
) -> Split:
    """Split the manifest's train rows. ``fine_only`` draws labeled ids from VOC's classic set."""
    train = manifest.rows("train")
    val = sorted(r["id"] for r in manifest.rows("val"))
    annotated = [r for r in train if r["mask"] is not None and (r["fine"] or not fine_only)]
    if labeled_ids is not None:
        by_id = {r["id"]: r for r in train}
        for i in labeled_ids:
            if i not in by_id:
                raise DataError(f"{labeled_ids_source} names {i!r}, which is not a train image of {manifest.dataset}")
            if by_id[i]["mask"] is None:
                raise DataError(f"{labeled_ids_source} names {i!r}, which has no mask")
        labeled = sorted(set(labeled_ids))
    else:
        if not annotated:
            raise DataError(f"{manifest.dataset}: no annotated train images to draw labeled ones from")
        labeled = class_aware_draw(annotated, labeled_count(split, len(annotated)), seed)
    chosen = set(labeled)
    unlabeled = sorted(r["id"] for r in train if r["id"] not in chosen)
    return Split(labeled, unlabeled, val)


def write_split(split: Split, folder: Path) -> None:
    """Write the three id files; a file that already holds the same ids is left untouched."""
    for name in ("labeled", "unlabeled", "val"):
        write_text_if_changed(Path(folder) / f"{name}.txt", "\n".join(getattr(split, name)) + "\n")


def read_split(folder: Path) -> Split:
    folder = Path(folder)
    parts = {}
    for name in ("labeled", "unlabeled", "val"):
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise DataError(f"split file {path} is missing; run the prepare stage again")
        parts[name] = [line for line in path.read_text().splitlines() if line]
    return Split(**parts)
