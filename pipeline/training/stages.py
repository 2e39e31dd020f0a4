"""The stages of the pipeline, each reading top to bottom: config -> data -> model -> engine -> report.

- ``prepare``: manifest and split files;
- ``warmup``: supervised training on the labeled split, producing the teacher checkpoint;
- ``train``: semi-supervised training (the config's variant) from the teacher;
- ``evaluate``: mIoU, per-class IoU table and a picture grid, from the best train checkpoint.

A training stage talks to the world only through a ``StageContext``: where it resumes from, where
step metrics go, and what happens to each epoch's report and checkpoint. ``pipeline.backends.local``
provides one for a plain process (or torchrun), ``pipeline.backends.ray_train`` one for Ray Train.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data_prep.augment import denormalize
from data_prep.datasets import (
    EvalDataset,
    LabeledDataset,
    ShardedSampler,
    UnlabeledDataset,
    eval_indices,
    size_grouped_batches,
)
from data_prep.manifest import Manifest
from data_prep.splits import Split, read_split
from data_prep.workers import ignore_interrupts, interrupts_held
from model.masking import apply_patch_mask, patch_mask
from pipeline.config.schema import Config
from pipeline.console import counted
from pipeline.training.engine import Engine, build_model, load_weights, rng_state, set_rng_state
from pipeline.training.inference import Inference
from pipeline.training.metrics import iou_per_class, mean_iou
from pipeline.training.optimization import is_distributed

# What each epoch's console line shows, when a stage reports it.
EPOCH_KEYS = ("train/loss", "train/loss_x", "train/loss_s", "train/loss_cmim", "train/loss_fa", "train/loss_smim",
              "train/mask_ratio", "train/img_per_s", "val/miou")  # fmt: skip

TRAINING_STAGES = ("warmup", "train")


class StageContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> dict | None:
        """The last checkpoint state of this stage run, or None for a fresh start."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Step metrics (rank 0's are the ones that count)."""

    def report(self, metrics: dict[str, float], state: dict, *, epoch: int, best: bool) -> None:
        """End of an epoch: every rank calls it; rank 0's ``state`` is the checkpoint."""

    def progress(self, label: str, done: int, total: int, detail: str = "") -> None:
        """Where a long loop stands (``done`` of ``total`` steps or batches), for the console."""


@dataclass
class StageInputs:
    manifest: Path
    split_dir: Path
    init_checkpoint: Path | None = None  # teacher weights for ``train``; the model to score for ``evaluate``
    extras: dict = field(default_factory=dict)  # stored in every checkpoint (e.g. the MLflow run id)


@dataclass
class TrainData:
    """Loaders of one rank and the number of steps in an epoch."""

    steps: int
    labeled: DataLoader
    unlabeled: DataLoader | None
    partner: DataLoader | None
    val: DataLoader

    def set_epoch(self, epoch: int) -> None:
        for loader in (self.labeled, self.unlabeled, self.partner):
            if loader is not None:
                loader.sampler.set_epoch(epoch)

    def batches(self):
        if self.unlabeled is None:
            return ((labeled, None, None) for labeled in self.labeled)
        partner = self.partner if self.partner is not None else iter(lambda: None, 0)
        return zip(self.labeled, self.unlabeled, partner)


class Loader(DataLoader):
    """A DataLoader whose worker processes start with Ctrl-C held (``data_prep.workers``): a key pressed
    while they fork stops the run, instead of being lost in fork's hooks or killing a worker half-started."""

    def __iter__(self):
        with interrupts_held():
            return super().__iter__()


def _rows(manifest: Manifest, ids: list[str]) -> list[dict]:
    by_id = {r["id"]: r for r in manifest.rows()}
    return [by_id[i] for i in ids]


def build_data(
    config: Config, manifest: Manifest, split: Split, variant: str, rank: int, world: int, steps: int | None = None
) -> TrainData:
    d = config.data
    batch = d.batch_size
    semi = variant != "supervised"
    pool = len(split.unlabeled) if semi else len(split.labeled)
    steps = steps or max(1, pool // (batch * world))
    per_rank = steps * batch
    gen = torch.Generator().manual_seed(config.seed)

    def loader(dataset, stream: int) -> DataLoader:
        sampler = ShardedSampler(len(dataset), per_rank, rank=rank, world=world, seed=config.seed, stream=stream)
        return Loader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=d.loader_workers,
            persistent_workers=d.loader_workers > 0,  # the sampler re-seeds each epoch in this process
            drop_last=True,
            generator=gen,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_interrupts,
        )

    labeled = loader(
        LabeledDataset(_rows(manifest, split.labeled), d.crop, d.scale_range, manifest.label_lut, d.pad), 0
    )
    unlabeled = partner = None
    if semi:
        u_rows = _rows(manifest, split.unlabeled)
        u = config.unimatch
        strong = {"jitter": u.strong_jitter, "jitter_p": u.strong_jitter_p, "grayscale_p": u.strong_grayscale_p,
                  "blur_sigma": u.strong_blur_sigma, "blur_p": u.strong_blur_p}  # fmt: skip

        def make(truth: bool) -> UnlabeledDataset:
            return UnlabeledDataset(u_rows, d.crop, d.scale_range, u.cutmix_p, strong, d.pad, truth, manifest.label_lut)

        # Masks of unlabeled images only measure the pseudo labels (train/pseudo_acc); no loss reads them.
        truth = config.tracking.pseudo_acc and all(r["mask"] is not None for r in u_rows)
        unlabeled = loader(make(truth), 1)
        if config.unimatch.cutmix_source == "batch":
            partner = loader(make(False), 2)
    val = val_loader(config, manifest, split, rank, world)
    return TrainData(steps, labeled, unlabeled, partner, val)


def val_loader(config: Config, manifest: Manifest, split: Split, rank: int, world: int) -> DataLoader:
    """This rank's share of the val set, equal-size images batched together."""
    return loader_over(EvalDataset(_rows(manifest, split.val), manifest.label_lut), config, rank, world)


def loader_over(val_set: EvalDataset, config: Config, rank: int, world: int) -> DataLoader:
    """This rank's share of ``val_set``, equal-size images batched together."""
    batches = size_grouped_batches(val_set.rows, eval_indices(len(val_set), rank, world), config.data.batch_size)
    workers = min(config.data.loader_workers, 2)
    return Loader(val_set, batch_sampler=batches, num_workers=workers, worker_init_fn=ignore_interrupts)


def epoch_matched_steps(steps_per_epoch: int, split: Split, images_per_step: int) -> int:
    """The supervised steps that cover the labeled set as often as ``steps_per_epoch`` semi-supervised steps
    cover the unlabeled set: the epoch-matched protocol of UniMatch's supervised baseline."""
    labeled_pass = max(1, len(split.labeled) // images_per_step)
    unlabeled_pass = max(1, len(split.unlabeled) // images_per_step)
    return max(1, round(steps_per_epoch * labeled_pass / unlabeled_pass))


def gather(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_state(path: Path) -> dict:
    """A checkpoint file, or a Ray Train checkpoint folder holding ``state.pt``."""
    path = Path(path)
    return torch.load(path / "state.pt" if path.is_dir() else path, map_location="cpu", weights_only=False)


def fit(config: Config, stage: str, inputs: StageInputs, ctx: StageContext) -> dict:
    """Train ``stage`` (warmup or train) to its last epoch, resuming where the context says."""
    started = time.perf_counter()
    variant = "supervised" if stage == "warmup" else config.variant
    schedule = config.warmup if stage == "warmup" else config.train
    torch.manual_seed(config.seed)

    manifest = Manifest.read(inputs.manifest)
    split = read_split(inputs.split_dir)
    steps_per_epoch = schedule.steps_per_epoch
    if stage == "train" and config.train.match == "epochs" and steps_per_epoch is not None:
        steps_per_epoch = epoch_matched_steps(steps_per_epoch, split, config.data.batch_size * ctx.world_size)
    data = build_data(config, manifest, split, variant, ctx.rank, ctx.world_size, steps_per_epoch)

    model = build_model(config, manifest.num_classes, reconstruction="cmim" in config.terms(variant))
    if inputs.init_checkpoint is not None:
        load_weights(model, load_state(inputs.init_checkpoint)["engine"]["model"])

    engine = Engine(
        model, config, manifest.num_classes, ctx.device,
        variant=variant, total_steps=schedule.epochs * data.steps, lr=schedule.lr,
    )  # fmt: skip
    torch.manual_seed(config.seed + 7919 * ctx.rank)  # ranks draw their own masks and dropout
    start_epoch, best_miou, last, curve, history = 0, -1.0, {}, [], []
    state = ctx.restore()
    if state is not None:
        engine.load_state_dict(state["engine"])
        set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
        start_epoch, best_miou = state["epoch"] + 1, state["best_miou"]
        last, curve, history = state.get("metrics", {}), state.get("curve", []), state.get("history", [])

    epoch_seconds = []
    for epoch in range(start_epoch, schedule.epochs):
        epoch_started = time.perf_counter()
        data.set_epoch(epoch)
        grad_norm_every = config.tracking.grad_norm_every if len(engine.terms) > 1 else 0
        steps = EpochProgress(ctx, f"[{stage}] epoch {epoch + 1}/{schedule.epochs}")
        batches = counted(data.batches(), data.steps, steps)
        metrics = engine.train_epoch(batches, data.steps, on_log=steps.log, grad_norm_every=grad_norm_every)
        metrics["epoch"] = epoch + 1
        history = [*history, epoch_diagnostics(metrics, steps.grad_norms, epoch + 1, engine.step)]
        is_best = False
        if (epoch + 1) % schedule.eval_every == 0 or epoch + 1 == schedule.epochs:
            val = counted(data.val, len(data.val), partial(ctx.progress, f"[{stage}] val batches"))
            confusion = engine.inference.confusion(val, config.eval.mode, config.eval_crop, config.eval.stride)
            metrics["val/miou"] = mean_iou(confusion)
            is_best = metrics["val/miou"] > best_miou
            best_miou = max(best_miou, metrics["val/miou"])
            curve = [*curve, {"epoch": epoch + 1, "step": engine.step, "val/miou": metrics["val/miou"]}]
        metrics["val/best_miou"] = best_miou
        checkpoint = {
            "engine": engine.state_dict(),
            "rng": gather(rng_state()),
            "epoch": epoch,
            "best_miou": best_miou,
            "metrics": metrics,
            "curve": curve,
            "history": history,
            "stage": stage,
            "variant": variant,
            "config": config.model_dump(mode="json"),
            "manifest_hash": manifest.content_hash,
            "classes": list(manifest.classes),
            **inputs.extras,
        }
        ctx.report(metrics, checkpoint, epoch=epoch, best=is_best)
        epoch_seconds.append(time.perf_counter() - epoch_started)
        last = metrics
    return {
        "stage": stage,
        "variant": variant,
        "best_miou": best_miou,
        "metrics": last,
        "epochs": schedule.epochs,
        "steps_per_epoch": data.steps,
        "curve": curve,  # val mIoU at each evaluation, with the step it came after
        "history": history,  # each epoch's diagnostics (epoch_diagnostics)
        "epoch_seconds": epoch_seconds,
        "seconds": time.perf_counter() - started,
        "parameters": gather(parameter_digest(engine.model)),  # one per rank: DDP keeps them equal
    }


DIAGNOSTICS = ("train/mask_ratio", "train/pseudo_acc", "train/pseudo_acc_confident")


def epoch_diagnostics(metrics: dict, grad_norms: dict[str, list[float]], epoch: int, step: int) -> dict:
    """What one epoch says about how training went: the epoch means of the pseudo-label diagnostics and
    the mean of each ``train/grad_norm/<term>`` the epoch measured (the stage result keeps one per epoch,
    so that a report needs no tracking server to read them)."""
    out = {"epoch": epoch, "step": step}
    out |= {key: metrics[key] for key in DIAGNOSTICS if key in metrics}
    out |= {key: sum(values) / len(values) for key, values in sorted(grad_norms.items()) if values}
    return out


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of the model's parameters (names, shapes and values), to tell whether two copies agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class EpochProgress:
    """An epoch's steps for ``ctx.progress``, with the running loss ``ctx.log`` was last given; it also
    keeps the epoch's gradient-norm measurements (``grad_norms``)."""

    def __init__(self, ctx: StageContext, label: str):
        self.ctx, self.label, self.loss = ctx, label, None
        self.grad_norms: dict[str, list[float]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.loss = metrics.get("train/loss", self.loss)
        for key, value in metrics.items():
            if key.startswith("train/grad_norm/"):
                self.grad_norms.setdefault(key, []).append(value)
        self.ctx.log(metrics, step)

    def __call__(self, done: int, total: int) -> None:
        self.ctx.progress(self.label, done, total, f"loss {self.loss:.3f}" if self.loss is not None else "")


@dataclass
class Evaluation:
    miou: float
    iou: dict[str, float]  # per class, NaN where the class occurs nowhere
    table_csv: str
    grid_png: bytes
    confusion: torch.Tensor


def evaluate(
    config: Config, inputs: StageInputs, device: torch.device, rank: int = 0, world: int = 1, progress=None
) -> Evaluation:
    """Score the checkpoint at ``inputs.init_checkpoint`` on the val set; every rank calls it.
    ``progress(done, total)`` hears where the loop over the val batches stands."""
    manifest = Manifest.read(inputs.manifest)
    split = read_split(inputs.split_dir)
    state = load_state(inputs.init_checkpoint)
    weights = state["engine"]["model"]
    has_head = any(k.startswith("reconstruction_head.") for k in weights)
    model = build_model(config, manifest.num_classes, reconstruction=has_head)
    load_weights(model, weights)
    inference = Inference(model, manifest.num_classes, device, amp=config.optim.amp,
                          channels_last=config.optim.channels_last)  # fmt: skip
    val_set = EvalDataset(_rows(manifest, split.val), manifest.label_lut)
    loader = loader_over(val_set, config, rank, world)
    if progress is not None:
        loader = counted(loader, len(loader), progress)
    confusion = inference.confusion(loader, config.eval.mode, config.eval_crop, config.eval.stride)
    ious = iou_per_class(confusion)
    per_class = {name: float(v) * 100 for name, v in zip(manifest.classes, ious)}
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["class", "iou", "pixels"])
    for (name, value), pixels in zip(per_class.items(), confusion.sum(1).tolist()):
        writer.writerow([name, f"{value:.2f}", pixels])
    grid = picture_grid(inference, val_set, config, has_head, manifest.classes) if rank == 0 else b""
    return Evaluation(mean_iou(confusion), per_class, table.getvalue(), grid, confusion.cpu())


@torch.no_grad()
def picture_grid(
    inference: Inference, val_set: EvalDataset, config: Config, has_head: bool, classes: list[str]
) -> bytes:
    """PNG rows of image | ground truth | prediction | reconstruction of a patch-masked copy, titled, with a
    legend of the class colours (``pipeline.training.pictures``)."""
    from pipeline.training.pictures import figure_png, grid_figure

    gen = torch.Generator().manual_seed(config.seed)
    rows = []
    for index in range(min(config.eval.grid_images, len(val_set))):
        sample = val_set[index]
        image = sample["image"][None]
        pred = inference.scores(image, config.eval.mode, config.eval_crop, config.eval.stride).argmax(1)[0]
        recon = None
        if has_head:
            h, w = image.shape[-2:]
            masked = patch_mask(1, h, w, config.mim.patch, config.mim.ratio, generator=gen)
            out = inference.model(apply_patch_mask(image, masked).to(inference.device), need_reconstruction=True)
            recon = denormalize(out.reconstruction[0].float().cpu())
        rows.append({"image": denormalize(image[0]), "label": sample["label"], "pred": pred.cpu(), "recon": recon})
    if not rows:
        return b""
    return figure_png(grid_figure(rows, list(classes), has_head))
