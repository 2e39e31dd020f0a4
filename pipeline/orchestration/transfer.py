"""``s4mim runs export`` / ``runs import``: a runs folder's finished stages, small enough to keep or send.

An export holds what the stage cache needs to count each finished stage as done, and what a results
table reads: every finished stage's ``result.json`` and ``hash.json`` (and evaluate's ``iou.csv``), the
prepared manifests and splits, and the weights that stages still to run start from: each warmup
teacher, and a train stage's checkpoint while no finished evaluate has scored it. A scored train's
checkpoint stays behind (those are the bulk of a runs folder, and nothing cached reads them again).
Imported into another runs folder, on another machine or after this one's runs folder is gone, the
same command finds those stages cached, writes the same tables, and trains only what is missing.

A stage travels whole or not at all. Export leaves out a stage whose weights are gone or lie outside
the runs folder; import leaves out a stage the runs folder holds other files for (an interrupted run
of it there). Every file is copied through a temporary file and a rename, keeping its modification
time, and a stage's ``result.json``, which marks it finished, is copied after its other files: a copy
cut short never leaves a stage counted as finished without its weights. ``import`` never overwrites
a file of the runs folder; ``export`` brings the export up to date with the runs folder (a stage
forced to run again replaces its earlier copy). ``exports.json`` in an export lists each export made
into it: when, which stages it added, and the CPU and torch of the machine it was made on.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_path, write_text
from pipeline.errors import UsageError
from pipeline.machine import machine
from pipeline.orchestration.orchestrate import CACHE_FOLDER
from pipeline.orchestration.results import read_result
from pipeline.paths import is_uri

RECORD_FILES = ("hash.json", "iou.csv")  # and result.json, always last
PREPARED_FOLDERS = ("manifests", "splits")
LOG = "exports.json"


@dataclass
class Transfer:
    stages: list[str] = field(default_factory=list)  # <preset>/<stage folder> of each stage copied
    files: int = 0  # files written
    bytes: int = 0
    left_out: list[str] = field(default_factory=list)  # each stage left out, and why


Files = list[tuple[Path, Path]]  # (source file, its path relative to the runs folder or the export)


def _finished(root: Path) -> list[tuple[Path, dict]]:
    """Each finished stage folder under ``root/stages`` (``<preset>/<stage>-<hash>``) and its result."""
    out = []
    for folder in sorted((root / "stages").glob("*/*")):
        if folder.is_dir() and CACHE_FOLDER.fullmatch(folder.name) and (result := read_result(folder)) is not None:
            out.append((folder, result))
    return out


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _tree(path: Path, rel: Path) -> Files:
    """A checkpoint (a file, or a folder of files) and where each of its files goes."""
    if path.is_file():
        return [(path, rel)]
    return [(f, rel / f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file()]


def _find(root: Path, checkpoint: str) -> Path | None:
    """The checkpoint a result names, under ``root``: results name it by absolute path, and a runs folder
    or an export keeps the layout below it, so it is looked for by its tail, the longest first."""
    if is_uri(checkpoint):
        return None
    parts = Path(checkpoint).parts
    for start in range(1, len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.exists() and _under(candidate, root):
            return candidate
    return None


def _weights(root: Path, folder: Path, result: dict) -> tuple[Files, str | None]:
    """The files of the checkpoint ``result`` names, found under ``root``, or why they are not there."""
    checkpoint = result.get("checkpoint")
    if not isinstance(checkpoint, str):
        return [], f"{folder.name}: its result names no checkpoint"
    path = _find(root, checkpoint)
    if path is None:
        return [], f"{folder.name}: its checkpoint {checkpoint} is not in {root}"
    return _tree(path, path.resolve().relative_to(root.resolve())), None


def _records(folder: Path, root: Path) -> Files:
    rel = folder.relative_to(root)
    return [(folder / name, rel / name) for name in RECORD_FILES if (folder / name).is_file()]


def _result(folder: Path, root: Path) -> tuple[Path, Path]:
    return folder / "result.json", folder.relative_to(root) / "result.json"


def _copy(source: Path, target: Path, done: Transfer) -> None:
    """Copy unless ``target`` already holds the same bytes."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return
    with atomic_path(target) as tmp:
        shutil.copy2(source, tmp)
    done.files += 1
    done.bytes += source.stat().st_size


@contextmanager
def _os_errors_reported(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise UsageError(f"{action} failed: {where}{exc.strerror or exc}") from None


@_os_errors_reported("runs export")
def export_runs(runs: Path, dest: Path) -> Transfer:
    """Bring ``dest`` up to date with the finished stages of ``runs``."""
    runs, dest = Path(runs), Path(dest)
    stages = _finished(runs)
    if not stages:
        raise UsageError(f"{runs} holds no finished stage: point S4MIM_RUNS at the runs folder to export")
    if _under(dest, runs) or _under(runs, dest):
        raise UsageError(f"{dest}: export into a folder outside the runs folder {runs}")
    log = _read_log(dest)
    # the train checkpoints a finished evaluate has scored, by their last two parts (<run or stage>/<file>)
    scored = {Path(r["evaluated"]).parts[-2:] for f, r in stages
              if f.name.startswith("evaluate-") and isinstance(r.get("evaluated"), str)}  # fmt: skip
    done = Transfer()
    for name in PREPARED_FOLDERS:
        for path, rel in _tree(runs / name, Path(name)) if (runs / name).is_dir() else []:
            _copy(path, dest / rel, done)
    for folder, result in stages:
        weights: Files = []
        if folder.name.startswith(("warmup-", "train-")):
            checkpoint = result.get("checkpoint")
            if folder.name.startswith("warmup-") or Path(str(checkpoint)).parts[-2:] not in scored:
                weights, why = _weights(runs, folder, result)
                if why:
                    done.left_out.append(why)
                    continue
        written = done.files
        for path, rel in [*weights, *_records(folder, runs), _result(folder, runs)]:
            _copy(path, dest / rel, done)
        if done.files > written:
            done.stages.append(str(folder.relative_to(runs / "stages")))
    if done.stages:
        log.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                    "stages": done.stages})  # fmt: skip
        write_text(dest / LOG, json.dumps(log, indent=1) + "\n")
    return done


def _read_log(dest: Path) -> list:
    path = dest / LOG
    if not path.is_file():
        return []
    try:
        log = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): mend it (a merge?) or move it "
                         "aside, then export again") from None  # fmt: skip
    if not isinstance(log, list):
        raise UsageError(f"{path} is not a list of exports: mend it or move it aside, then export again")
    return log


@_os_errors_reported("runs import")
def import_runs(source: Path, runs: Path) -> Transfer:
    """Copy into ``runs`` the finished stages of the export ``source`` that it does not hold yet."""
    source, runs = Path(source), Path(runs)
    stages = _finished(source)
    if not stages:
        raise UsageError(f"{source} is not an export of finished stages (no stages/<preset>/<stage>/result.json "
                         "in it): make one with 's4mim runs export FOLDER'")  # fmt: skip
    done = Transfer()
    for name in PREPARED_FOLDERS:
        for path, rel in _tree(source / name, Path(name)) if (source / name).is_dir() else []:
            if not (runs / rel).exists():
                _copy(path, runs / rel, done)
    for folder, result in stages:
        target = runs / folder.relative_to(source)
        if (target / "result.json").exists():
            continue  # finished here already
        weights, why = _weights(source, folder, result)  # none for a scored train or an evaluate
        if why and folder.name.startswith("warmup-"):
            done.left_out.append(why)
            continue
        files = [*weights, *_records(folder, source)]
        clash = next((runs / rel for path, rel in files if (runs / rel).exists()
                      and not filecmp.cmp(path, runs / rel, shallow=False)), None)  # fmt: skip
        if clash is not None:
            done.left_out.append(f"{folder.name}: the runs folder holds another {clash} (an interrupted run of it?): "
                                 f"delete {target} and that file's folder to import it")  # fmt: skip
            continue
        for path, rel in [*files, _result(folder, source)]:
            _copy(path, runs / rel, done)
        done.stages.append(str(folder.relative_to(source / "stages")))
    return done
