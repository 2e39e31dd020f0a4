"""``s4mim runs export`` / ``runs import``: a runs folder's stages, small enough to keep or send.

An export holds what the stage cache needs to count each finished stage as done, and what a results
table reads: every finished stage's ``result.json`` and ``hash.json`` (and evaluate's ``iou.csv``), the
prepared manifests and splits, and the weights that stages still to run start from: each warmup
teacher, and a train stage's checkpoint while no finished evaluate has scored it. A scored train's
checkpoint stays behind (those are the bulk of a runs folder, and nothing cached reads them again).
Imported into another runs folder, on another machine or after this one's runs folder is gone, the
same command finds those stages cached, writes the same tables, and trains only what is missing.

An interrupted warmup or train (a stage folder without ``result.json``) travels too, with the
checkpoints it resumes from: under Ray its run's epoch folders in ``<runs>/ray/<preset>-<stage>-<hash>/``
(Ray keeps the latest and the best evaluated one), with ``--local`` the stage folder's ``last.pt`` and
``best.pt``. The same command on the other runs folder resumes it after its last exported epoch (Ray
is told of the best epoch again, see ``ray_train._uploaded_after``), so a long run outlives the
machine it started on. An epoch folder Ray is still writing (its ``state.pt`` missing or not a whole
zip yet) is left for the next export. Each export brings the export's copy of a stage to what the runs
folder holds now: epoch folders Ray has since deleted are removed from it, and so are an interrupted
stage's once it has finished there, and a train checkpoint once an evaluate has scored it. Ray
checkpoints kept elsewhere (``S4MIM_STORAGE``) do not travel.

A stage travels whole or not at all. Export leaves out a stage whose weights are gone or lie outside
the runs folder; import leaves out a stage the runs folder holds other files for (an interrupted run
of it there). Every file is copied through a temporary file and a rename, keeping its modification
time, and a stage's ``result.json``, which marks it finished, is copied after its other files: a copy
cut short never leaves a stage counted as finished without its weights. ``import`` never overwrites
a file of the runs folder; ``export`` brings the export up to date with the runs folder (a stage
forced to run again replaces its earlier copy). ``exports.json`` in an export lists each export made
into it: when, which stages it added (and which interrupted ones, at which epoch), and the CPU and
torch of the machine it was made on. Import keeps every file of the runs folder, but for the epochs
an earlier import of an interrupted stage left there, older than the export's newest, which it replaces.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_path, write_text
from pipeline.errors import UsageError
from pipeline.machine import machine
from pipeline.orchestration.orchestrate import CACHE_FOLDER, complete_checkpoint, epoch_number, ray_run_folder
from pipeline.orchestration.results import found_under, read_result
from pipeline.paths import is_uri

RECORD_FILES = ("hash.json", "iou.csv")  # and result.json, always last
RESUME_FILES = ("last.pt", "best.pt")  # an interrupted --local stage's checkpoints, in its stage folder
PREPARED_FOLDERS = ("manifests", "splits")
LOG = "exports.json"


@dataclass
class Transfer:
    stages: list[str] = field(default_factory=list)  # <preset>/<stage folder> of each finished stage copied
    interrupted: list[str] = field(default_factory=list)  # each interrupted one copied, "<preset>/<stage> @ <epoch>"
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


def _elsewhere(runs: Path) -> str | None:
    """Where Ray keeps checkpoints when ``S4MIM_STORAGE`` puts them outside ``<runs>/ray``."""
    storage = os.environ.get("S4MIM_STORAGE")
    return storage if storage and Path(storage).resolve() != (runs / "ray").resolve() else None


def _interrupted(root: Path) -> list[tuple[Path, Files, str]]:
    """Each interrupted warmup or train under ``root/stages`` with a checkpoint to resume from: its folder, the
    files it resumes from (``hash.json`` first) and its newest epoch (``last.pt`` with ``--local``)."""
    out = []
    for folder in sorted((root / "stages").glob("*/*")):
        trains = folder.name.startswith(("warmup-", "train-")) and CACHE_FOLDER.fullmatch(folder.name)
        if not (trains and (folder / "hash.json").is_file() and read_result(folder) is None):
            continue
        rel = folder.relative_to(root)
        files = [(folder / "hash.json", rel / "hash.json")]
        files += [(folder / name, rel / name) for name in RESUME_FILES if (folder / name).is_file()]
        newest = "last.pt" if len(files) > 1 else None
        for epoch in sorted(ray_run_folder(folder, root).glob("epoch_*")):
            listed = [f for f in sorted(epoch.rglob("*")) if f.is_file()]  # the files checked are those copied
            if epoch / "state.pt" in listed and all(complete_checkpoint(f) for f in listed if f.suffix == ".pt"):
                files += [(f, f.relative_to(root)) for f in listed]
                newest = epoch.name
        if newest is not None:  # else it stopped before its first epoch: nothing to resume from
            out.append((folder, files, newest))
    return out


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _tree(path: Path, rel: Path) -> Files:
    """A checkpoint (a file, or a folder of files) and where each of its files goes."""
    if path.is_file():
        return [(path, rel)]
    return [(f, rel / f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file()]


def _find(root: Path, checkpoint: str) -> Path | None:
    """The checkpoint a result names, under ``root`` (results name it by absolute path; a runs folder or an
    export keeps the layout below it), or None where it is not there or leads outside ``root``."""
    found = None if is_uri(checkpoint) else found_under(root, Path(checkpoint))
    return found if found is not None and _under(found, root) else None


def _weights(root: Path, folder: Path, result: dict) -> tuple[Files, str | None]:
    """The files of the checkpoint ``result`` names, found under ``root``, or why they are not there."""
    checkpoint = result.get("checkpoint")
    if not isinstance(checkpoint, str):
        return [], f"{folder.name}: its result names no checkpoint"
    path = _find(root, checkpoint)
    if path is None:
        return [], f"{folder.name}: its checkpoint {checkpoint} is not in {root}"
    return _tree(path, path.resolve().relative_to(root.resolve())), None


def _prepared(root: Path) -> Files:
    """The prepared manifests and splits under ``root``."""
    return [item for name in PREPARED_FOLDERS if (root / name).is_dir() for item in _tree(root / name, Path(name))]


def _records(folder: Path, root: Path) -> Files:
    rel = folder.relative_to(root)
    return [(folder / name, rel / name) for name in RECORD_FILES if (folder / name).is_file()]


def _result(folder: Path, root: Path) -> tuple[Path, Path]:
    return folder / "result.json", folder.relative_to(root) / "result.json"


def _same_manifest(source: Path, target: Path) -> bool:
    """Two manifests of the same data: their metadata equal but for the fingerprint, which holds the files'
    modification times (a dataset generated again on another machine gets a manifest of other bytes)."""
    import pyarrow.parquet as pq

    def meta(path: Path) -> dict:
        found = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
        return {k: v for k, v in found.items() if k != "fingerprint"}

    try:
        first = meta(source)
        return "content_hash" in first and first == meta(target)
    except Exception:  # not a manifest (pyarrow raises its own errors on other files): compare bytes
        return False


def _copy(source: Path, target: Path, done: Transfer, *, manifest: bool = False) -> None:
    """Copy unless ``target`` already holds the same bytes (with ``manifest``: the same data)."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return
    if manifest and target.is_file() and _same_manifest(source, target):
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
    """Bring ``dest`` up to date with the finished and interrupted stages of ``runs``."""
    runs, dest = Path(runs), Path(dest)
    stages, interrupted = _finished(runs), _interrupted(runs)
    if not stages and not interrupted:
        raise UsageError(f"{runs} holds no finished or interrupted stage: point S4MIM_RUNS at the runs folder "
                         "to export")  # fmt: skip
    if _under(dest, runs) or _under(runs, dest):
        raise UsageError(f"{dest}: export into a folder outside the runs folder {runs}")
    log = _read_log(dest)
    # the train checkpoints a finished evaluate has scored, by their last two parts (<run or stage>/<file>)
    scored = {Path(r["evaluated"]).parts[-2:] for f, r in stages
              if f.name.startswith("evaluate-") and isinstance(r.get("evaluated"), str)}  # fmt: skip
    done = Transfer()
    for path, rel in _prepared(runs):  # a manifest of the same data stays: the export changes only when data does
        _copy(path, dest / rel, done, manifest=rel.parts[0] == "manifests")
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
        files = [*weights, *_records(folder, runs), _result(folder, runs)]
        for path, rel in files:
            _copy(path, dest / rel, done)
        _prune(dest, folder.relative_to(runs), {rel for _, rel in files})  # an earlier export's epochs of it
        if done.files > written:
            done.stages.append(str(folder.relative_to(runs / "stages")))
    for folder, files, epoch in interrupted:
        if read_result(dest / folder.relative_to(runs)) is not None:
            done.left_out.append(f"{folder.name}: {dest} holds it finished (exported from another runs folder); "
                                 "its interrupted run here stays out")  # fmt: skip
            continue
        written = done.files
        try:
            for path, rel in files:
                _copy(path, dest / rel, done)
        except FileNotFoundError:
            continue  # Ray deleted an epoch folder it no longer keeps: the next export copies what it keeps
        removed = _prune(dest, folder.relative_to(runs), {rel for _, rel in files})
        if done.files > written or removed:
            done.interrupted.append(f"{folder.relative_to(runs / 'stages')} @ {epoch}")
    if (storage := _elsewhere(runs)) and any((f / "hash.json").is_file() and read_result(f) is None
                                             for f in (runs / "stages").glob("*/*")
                                             if f.name.startswith(("warmup-", "train-"))):  # fmt: skip
        done.left_out.append(f"interrupted Ray stages: their checkpoints are in S4MIM_STORAGE={storage}, which "
                             "runs export does not read")  # fmt: skip
    if done.stages or done.interrupted:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                 "stages": done.stages}  # fmt: skip
        if done.interrupted:
            entry["interrupted"] = done.interrupted
        log.append(entry)
        write_text(dest / LOG, json.dumps(log, indent=1) + "\n")
    return done


def _prune(dest: Path, stage: Path, keep: set[Path]) -> bool:
    """Delete the files an earlier export left of ``stage`` (``stages/<preset>/<stage>``) in ``dest``, in its
    folder and its Ray run's, that are not in ``keep``: the epochs Ray has deleted since, and those of an
    interrupted stage that has finished. Returns whether it deleted any."""
    removed = False
    for folder in (dest / stage, ray_run_folder(dest / stage, dest)):
        for path in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
            if path.is_file() and path.relative_to(dest) not in keep:
                path.unlink()
                removed = True
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


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
    """Copy into ``runs`` the finished and interrupted stages of the export ``source`` that it does not hold yet."""
    source, runs = Path(source), Path(runs)
    stages, interrupted = _finished(source), _interrupted(source)
    if not stages and not interrupted:
        raise UsageError(f"{source} is not an export of stages (no stages/<preset>/<stage>/result.json in it, nor "
                         "an interrupted stage's checkpoints): make one with 's4mim runs export FOLDER'")  # fmt: skip
    done = Transfer()
    for path, rel in _prepared(source):
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
    for folder, files, epoch in interrupted:
        target = runs / folder.relative_to(source)
        if read_result(target) is not None:
            continue  # finished here
        run = ray_run_folder(target, runs)
        if epoch != "last.pt" and (storage := _elsewhere(runs)):
            done.left_out.append(f"{folder.name}: S4MIM_STORAGE={storage} points Ray elsewhere, where it would not "
                                 f"find the epochs to resume from; import without it")  # fmt: skip
            continue
        theirs = {rel: path for path, rel in files}
        held = [path for path in [target / "hash.json", *(target / name for name in RESUME_FILES), *run.rglob("*")]
                if path.is_file()]  # fmt: skip
        stale, other = [], None  # epochs an earlier import of it left, older than the export's newest
        for path in held:
            rel = path.relative_to(runs)
            if rel in theirs and filecmp.cmp(theirs[rel], path, shallow=False):
                continue
            older = path.parent.parent == run and epoch_number(path.parent.name) < epoch_number(epoch)
            if rel not in theirs and older:
                stale.append(path)
                continue
            other = path  # Ray's record of a run here, a newer epoch, a --local checkpoint of its own
            break
        if other is not None:
            done.left_out.append(f"{folder.name}: the runs folder holds an interrupted run of it ({other}): "
                                 f"resume it here, or delete {target} and {run} to import the export's")  # fmt: skip
            continue
        for path in stale:
            path.unlink()
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
        written = done.files
        for path, rel in files:
            _copy(path, runs / rel, done)
        if done.files > written or stale:
            done.interrupted.append(f"{folder.relative_to(source / 'stages')} @ {epoch}")
    return done
