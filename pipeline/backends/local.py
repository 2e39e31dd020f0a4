"""Running a stage in this process, or in every process of a torchrun launch.

    s4mim train shapes-1/8 --local                                # one process
    torchrun --nproc_per_node 2 -m pipeline train shapes-1/8 --local   # DDP, gloo on CPU

Checkpoints go to ``<stage dir>/last.pt`` every epoch (and ``best.pt`` on a new best val mIoU),
written by rank 0 through a temporary file; rerunning the same stage resumes from ``last.pt``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.atomic import atomic_path
from pipeline.console import format_metrics, progress, say
from pipeline.machine import machine, with_earlier
from pipeline.orchestration.results import write_evaluation, write_result
from pipeline.training.distributed import init_distributed
from pipeline.training.stages import EPOCH_KEYS, StageInputs, evaluate, fit


def save_checkpoint(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class LocalContext:
    """Checkpoints in a folder, progress on stdout."""

    def __init__(self, stage: str, folder: Path, rank: int, world_size: int, device: torch.device, epochs: int,
                 extras: dict | None = None):  # fmt: skip
        self.stage, self.folder = stage, Path(folder)
        self.extras = extras if extras is not None else {}  # the dict every checkpoint stores (StageInputs.extras)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.epochs = epochs
        self.started = time.perf_counter()
        self.bar = None  # the progress of the loop that runs

    def restore(self) -> dict | None:
        last = self.folder / "last.pt"
        if not last.is_file():
            return None
        state = torch.load(last, map_location="cpu", weights_only=False)
        say(f"[{self.stage}] resuming after epoch {state['epoch'] + 1} from {last}")
        # the machines that trained the epochs before this one (numerics differ from CPU to CPU)
        self.extras["machines"] = with_earlier(self.extras.get("machines", []), state)
        return state

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass  # the progress bar and the epoch lines are the console's; trackers log steps

    def progress(self, label: str, done: int, total: int, detail: str = "") -> None:
        if self.rank != 0:
            return
        if self.bar is None or self.bar.label != label:
            self.bar = progress(label, final=False)
        self.bar(done, total, detail)

    def report(self, metrics: dict[str, float], state: dict, *, epoch: int, best: bool) -> None:
        if self.rank == 0:
            save_checkpoint(state, self.folder / "last.pt")
            if best:
                with atomic_path(self.folder / "best.pt") as tmp:
                    shutil.copyfile(self.folder / "last.pt", tmp)
        elapsed = time.perf_counter() - self.started
        say(f"[{self.stage}] epoch {epoch + 1}/{self.epochs}  {format_metrics(metrics, EPOCH_KEYS)}  ({elapsed:.0f} s)")
        if dist.is_initialized():
            dist.barrier()


def run_training(config, stage: str, prepared, folder: Path, init_checkpoint: Path | None, extras=None) -> dict:
    """Train ``stage`` in this process (every torchrun process calls it); rank 0 writes the result."""
    rank, world, device = init_distributed()
    schedule = config.warmup if stage == "warmup" else config.train
    # rank 0's machine (under torchrun across nodes, the others' are not asked), and those of resumed epochs
    extras = {**(extras or {}), "machines": [machine()]}
    ctx = LocalContext(stage, folder, rank, world, device, schedule.epochs, extras)
    inputs = StageInputs(prepared.manifest, prepared.split_dir, init_checkpoint, extras)
    result = fit(config, stage, inputs, ctx)
    best = folder / "best.pt"
    result["checkpoint"] = str(best if best.is_file() else folder / "last.pt")
    result["machines"] = extras["machines"]
    if rank == 0:
        write_result(folder, result)
    return result


def run_evaluation(config, prepared, folder: Path, checkpoint: Path) -> dict:
    rank, world, device = init_distributed()
    started = time.perf_counter()
    evaluation = evaluate(config, StageInputs(prepared.manifest, prepared.split_dir, checkpoint), device, rank, world)
    result = {}
    if rank == 0:
        result = write_evaluation(folder, evaluation, checkpoint)
        seconds = time.perf_counter() - started
        say(f"[evaluate] mIoU {evaluation.miou:.2f} on {len(evaluation.iou)} classes ({seconds:.0f} s)")
    return result


class LocalBackend:
    """Runs stages in this process (no Ray, no tracking): for torchrun and for debugging."""

    def begin(self, config, prepared) -> None:
        pass

    def forget(self, config, stage: str, prepared) -> None:
        pass  # the orchestrator already removed the stage folder, which holds the checkpoints

    def run_stage(self, config, stage: str, prepared, folder: Path, init_checkpoint: str | None) -> dict:
        init = Path(init_checkpoint) if init_checkpoint else None
        if stage == "evaluate":
            return run_evaluation(config, prepared, folder, init)
        return run_training(config, stage, prepared, folder, init)

    def end(self, ok: bool, status: str | None = None) -> None:
        return None
