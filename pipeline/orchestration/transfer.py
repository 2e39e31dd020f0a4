"""``s4mim runs export`` / ``runs import``: a runs folder's finished stages, small enough to keep or send.

An export holds what the stage cache needs to count each finished stage as done, and what a results
table reads: every finished stage's ``result.json`` and ``hash.json`` (and evaluate's ``iou.csv``),
the prepared manifests and splits, and the warmup teachers' checkpoints, from which the train stages
still to run start. The train stages' checkpoints stay behind (they are the bulk of a runs folder and
nothing cached needs them). Imported into another runs folder, on another machine or after this one's
runs folder is gone, the same command finds those stages cached, writes the same tables, and trains
only what is missing.

Both directions copy file by file through a temporary file and a rename, never replace a file that
the target already holds with the same bytes, and copy each stage's ``result.json`` after its other
files: a copy cut short leaves no stage counted as finished without its checkpoint. ``import`` never
overwrites a file the runs folder has; ``export`` brings the export up to date with the runs folder.
An export's ``exports.json`` lists each export made into it: when, which stages it added, and the
CPU and torch of the machine it was made on.
"""

from __future__ import annotations

import filecmp
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_path, write_text
from pipeline.errors import UsageError
from pipeline.orchestration.orchestrate import CACHE_FOLDER
from pipeline.orchestration.results import read_result

RECORD_FILES = ("hash.json", "iou.csv", "result.json")  # result.json last: it marks the stage finished
PREPARED_FOLDERS = ("manifests", "splits")
LOG = "exports.json"


@dataclass
class Transfer:
    stages: list[str] = field(default_factory=list)  # <preset>/<stage folder> of each stage copied
    files: int = 0  # files written
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # why a finished stage's checkpoint was left out


def finished_stages(runs: Path) -> Iterator[tuple[Path, dict]]:
    """Each finished stage folder under ``runs/stages`` (``<preset>/<stage>-<hash>``) and its result."""
    for folder in sorted((runs / "stages").glob("*/*")):
        if folder.is_dir() and CACHE_FOLDER.fullmatch(folder.name):
            result = read_result(folder)
            if result is not None:
                yield folder, result


def _copy(source: Path, target: Path, done: Transfer, *, overwrite: bool) -> None:
    if target.exists() and (not overwrite or filecmp.cmp(source, target, shallow=False)):
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    done.files += 1
    done.bytes += source.stat().st_size


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


def _teacher_files(runs: Path, folder: Path, result: dict) -> tuple[list[Path], str | None]:
    """The files of a finished warmup's checkpoint, or why they cannot be exported."""
    checkpoint = result.get("checkpoint")
    if not isinstance(checkpoint, str):
        return [], None
    path = Path(checkpoint)
    if not path.exists():
        return [], f"{folder.name}: its checkpoint {checkpoint} is gone"
    if not path.resolve().is_relative_to(runs.resolve()):
        return [], f"{folder.name}: its checkpoint {checkpoint} lies outside the runs folder"
    return ([path] if path.is_file() else _files_under(path)), None


def export_runs(runs: Path, dest: Path) -> Transfer:
    """Bring ``dest`` up to date with the finished stages of ``runs``."""
    runs, dest = Path(runs), Path(dest)
    stages = list(finished_stages(runs))
    if not stages:
        raise UsageError(f"{runs} holds no finished stage: point S4MIM_RUNS at the runs folder to export")
    if dest.resolve().is_relative_to(runs.resolve()) or runs.resolve().is_relative_to(dest.resolve()):
        raise UsageError(f"{dest}: export into a folder outside the runs folder {runs}")
    done = Transfer()
    for name in PREPARED_FOLDERS:
        for path in _files_under(runs / name):
            _copy(path, dest / path.relative_to(runs), done, overwrite=True)
    for folder, result in stages:
        written = done.files
        if folder.name.startswith("warmup-"):
            files, why = _teacher_files(runs, folder, result)
            if why:
                done.skipped.append(why)
            for path in files:
                _copy(path, dest / path.resolve().relative_to(runs.resolve()), done, overwrite=True)
        for name in RECORD_FILES:
            if (folder / name).is_file():
                _copy(folder / name, dest / folder.relative_to(runs) / name, done, overwrite=True)
        if done.files > written:
            done.stages.append(str(folder.relative_to(runs / "stages")))
    if done.files:
        _log_export(dest, done)
    return done


def _log_export(dest: Path, done: Transfer) -> None:
    log = dest / LOG
    try:
        entries = json.loads(log.read_text()) if log.is_file() else []
    except json.JSONDecodeError:
        entries = []
    entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                    "stages": done.stages})  # fmt: skip
    write_text(log, json.dumps(entries, indent=1) + "\n")


def machine() -> str:
    """The CPU and torch build of this machine: the same code can train differently on another CPU."""
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels)")  # fmt: skip


def import_runs(source: Path, runs: Path) -> Transfer:
    """Copy into ``runs`` whatever of the export ``source`` it does not hold yet."""
    source, runs = Path(source), Path(runs)
    results = sorted((source / "stages").glob("*/*/result.json"))
    if not results:
        raise UsageError(f"{source} is not an export of finished stages (no stages/<preset>/<stage>/result.json "
                         "in it): make one with 's4mim runs export FOLDER'")  # fmt: skip
    done = Transfer()
    for path in _files_under(source):
        if path.name != "result.json" and path.name != LOG:
            _copy(path, runs / path.relative_to(source), done, overwrite=False)
    for path in results:  # last: each marks its stage finished
        target = runs / path.relative_to(source)
        if not target.exists():
            _copy(path, target, done, overwrite=False)
            done.stages.append(str(path.parent.relative_to(source / "stages")))
    return done
