"""The prepare stage: the dataset (generated, for ``shapes``), its manifest and the split files.

s4mim data prepare shapes --root data/shapes          # manifest only
s4mim pipeline run shapes-1/8                         # prepare runs as the first stage
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from data_prep import shapes
from data_prep.errors import DataError
from data_prep.manifest import Manifest, manifest_path, prepare
from data_prep.readers import read_dataset
from data_prep.splits import make_split, read_labeled_ids, write_split
from pipeline.config.schema import Config
from pipeline.console import progress, say
from pipeline.locks import file_lock
from pipeline.paths import data_dir, slug


@dataclass(frozen=True)
class Prepared:
    manifest: Path
    split_dir: Path
    content_hash: str  # of the manifest
    split_hash: str  # of the labeled ids
    labeled: int
    unlabeled: int
    val: int
    cached: bool

    @property
    def inputs_hash(self) -> str:
        return f"{self.content_hash}-{self.split_hash}"

    @property
    def labeled_fraction(self) -> float:
        return self.labeled / max(1, self.labeled + self.unlabeled)


def labeled_hash(ids: list[str]) -> str:
    """The split's part of a stage's inputs hash: the labeled ids in the order labeled.txt lists them."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]


def dataset_root(config: Config) -> Path:
    """``data.root``, or ``$S4MIM_DATA/<dataset>`` (``shapes-seedN`` for another shapes seed)."""
    if config.data.root:
        return Path(config.data.root).expanduser().absolute()
    if config.data.dataset == "shapes":
        return shapes_dir(config.data.synth_seed)
    return data_dir() / config.data.dataset


def shapes_dir(seed: int) -> Path:
    """Where the shapes dataset of a generator seed lives by default: each seed has its own folder."""
    return data_dir() / ("shapes" if seed == 0 else f"shapes-seed{seed}")


def shapes_lock(root: Path, seed: int):
    """The lock held while a shapes dataset is generated at ``root``: ``.<name>.lock`` beside it. A second
    command that asks for it waits for the first (``pipeline.locks``), then finds the dataset there."""
    return file_lock(root.parent / f".{root.name}.lock", f"the shapes generator (seed {seed})", root, wait=True)


def ensure_shapes(root: Path, seed: int) -> None:
    """Generate the embedded dataset at ``root`` when no shapes dataset is there yet; one generated with
    another seed is refused (held-out data must never stand in for development data, or back).

    Generating holds ``shapes_lock``: a second command that needs the same dataset meanwhile waits,
    then reads it, instead of generating it again over the first's."""
    if not (root / "shapes.json").is_file():
        with shapes_lock(root, seed):
            if not (root / "shapes.json").is_file():
                if root.exists() and any(root.iterdir()):
                    raise DataError(f"{root} exists and is not a shapes dataset; pass another --data-root or empty it")
                say(f"generating the shapes dataset (seed {seed}) in {root}")
                shapes.synthesize(root, seed, progress=progress("shapes images"))
    meta = shapes.read_meta(root)
    if meta is None:
        raise DataError(f"{root / 'shapes.json'} is not valid JSON; delete {root} to generate the dataset again")
    found = meta.get("seed")
    if found != seed:
        raise DataError(
            f"{root} holds shapes generated with seed {found}, not {seed}; "
            f"set data.synth_seed={found}, or pass a --data-root without a dataset to generate seed {seed}"
        )


def _labeled_ids(config: Config) -> list[str] | None:
    path = config.data.labeled_ids
    return read_labeled_ids(Path(path), source=f"--set data.labeled_ids={path}") if path else None


def split_folder(runs: Path, manifest: Path, config: Config, labeled_ids: list[str] | None) -> Path:
    d = config.data
    name = (
        f"{slug(d.split)}-{d.voc_set}-seed{d.split_seed}"
        if d.dataset == "voc"
        else f"{slug(d.split)}-seed{d.split_seed}"
    )
    if labeled_ids is not None:
        name = "ids-" + labeled_hash(sorted(labeled_ids))
    return runs / "splits" / manifest.stem / name


def planned_manifest(config: Config, runs: Path) -> Path:
    return manifest_path(runs / "manifests", config.data.dataset, dataset_root(config).resolve())


def prepare_stage(config: Config, runs: Path, *, skip_bad: bool = False, force: bool = False) -> Prepared:
    """Make sure the manifest and split files for ``config`` exist; cheap when nothing changed."""
    root = dataset_root(config)
    if config.data.dataset == "shapes":
        ensure_shapes(root, config.data.synth_seed)
    if force:
        planned_manifest(config, runs).unlink(missing_ok=True)
    say(f"checking {config.data.dataset} at {root}")
    hint = (
        f"fix or remove {{them}}, or leave {{them}} out once with: "
        f"s4mim data prepare {config.data.dataset} --root {root} --skip-bad"
    )
    manifest, bad, reused = prepare(
        config.data.dataset, root, runs / "manifests", skip_bad=skip_bad, progress=progress("validated"),
        skip_hint=hint,
    )  # fmt: skip
    for sample in bad:
        say(f"  skipped {sample.id}: {sample.reason}")
    labeled_ids = _labeled_ids(config)
    folder = split_folder(runs, manifest.path, config, labeled_ids)
    split = make_split(
        manifest,
        config.data.split,
        config.data.split_seed,
        fine_only=config.data.dataset == "voc" and config.data.voc_set == "classic",
        labeled_ids=labeled_ids,
        labeled_ids_source=f"--set data.labeled_ids={config.data.labeled_ids}",
    )
    write_split(split, folder)
    return Prepared(
        manifest.path,
        folder,
        manifest.content_hash,
        labeled_hash(split.labeled),
        len(split.labeled),
        len(split.unlabeled),
        len(split.val),
        reused,
    )


def check_unlabeled(config: Config, prepared: Prepared) -> None:
    """A semi-supervised train stage needs unlabeled images: fail before any training when the split has none."""
    if config.variant != "supervised" and prepared.unlabeled == 0:
        raise DataError(
            f"split {config.data.split} labels all {prepared.labeled} train images, leaving no unlabeled ones "
            f"for the {config.variant} variant; label fewer (--set data.split=1/8), add images without masks, "
            "or use --set variant=supervised"
        )


def peek_prepared(config: Config, runs: Path) -> str | None:
    """The inputs hash of an existing, unchanged preparation, without writing anything (dry runs)."""
    path = planned_manifest(config, runs)
    if not path.is_file():
        return None
    try:
        manifest = Manifest.read(path)
        from data_prep.manifest import fingerprint

        if fingerprint(read_dataset(config.data.dataset, dataset_root(config))) != manifest.fingerprint:
            return None
    except Exception:
        return None
    labeled_ids = _labeled_ids(config)
    labeled_file = split_folder(runs, path, config, labeled_ids) / "labeled.txt"
    if not labeled_file.is_file():
        return None
    ids = [line for line in labeled_file.read_text().splitlines() if line]
    return f"{manifest.content_hash}-{labeled_hash(ids)}"
