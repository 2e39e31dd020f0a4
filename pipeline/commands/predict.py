"""``s4mim predict``: apply a trained model to images, in this process or across a Ray cluster.

    s4mim predict shapes-1/8 data/shapes/JPEGImages --out preds --overlay      # a preset's latest train stage
    s4mim predict runs/stages/shapes-1_8/train-0123abcd4567 photo.jpg --out preds
    s4mim predict models:/s4mim-shapes/1 images/ --out preds --confidence      # a registered model version
    RAY_ADDRESS=head:6379 s4mim predict models:/s4mim-voc@champion /nfs/images --out /nfs/preds --workers 8

Each image gets a palette PNG of class indices under its own name (relative to the folder it was
found in), optionally a colour overlay (``overlay/``) and the max-probability map
(``confidence/``); ``predictions.csv`` holds each image's class pixel shares. The scores are those
``evaluate`` computes: the same decoding, normalisation and evaluation mode.

On a Ray cluster the images are sharded with Ray Data: ``map_batches`` over an actor pool, each
actor loading the model once (on a GPU where the cluster has them) and writing its images'
outputs itself, so ``--out`` must be a folder every node reaches.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.atomic import atomic_path
from data_prep.errors import DataError
from data_prep.palette import voc_palette
from data_prep.readers import IMAGE_SUFFIXES
from pipeline.errors import UsageError

MODES = ("original", "sliding_window")
STATE_NAMES = ("state.pt", "best.pt", "last.pt")


# -- which model ---------------------------------------------------------------------------------


def resolve_checkpoint(spec: str, runs: Path, tracking_uri: str | None = None) -> Path:
    """The checkpoint file MODEL names: a file, a stage or checkpoint folder, a preset, or an MLflow URI."""
    if spec.startswith(("models:/", "runs:/")):
        return _from_mlflow(spec, tracking_uri)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix != ".json":
        return path
    if path.is_dir():
        return _from_folder(path)
    return _from_preset(spec, runs)


def _from_folder(folder: Path) -> Path:
    from pipeline.orchestration.results import read_result

    checkpoint = (read_result(folder) or {}).get("checkpoint")
    if checkpoint:
        found = Path(checkpoint)
        if not found.exists():
            raise UsageError(
                f"{folder} is a finished stage, but its checkpoint {found} is gone and is not in the runs "
                f"folder either; pass a checkpoint file, or run the stage again with --force"
            )
        return found / "state.pt" if found.is_dir() else found
    for name in STATE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise UsageError(f"{folder} holds no checkpoint ({', '.join(STATE_NAMES)}) and no finished stage (result.json)")


def _from_preset(spec: str, runs: Path) -> Path:
    from pipeline.config.presets import load_preset
    from pipeline.paths import slug

    try:
        config = load_preset(spec)
    except UsageError:
        raise UsageError(
            f"MODEL {spec!r} is not a checkpoint, a stage folder, a preset or an MLflow model URI "
            "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model)"
        ) from None
    finished = sorted(
        (p.stat().st_mtime, p.parent) for p in (runs / "stages" / slug(config.preset)).glob("train-*/result.json")
    )
    if not finished:
        raise UsageError(f"no finished train stage for {config.preset} under {runs}; run 's4mim pipeline run {spec}'")
    return _from_folder(finished[-1][1])


def _from_mlflow(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    from pipeline.tracking.runs import check_tracking_uri, using_tracking_uri
    from pipeline.tracking.runs import tracking_uri as resolve

    store = resolve(None, tracking_uri)
    check_tracking_uri(store)
    try:
        with using_tracking_uri(store):
            download = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="s4mim-"))
        local = Path(download)
    except Exception as exc:  # MlflowException: unknown name, version or alias
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot load {uri} from {store}: {message}; s4mim runs compare lists models") from None
    found = sorted(local.rglob("state.pt"))
    if not found:
        raise UsageError(f"{uri} holds no s4mim checkpoint (extra_files/state.pt); was it logged by s4mim?")
    return found[0]


# -- which images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path  # the input image
    name: str  # output name, relative to --out, without suffix


def collect_inputs(inputs: list[Path]) -> list[Item]:
    """Image files, and the images in folders (recursively); output names keep the folder layout."""
    items: list[Item] = []
    for given in inputs:
        given = Path(given).expanduser()
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES_ANY)
            items += [Item(p.absolute(), p.relative_to(given).with_suffix("").as_posix()) for p in files]
        elif given.is_file():
            items.append(Item(given.absolute(), given.stem))
        else:
            raise UsageError(f"input {given}: no such file or folder")
    if not items:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES_ANY)}) in {', '.join(map(str, inputs))}")
    names: dict[str, Path] = {}
    for item in items:
        if item.name in names:
            raise UsageError(f"{names[item.name]} and {item.path} would both write {item.name}.png; predict them apart")
        names[item.name] = item.path
    return items


IMAGE_SUFFIXES_ANY = (*IMAGE_SUFFIXES, ".tif", ".tiff", ".webp")
SKIP_HINT = "remove it, or pass --skip-bad to leave unreadable images out"


def check_inputs(items: list[Item]) -> None:
    """Fail before any output when an input is not an image at all (its header, not its pixels),
    naming the first such file and how many more there are."""
    from data_prep.decode import check_image_header

    bad = []
    for item in items:
        try:
            check_image_header(item.path)
        except DataError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 1} more unreadable image(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; nothing was written: {SKIP_HINT}")


# -- the model at work ---------------------------------------------------------------------------


class Predictor:
    """A trained model on a device, scoring images as ``evaluate`` does."""

    def __init__(self, state: dict, device: str = "auto", amp: bool = False, mode: str | None = None):
        from pipeline.config.schema import Config
        from pipeline.training.engine import build_model, load_weights
        from pipeline.training.inference import Inference

        config = Config.model_validate(state["config"])
        if amp:
            config = config.model_copy(update={"optim": config.optim.model_copy(update={"amp": "bf16"})})
        self.classes = list(state["classes"])
        self.mode = mode or (config.eval.mode if config.eval.mode in MODES else "original")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device here; use --device cpu")
        model = build_model(config, len(self.classes), reconstruction=False)
        try:
            load_weights(model, state["engine"]["model"])
        except RuntimeError as exc:
            raise UsageError(f"{exc}; the checkpoint comes from a model this s4mim cannot build") from None
        self.inference = Inference(model, len(self.classes), torch.device(device), amp=config.optim.amp,
                                   channels_last=config.optim.channels_last)  # fmt: skip
        self.crop, self.stride = config.eval_crop, config.eval.stride

    def __call__(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (3, H, W) images of one size -> (class index uint8 (H, W), max probability (H, W)) each."""
        from data_prep.augment import normalize

        batch = torch.stack([normalize(image) for image in images])
        scores = self.inference.scores(batch, self.mode, self.crop, self.stride)  # (B, K, H, W)
        probs = scores if self.mode == "sliding_window" else scores.softmax(dim=1)  # sliding: already averaged
        confidence, label = probs.max(dim=1)
        return [(label[i].to(torch.uint8).cpu(), confidence[i].float().cpu()) for i in range(len(images))]


def load_predictor(checkpoint: Path, device: str, amp: bool, mode: str | None) -> Predictor:
    from pipeline.training.stages import load_state

    return Predictor(load_state(checkpoint), device, amp, mode)


# -- outputs -------------------------------------------------------------------------------------


def _png(array: np.ndarray, mode: str, palette: list[int] | None = None) -> bytes:
    from PIL import Image

    img = Image.fromarray(array, mode=mode)
    if palette is not None:
        img.putpalette(palette)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_outputs(out: Path, name: str, image: torch.Tensor, label: torch.Tensor, confidence: torch.Tensor,
                  *, overlay: bool, with_confidence: bool) -> None:  # fmt: skip
    """The palette mask ``<name>.png``, and ``overlay/<name>.png`` and ``confidence/<name>.png`` if asked."""
    palette = voc_palette()
    files = {out / f"{name}.png": _png(label.numpy(), "P", palette)}
    if overlay:
        colours = torch.tensor(palette, dtype=torch.float32).view(256, 3)[label.long()]  # (H, W, 3)
        blend = 0.5 * image.permute(1, 2, 0).float() + 0.5 * colours
        files[out / "overlay" / f"{name}.png"] = _png(blend.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")
    if with_confidence:
        grey = (confidence * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        files[out / "confidence" / f"{name}.png"] = _png(grey, "L")
    for path, data in files.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


def class_shares(label: torch.Tensor, num_classes: int) -> list[float]:
    counts = torch.bincount(label.flatten().long(), minlength=num_classes)[:num_classes]
    return (counts.double() / max(1, label.numel())).tolist()


@dataclass
class Options:
    out: Path
    overlay: bool = False
    confidence: bool = False
    skip_bad: bool = False
    batch_size: int = 4


def _predict_items(predictor: Predictor, items: list[Item], options: Options, progress=None) -> list[dict]:
    """Predict and write ``items`` in batches of equal-size images; one row per image (or per bad one)."""
    from data_prep.decode import read_image

    rows: list[dict] = []
    pending: list[tuple[Item, torch.Tensor]] = []

    def flush() -> None:
        outputs = predictor([image for _, image in pending])
        for (item, image), (label, confidence) in zip(pending, outputs):
            write_outputs(options.out, item.name, image, label, confidence,
                          overlay=options.overlay, with_confidence=options.confidence)  # fmt: skip
            rows.append({"item": item, "height": label.shape[0], "width": label.shape[1],
                         "shares": class_shares(label, len(predictor.classes))})  # fmt: skip
        pending.clear()
        if progress is not None:
            progress(len(rows), len(items))

    for item in items:
        try:
            image = read_image(item.path)
        except DataError as exc:
            if not options.skip_bad:
                raise DataError(f"{exc}; {SKIP_HINT}") from None
            rows.append({"item": item, "error": str(exc)})
            continue
        if pending and (len(pending) == options.batch_size or pending[0][1].shape != image.shape):
            flush()
        pending.append((item, image))
    if pending:
        flush()
    return rows


def write_table(out: Path, rows: list[dict], classes: list[str]) -> Path:
    path = out / "predictions.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "mask", "height", "width", *classes])
    for row in rows:
        if "error" not in row:
            shares = [f"{share:.6f}" for share in row["shares"]]
            writer.writerow([str(row["item"].path), f"{row['item'].name}.png", row["height"], row["width"], *shares])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


# -- on a Ray cluster ----------------------------------------------------------------------------


class _RayPredictor:
    """A Ray Data actor: loads the model once, then predicts and writes each batch of image paths."""

    def __init__(self, state_ref: list, device: str, amp: bool, mode: str | None, options: dict, threads: int):
        import ray

        torch.set_num_threads(max(1, threads))
        self.predictor = Predictor(ray.get(state_ref[0]), device, amp, mode)
        self.options = Options(out=Path(options["out"]), **{k: v for k, v in options.items() if k != "out"})

    def __call__(self, batch: dict) -> dict:
        items = [Item(Path(p), n) for p, n in zip(batch["path"], batch["name"])]
        rows = _predict_items(self.predictor, items, self.options)
        by_name = {row["item"].name: row for row in rows}
        ordered = [by_name[item.name] for item in items]
        return {
            "name": np.array([item.name for item in items]),
            "height": np.array([row.get("height", 0) for row in ordered]),
            "width": np.array([row.get("width", 0) for row in ordered]),
            "shares": np.array([json.dumps(row.get("shares")) for row in ordered]),
            "error": np.array([row.get("error", "") for row in ordered]),
        }


def predict_on_ray(state: dict, items: list[Item], options: Options, *, workers: int, device: str, amp: bool,
                   mode: str | None, address: str | None) -> list[dict]:  # fmt: skip
    import ray

    from pipeline.backends.ray_train import connect
    from pipeline.console import say

    say(connect(address))
    gpus = ray.cluster_resources().get("GPU", 0) >= workers and device != "cpu"
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // workers)) if not gpus else 1
    dataset = ray.data.from_items([{"path": str(i.path), "name": i.name} for i in items])
    predicted = dataset.map_batches(
        _RayPredictor,
        fn_constructor_kwargs={
            "state_ref": [ray.put(state)], "device": "cuda" if gpus else "cpu", "amp": amp, "mode": mode,
            "options": {"out": str(options.out), "overlay": options.overlay, "confidence": options.confidence,
                        "skip_bad": True, "batch_size": options.batch_size},
            "threads": cpus,
        },
        batch_size=max(options.batch_size, 1),
        concurrency=workers,
        num_gpus=1 if gpus else 0,
        num_cpus=cpus,
    )  # fmt: skip
    by_name = {item.name: item for item in items}
    rows = []
    for record in predicted.iter_rows():
        item = by_name[str(record["name"])]
        if record["error"]:
            if not options.skip_bad:
                raise DataError(f"{record['error']}; {SKIP_HINT}")
            rows.append({"item": item, "error": str(record["error"])})
        else:
            rows.append({"item": item, "height": int(record["height"]), "width": int(record["width"]),
                         "shares": json.loads(str(record["shares"]))})  # fmt: skip
    order = {item.name: k for k, item in enumerate(items)}
    return sorted(rows, key=lambda row: order[row["item"].name])


# -- the command ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    written: int
    skipped: list[dict]
    table: Path
    seconds: float
    classes: list[str]


def run_predict(model: str, inputs: list[Path], options: Options, *, runs: Path, device: str = "auto",
                amp: bool = False, mode: str | None = None, ray_address: str | None = None, workers: int = 1,
                tracking_uri: str | None = None) -> Outcome:  # fmt: skip
    from pipeline.console import progress, say
    from pipeline.paths import unwritable_reason
    from pipeline.training.stages import load_state

    items = collect_inputs(inputs)
    if not options.skip_bad:
        check_inputs(items)
    checkpoint = resolve_checkpoint(model, runs, tracking_uri)
    reason = unwritable_reason(options.out)
    if reason:
        raise UsageError(f"--out {options.out} cannot be written ({reason}); choose another folder")
    say(f"predicting {len(items)} image(s) with {checkpoint} -> {options.out}")
    started = time.perf_counter()
    if ray_address:
        state = load_state(checkpoint)
        rows = predict_on_ray(state, items, options, workers=workers, device=device, amp=amp, mode=mode,
                              address=ray_address)  # fmt: skip
        classes = list(state["classes"])
    else:
        predictor = load_predictor(checkpoint, device, amp, mode)
        rows = _predict_items(predictor, items, options, progress("predicted"))
        classes = predictor.classes
    table = write_table(options.out, rows, classes)
    skipped = [row for row in rows if "error" in row]
    return Outcome(len(rows) - len(skipped), skipped, table, time.perf_counter() - started, classes)
