"""``s4mim data prepare``: validate every image/mask pair and write a Parquet manifest.

One row per sample: id, image, mask, height, width, class pixel histogram, split, plus the VOC
``fine`` flag and per-file digests. The file's metadata holds the dataset name, root, classes, the
label lookup table, a *content hash* (over ids and file digests: caching and MLflow use it) and a
cheap *fingerprint* (paths, sizes, mtimes) that lets an unchanged dataset skip revalidation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_prep.atomic import atomic_path
from data_prep.decode import decode_image_bytes, decode_mask_bytes
from data_prep.errors import DataError
from data_prep.readers import IGNORE, DatasetIndex, Sample, read_dataset

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("mask", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        # Variable-length list: a fixed-size list with empty rows does not read back in pyarrow 25.
        ("class_hist", pa.list_(pa.int64())),
        ("split", pa.string()),
        ("fine", pa.bool_()),
        ("image_digest", pa.string()),
        ("mask_digest", pa.string()),
    ]
)


@dataclass
class Manifest:
    path: Path
    dataset: str
    root: str
    classes: tuple[str, ...]
    label_lut: list[int] | None
    content_hash: str
    fingerprint: str
    table: pa.Table

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def rows(self, split: str | None = None) -> list[dict]:
        rows = self.table.to_pylist()
        return [r for r in rows if split is None or r["split"] == split]

    @classmethod
    def read(cls, path: Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist; run: s4mim data prepare DATASET --root PATH")
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        try:
            return cls(
                path=path,
                dataset=meta["dataset"],
                root=meta["root"],
                classes=tuple(json.loads(meta["classes"])),
                label_lut=json.loads(meta["label_lut"]),
                content_hash=meta["content_hash"],
                fingerprint=meta["fingerprint"],
                table=table,
            )
        except KeyError as exc:
            raise DataError(f"{path} is not an s4mim manifest (no {exc} in its metadata); prepare it again") from None


@dataclass
class BadSample:
    id: str
    reason: str


def fingerprint(index: DatasetIndex) -> str:
    """Hash of every referenced file's path, size and mtime: changes when any file changes."""
    h = hashlib.sha256(f"{index.name}|{index.root}".encode())
    for s in index.samples:
        for p in (s.image, s.mask):
            if p is None:
                h.update(b"-")
                continue
            try:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{s.split}|{s.fine}".encode())
            except FileNotFoundError:
                h.update(f"{p}|missing".encode())
    return h.hexdigest()[:16]


def _check(sample: Sample, index: DatasetIndex, lut: torch.Tensor | None) -> dict | BadSample:
    try:
        image_bytes = Path(sample.image).read_bytes()
    except OSError as exc:
        return BadSample(sample.id, f"{sample.image}: cannot read image ({exc.strerror})")
    try:
        image = decode_image_bytes(image_bytes, sample.image)
    except DataError as exc:
        return BadSample(sample.id, str(exc))
    row = {
        "id": sample.id,
        "image": sample.image,
        "mask": sample.mask,
        "height": image.shape[1],
        "width": image.shape[2],
        "class_hist": [],
        "split": sample.split,
        "fine": sample.fine,
        "image_digest": hashlib.blake2b(image_bytes, digest_size=12).hexdigest(),
        "mask_digest": None,
    }
    if sample.mask is None:
        return row
    try:
        mask_bytes = Path(sample.mask).read_bytes()
        mask = decode_mask_bytes(mask_bytes, sample.mask)
    except OSError as exc:
        return BadSample(sample.id, f"{sample.mask}: cannot read mask ({exc.strerror})")
    except DataError as exc:
        return BadSample(sample.id, str(exc))
    if tuple(mask.shape) != tuple(image.shape[1:]):
        return BadSample(
            sample.id,
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image is {image.shape[2]}x{image.shape[1]}",
        )
    values = torch.unique(mask).tolist()
    bad = [v for v in values if v != IGNORE and v not in index.raw_values]
    if bad:
        hi = max(index.raw_values)
        return BadSample(sample.id, f"{sample.mask}: label value {bad[0]} is outside 0..{hi} and not 255 (void)")
    if lut is not None:
        mask = lut[mask.long()]
    counts = torch.bincount(mask.flatten().long(), minlength=256)[: index.num_classes]
    row["class_hist"] = counts.tolist()
    row["mask_digest"] = hashlib.blake2b(mask_bytes, digest_size=12).hexdigest()
    return row


def content_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: (r["split"], r["id"])):
        h.update(f"{r['split']}|{r['id']}|{r['image_digest']}|{r['mask_digest']}\n".encode())
    return h.hexdigest()[:16]


def manifest_path(manifests_dir: Path, dataset: str, root: Path) -> Path:
    """One manifest per dataset and root, so two copies of a dataset never overwrite each other."""
    tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return Path(manifests_dir) / f"{dataset}-{tag}.parquet"


def prepare(
    dataset: str,
    root: Path,
    manifests_dir: Path,
    *,
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    skip_hint: str | None = None,
) -> tuple[Manifest, list[BadSample], bool]:
    """Validate ``dataset`` at ``root`` and write its manifest.

    Returns the manifest, the bad samples that were skipped, and whether an existing manifest was
    reused because no file changed. Raises DataError listing the bad samples unless ``skip_bad``;
    ``skip_hint`` is how the calling command leaves bad samples out (``{them}`` is "it" or "them").
    """
    index = read_dataset(dataset, root)
    root = index.root.resolve()
    path = manifest_path(manifests_dir, dataset, root)
    fp = fingerprint(index)
    if path.is_file():
        try:
            existing = Manifest.read(path)
            if existing.fingerprint == fp:
                return existing, [], True
        except (DataError, pa.ArrowException, json.JSONDecodeError):
            pass  # unreadable or foreign: rebuild it
    lut = torch.tensor(index.label_lut, dtype=torch.uint8) if index.label_lut else None
    rows, bad = [], []
    total = len(index.samples)
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, result in enumerate(pool.map(lambda s: _check(s, index, lut), index.samples), 1):
            (bad if isinstance(result, BadSample) else rows).append(result)
            if progress is not None:
                progress(done, total)
    if bad and not skip_bad:
        first = bad[0]
        them = "them" if len(bad) > 1 else "it"
        fix = skip_hint.format(them=them) if skip_hint else f"--skip-bad leaves {them} out"
        more = f"and {len(bad) - 1} more; " if len(bad) > 1 else ""
        raise DataError(f"bad sample {first.id}: {first.reason} ({more}{fix})")
    if not any(r["split"] == "val" for r in rows):
        raise DataError(f"{root}: no validation images; the {dataset} layout needs a val split")
    digest = content_hash(rows)
    metadata = {
        "dataset": dataset,
        "root": str(root),
        "classes": json.dumps(list(index.classes)),
        "label_lut": json.dumps(index.label_lut),
        "content_hash": digest,
        "fingerprint": fp,
    }
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Manifest(path, dataset, str(root), index.classes, index.label_lut, digest, fp, table), bad, False
