"""``s4mim pipeline run``: prepare -> warmup -> train -> evaluate, with caching and resume.

Every stage has a folder ``runs/stages/<preset>/<stage>-<hash>``, the hash covering the config
that shapes the stage's output, the hash of its inputs (manifest content and labeled ids) and a
fingerprint of the code that computes it (``pipeline.fingerprint``); ``hash.json`` in the folder
keeps the three parts, so that ``--dry-run`` can say which one changed when a stage is not cached.
A folder with ``result.json`` is a finished stage and is reported as cached; a folder without it
holds an interrupted stage, which resumes from its last checkpoint. ``--force STAGE`` reruns that
stage and every stage after it from scratch. While a stage runs, its lock in ``runs/stages/.locks`` is
held (``stage_lock``), so that a second s4mim asked to run the same stage stops with a message instead
of training into the same folder, or with ``--wait`` waits for the first to finish.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from data_prep.atomic import write_text_if_changed
from pipeline.config.schema import Config
from pipeline.console import say
from pipeline.errors import UsageError
from pipeline.locks import file_lock, lock_holder, waiting_line
from pipeline.orchestration.hashing import stage_hash, stage_hash_parts
from pipeline.orchestration.results import read_result
from pipeline.paths import is_uri, rank, slug, world_size
from pipeline.training.prepare import Prepared, check_unlabeled, peek_prepared, prepare_stage

STAGES = ("prepare", "warmup", "train", "evaluate")
HASH_FILE = "hash.json"
CACHE_FOLDER = re.compile(r"[a-z]+-[0-9a-f]{12}")  # a cached stage's folder: <stage>-<stage hash>


class Backend(Protocol):
    """Where training and evaluation run: this process, or Ray Train (with MLflow tracking)."""

    def begin(self, config: Config, prepared: Prepared) -> None:
        """Called once the inputs are prepared, before the first stage."""

    def forget(self, config: Config, stage: str, prepared: Prepared) -> None:
        """Drop what a previous run of ``stage`` left, so that it starts from scratch."""

    def run_stage(
        self, config: Config, stage: str, prepared: Prepared, folder: Path, init_checkpoint: Path | None
    ) -> dict:
        """Run ``stage`` to completion, writing ``result.json`` into ``folder``; return the result."""

    def end(self, ok: bool, status: str | None = None) -> str | None:
        """Called at the end (``status`` KILLED for Ctrl-C); returns the tracking parent run id, if any."""


@dataclass
class TrackedRun:
    parent_run_id: str | None = None  # set when the block ends


@contextmanager
def tracked(backend: Backend, config: Config, prepared: Prepared) -> Iterator[TrackedRun]:
    """``backend.begin``, then ``backend.end`` with the block's outcome: finished when it completes,
    KILLED on Ctrl-C, failed on any other exception (which goes on up)."""
    run = TrackedRun()
    backend.begin(config, prepared)
    ok, status = False, None
    try:
        yield run
        ok = True
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.parent_run_id = backend.end(ok, status)


@dataclass
class StageStatus:
    name: str
    status: str  # planned, cached, ran, failed
    folder: Path | None = None
    seconds: float = 0.0
    miou: float | None = None
    detail: str = ""
    result: dict = field(default_factory=dict)  # the stage's result.json, for a stage that ran or is cached


def stage_folder(runs: Path, config: Config, stage: str, inputs_hash: str) -> Path:
    return runs / "stages" / slug(config.preset) / f"{stage}-{stage_hash(config, stage, inputs_hash)}"


def ray_run_folder(folder: Path, runs: Path) -> Path:
    """Where Ray keeps the checkpoints of the stage in ``folder`` (unless ``S4MIM_STORAGE`` moves them): the run
    ``ray_train.run_name`` names ``<preset>-<stage>-<hash>``, the stage folder ``stages/<preset>/<stage>-<hash>``."""
    return runs / "ray" / f"{folder.parent.name}-{folder.name}"


def complete_checkpoint(path: Path) -> bool:
    """A checkpoint file written to its end: ``torch.save`` writes a zip, whose directory comes last."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def epoch_number(name: str) -> int:
    """The epoch of a checkpoint folder's name (``epoch_0003`` -> 3), 0 for any other name."""
    return int(name[len("epoch_") :]) if re.fullmatch(r"epoch_\d+", name) else 0


def resumes(folder: Path, runs: Path) -> str:
    """What an interrupted stage in ``folder`` resumes from, in words: its newest whole epoch under Ray."""
    done = [epoch_number(e.name) for e in ray_run_folder(folder, runs).glob("epoch_*")
            if complete_checkpoint(e / "state.pt")]  # fmt: skip
    return f"resumes after epoch {max(done)}" if done else "resumes"


def open_stage_folder(folder: Path, config: Config, stage: str, inputs_hash: str) -> Path:
    """``folder``, made, with ``hash.json``: what the stage's hash covers, for explaining later misses."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_if_changed(folder / HASH_FILE, json.dumps(stage_hash_parts(config, stage, inputs_hash), indent=2) + "\n")
    return folder


def lock_path(folder: Path) -> Path:
    """``runs/stages/.locks/<stage>-<hash>.lock``: one per stage hash, whichever preset's folder trains it
    (``finished_stage`` lets presets share a stage with the same hash)."""
    return folder.parent.parent / ".locks" / f"{folder.name}.lock"


@contextmanager
def stage_lock(folder: Path, stage: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the stage's lock (``lock_path``) while ``stage`` runs into ``folder``.

    A second process that asks for the same stage fails at once with a ``UsageError`` naming the
    holder, rather than resuming from checkpoints the first run is replacing; with ``wait`` it waits
    until the holder ends (``claimed`` then finds the stage finished, or resumes it if the holder was
    stopped). The lock goes with its holder however it ends (``pipeline.locks``). Under torchrun rank 0
    takes it and tells the other ranks the outcome, so that every rank stops, or goes on, together.
    """
    what, path = f"the {stage} stage", lock_path(folder)
    with ExitStack() as held:
        if world_size() == 1:
            held.enter_context(file_lock(path, what, folder, wait=wait))
        else:
            _lock_for_every_rank(held, path, what, folder, wait)
        yield


RETRY_S = 60  # how often rank 0 of a torchrun launch that waits for a stage tries its lock again


def _lock_for_every_rank(held: ExitStack, path: Path, what: str, folder: Path, wait: bool) -> None:
    """Rank 0 takes the lock into ``held``; every rank learns the outcome, and raises the refusal together.

    The other ranks hear it in a collective, which gives up after the process group's timeout (30
    minutes for gloo, 10 for NCCL): so a rank 0 that waits does not block in the lock but tries again
    every ``RETRY_S`` seconds, and tells the others each time. A lock that cannot be taken at all (an
    unwritable or lock-less runs folder) is told too, rather than leaving the others in the collective."""
    import torch.distributed as dist

    from pipeline.training.distributed import init_distributed

    init_distributed()
    told = False
    while True:
        outcome = None
        if rank() == 0:
            try:
                held.enter_context(file_lock(path, what, folder))
                outcome = "held"
            except UsageError as exc:
                outcome = "retry" if wait else str(exc)
                if wait and not told:
                    say(waiting_line(what, lock_holder(path), folder))
                    told = True
            except OSError as exc:
                outcome = f"cannot lock {what} at {path}: {exc.strerror or exc}; check that the runs folder is writable"
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        if box[0] == "held":
            return
        if box[0] != "retry":
            raise UsageError(box[0])
        time.sleep(RETRY_S)


def why_not_cached(runs: Path, config: Config, stage: str, inputs_hash: str) -> str:
    """Which part of the hash differs from the newest finished run of ``stage`` under this preset."""
    parts = stage_hash_parts(config, stage, inputs_hash)
    earlier = []
    for folder in (runs / "stages" / slug(config.preset)).glob(f"{stage}-*"):
        if CACHE_FOLDER.fullmatch(folder.name) and (folder / "result.json").is_file():  # not evaluate -ckpt...
            earlier.append(((folder / "result.json").stat().st_mtime, folder))
    if not earlier:
        return ""
    newest = max(earlier)[1]
    try:
        before = json.loads((newest / HASH_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return "the cached run predates code fingerprints"
    changed = [name for name in ("config", "inputs", "code") if before.get(name) != parts[name]]
    return f"{', '.join(changed)} changed since {newest.name}" if changed else ""


def finished_stage(runs: Path, config: Config, stage: str, inputs_hash: str) -> tuple[Path, dict | None]:
    """The stage's folder and its result, if it finished. A finished stage with the same hash under
    another preset counts too: the hash covers the config and the inputs, so a sweep's best preset
    reuses the warmup of the preset it came from instead of training the same teacher again."""
    own = stage_folder(runs, config, stage, inputs_hash)
    result = read_result(own)
    if result is None:
        for other in sorted((runs / "stages").glob(f"*/{own.name}")):
            if other != own and (result := read_result(other)) is not None:
                return other, result
    return own, result


def prepare_inputs(config: Config, runs: Path, *, force: bool = False) -> Prepared:
    """The prepare stage, for every command that runs stages. Under torchrun rank 0 prepares first and
    the other ranks, after a barrier, find the data, manifest and split it wrote: were they all to
    generate a missing dataset at once, all but one would fail to move theirs into place."""
    if world_size() > 1:
        import torch.distributed as dist

        from pipeline.training.distributed import init_distributed

        init_distributed()
        if rank() == 0:
            prepare_stage(config, runs, force=force)
        dist.barrier()
        return prepare_stage(config, runs)
    return prepare_stage(config, runs, force=force)


@dataclass
class Claim:
    """A stage a command holds: its cached result, or its lock and the folder it is to run into."""

    stage: str
    folder: Path
    result: dict | None  # the cached result; None when the stage is to run
    forced: bool = False


@contextmanager
def claimed(runs: Path, config: Config, stage: str, prepared: Prepared, *, force: bool = False,
            folder: Path | None = None, wait: bool = False) -> Iterator[Claim]:  # fmt: skip
    """Look ``stage`` up in the cache, and lock it when it is to run; the lock is held for the block.

    The cache is looked at again under the lock: a stage another process was running when this one
    first looked may have finished since. ``force`` runs it whatever the cache holds. ``folder``
    names a folder outside the cache (``evaluate --checkpoint``): the stage always runs there. ``wait``
    waits for another process running the stage, instead of stopping (``stage_lock``).
    """
    own = folder or stage_folder(runs, config, stage, prepared.inputs_hash)
    if folder is None and not force:
        found, result = finished_stage(runs, config, stage, prepared.inputs_hash)
        if result is not None:  # a finished stage is only read: no lock, so runs that share it go side by side
            yield Claim(stage, found, result)
            return
    with stage_lock(own, stage, wait=wait):
        if folder is None and not force:
            found, result = finished_stage(runs, config, stage, prepared.inputs_hash)
            if result is not None:
                yield Claim(stage, found, result)
                return
        yield Claim(stage, own, None, forced=force)


def run_claimed(backend: Backend, config: Config, prepared: Prepared, claim: Claim, init_checkpoint) -> dict:
    """The claimed stage's result: the cached one, or that of running it now into its folder (emptied,
    and its Ray run forgotten, when forced), which gets its ``hash.json`` first."""
    if claim.result is not None:
        say(f"[{claim.stage}] cached: {claim.folder}")
        return claim.result
    if init_checkpoint and not is_uri(init_checkpoint) and not Path(init_checkpoint).exists():
        raise UsageError(
            f"the {claim.stage} stage starts from checkpoint {init_checkpoint}, which is gone and is not in the runs "
            f"folder either: run again with --force on the stage before {claim.stage}"
        )
    if claim.forced:
        shutil.rmtree(claim.folder, ignore_errors=True)
        backend.forget(config, claim.stage, prepared)
    open_stage_folder(claim.folder, config, claim.stage, prepared.inputs_hash)
    say(f"[{claim.stage}] running -> {claim.folder}")
    return backend.run_stage(config, claim.stage, prepared, claim.folder, init_checkpoint)


def forced_stages(force: list[str]) -> set[str]:
    for name in force:
        if name not in STAGES:
            raise UsageError(f"--force {name!r}: not a stage; choose one of: {', '.join(STAGES)}")
    first = min((STAGES.index(n) for n in force), default=len(STAGES))
    return set(STAGES[first:])


def plan(config: Config, runs: Path, force: list[str]) -> list[StageStatus]:
    """What a run would do, without writing anything."""
    forced = forced_stages(force)
    inputs = None if "prepare" in forced else peek_prepared(config, runs)
    statuses = [StageStatus("prepare", "cached" if inputs else "planned")]
    for stage in STAGES[1:]:
        if inputs is None:
            statuses.append(StageStatus(stage, "planned", detail="inputs not prepared yet"))
            continue
        folder, result = finished_stage(runs, config, stage, inputs)
        if result is not None and stage not in forced:
            statuses.append(StageStatus(stage, "cached", folder, miou=_miou(result), result=result))
        else:
            folder = stage_folder(runs, config, stage, inputs)
            if stage in forced:
                detail = "forced"
            elif folder.is_dir():  # an interrupted run of it (with --local, last.pt is in there)
                detail = resumes(folder, runs)
            else:
                detail = why_not_cached(runs, config, stage, inputs)
            statuses.append(StageStatus(stage, "planned", folder, detail=detail))
    return statuses


@dataclass
class PipelineResult:
    statuses: list[StageStatus]
    parent_run_id: str | None


def run_pipeline(config: Config, runs: Path, backend: Backend, *, force: list[str] | None = None,
                 wait: bool = False) -> PipelineResult:  # fmt: skip
    forced = forced_stages(force or [])
    statuses: list[StageStatus] = []
    started = time.perf_counter()
    prepared = prepare_inputs(config, runs, force="prepare" in forced)
    statuses.append(
        StageStatus(
            "prepare",
            "cached" if prepared.cached else "ran",
            seconds=time.perf_counter() - started,
            detail=f"{prepared.labeled} labeled, {prepared.unlabeled} unlabeled, {prepared.val} val",
        )
    )
    if "train" in forced or finished_stage(runs, config, "train", prepared.inputs_hash)[1] is None:
        check_unlabeled(config, prepared)  # before any lock: a refused run writes nothing under runs/stages
    with ExitStack() as held:  # every stage to run is locked before anything is tracked: a refused run leaves no trace
        claims = [
            held.enter_context(claimed(runs, config, stage, prepared, force=stage in forced, wait=wait))
            for stage in STAGES[1:]
        ]
        with tracked(backend, config, prepared) as run:
            checkpoint: str | None = None
            for claim in claims:
                t0 = time.perf_counter()
                result = run_claimed(backend, config, prepared, claim, checkpoint)
                status, seconds = ("cached", 0.0) if claim.result is not None else ("ran", time.perf_counter() - t0)
                statuses.append(StageStatus(claim.stage, status, claim.folder, seconds, _miou(result), result=result))
                checkpoint = result.get("checkpoint", checkpoint)
    return PipelineResult(statuses, run.parent_run_id)


def _miou(result: dict) -> float | None:
    value = result.get("miou", result.get("best_miou"))
    return None if value is None else float(value)


def summary_table(statuses: list[StageStatus]) -> str:
    lines = [f"{'stage':<10} {'status':<8} {'wall time':>10} {'val mIoU':>9}  detail"]
    for s in statuses:
        wall = f"{s.seconds:.1f} s" if s.status == "ran" else "-"
        miou = f"{s.miou:.2f}" if s.miou is not None else "-"
        detail = s.detail or (str(s.folder) if s.folder else "")
        lines.append(f"{s.name:<10} {s.status:<8} {wall:>10} {miou:>9}  {detail}")
    return "\n".join(lines)
