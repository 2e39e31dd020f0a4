"""``s4mim pretrain``: the ImageNet stand-in, a backbone pretrained once on a synthetic classification corpus.

    s4mim pretrain shapes48-1/8                                # the stand-in for the preset's backbone
    s4mim pipeline run shapes48-1/8 --set model.init=standin   # start from it

Real benchmarks start from ImageNet weights, which cannot be downloaded here; ``model.init=standin``
starts the backbone from this one instead. The corpus (data_prep/corpus.py) has image-level labels
only (shape, texture and colour of one object, a broader vocabulary than the `shapes` classes) and
comes from a generator stream disjoint from every `shapes` dataset. The encoder is trained to
predict the three labels from its pooled stride-16 features.

The weights are cached like a stage, by the recipe, the backbone and the code that builds them,
in ``runs/stages/standin/<backbone>-w<width>-<hash>/``. The project ships them for the testbed's
backbone (``pipeline/training/standin/``), so a fresh clone need not spend the time; they count only while
their hash is the current one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.atomic import atomic_path, write_text

SHIPPED = Path(__file__).resolve().parent / "standin"


@dataclass(frozen=True)
class Recipe:
    """How the stand-in is trained: fixed, so that its hash names one set of weights."""

    train_images: int = 20_000
    val_images: int = 2_000
    side: int = 56  # images are rendered at this side and randomly cropped to ``crop``
    crop: int = 48
    batch: int = 64
    steps: int = 6_000
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


RECIPE = Recipe()


class Classifier(nn.Module):
    """A segmentation backbone with one linear head per image-level attribute on its pooled output."""

    def __init__(self, backbone: str, width: int):
        super().__init__()
        from data_prep.corpus import ATTRIBUTES
        from model.backbones import build_backbone

        self.encoder = build_backbone(backbone, "none", width)
        self.heads = nn.ModuleDict({name: nn.Linear(self.encoder.high_channels, n) for name, n in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, high = self.encoder(x)  # (B, C, H/16, W/16)
        pooled = high.mean(dim=(2, 3))
        return {name: head(pooled) for name, head in self.heads.items()}


def name(backbone: str, width: int) -> str:
    return f"{backbone}-w{width}"


def standin_hash(backbone: str, width: int, recipe: Recipe | None = None) -> str:
    from pipeline.fingerprint import code_fingerprint

    recipe = recipe or RECIPE
    blob = json.dumps({"backbone": backbone, "width": width, "recipe": asdict(recipe),
                       "code": code_fingerprint("pretrain")}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_folder(runs: Path, backbone: str, width: int) -> Path:
    return Path(runs) / "stages" / "standin" / f"{name(backbone, width)}-{standin_hash(backbone, width)}"


def _current(folder: Path, expected_hash: str) -> Path | None:
    """``folder``'s weights if it holds a finished stand-in of this hash."""
    weights, result = folder / "encoder.pt", folder / "result.json"
    if not (weights.is_file() and result.is_file()):
        return None
    try:
        return weights if json.loads(result.read_text()).get("hash") == expected_hash else None
    except json.JSONDecodeError:
        return None


def find(backbone: str, width: int, runs: Path | None = None) -> Path | None:
    """The stand-in weights for this backbone at the current hash: built here, or shipped; None if neither."""
    from pipeline.paths import runs_dir

    expected = standin_hash(backbone, width)
    built = _current(cache_folder(runs or runs_dir(), backbone, width), expected)
    return built or _current(SHIPPED / name(backbone, width), expected)


def resolve(backbone: str, width: int, runs: Path | None = None) -> Path:
    """The weights ``model.init=standin`` loads, or a UsageError that says how to build them."""
    path = find(backbone, width, runs)
    if path is None:
        from pipeline.errors import UsageError

        raise UsageError(
            f"model.init=standin: no stand-in for {backbone} at width {width} is built or shipped for this code; "
            f"build it with 's4mim pretrain PRESET' (with the same --set model.* options), or use model.init=none"
        )
    return path


def resolved_init(model) -> str:
    """``model.init`` as the backbone loads it: ``standin`` becomes the path of the stand-in's weights."""
    if model.init != "standin":
        return model.init
    return str(resolve(model.backbone, model.width))


def _augment(images: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops and flips of a uint8 batch (B, 3, S, S), normalised as the segmentation data is."""
    from data_prep.augment import normalize

    b, _, side, _ = images.shape
    top = torch.randint(0, side - crop + 1, (b,), generator=gen)
    left = torch.randint(0, side - crop + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    patches = [image[:, y : y + crop, x : x + crop] for image, y, x in zip(images, top.tolist(), left.tolist())]
    batch = torch.stack(patches)
    return normalize(torch.where(flip[:, None, None, None], batch.flip(-1), batch))


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, crop: int) -> dict[str, float]:
    """Top-1 accuracy per attribute on centre crops, in percent."""
    from data_prep.augment import normalize
    from data_prep.corpus import ATTRIBUTES

    model.eval()
    offset = (images.shape[-1] - crop) // 2
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for start in range(0, len(images), 256):
        batch = images[start : start + 256, :, offset : offset + crop, offset : offset + crop]
        logits = model(normalize(batch))
        for i, attribute in enumerate(ATTRIBUTES):
            hits[attribute] += int((logits[attribute].argmax(1) == labels[start : start + 256, i]).sum())
    model.train()
    return {attribute: 100 * hits[attribute] / len(images) for attribute in ATTRIBUTES}


def pretrain(backbone: str, width: int, runs: Path, *, force: bool = False, log=print) -> dict:
    """Build the stand-in (or find it current) and return its result: where, its accuracy, its cost."""
    from data_prep.corpus import ATTRIBUTES, render_corpus

    recipe = RECIPE
    expected = standin_hash(backbone, width, recipe)
    folder = Path(runs) / "stages" / "standin" / f"{name(backbone, width)}-{expected}"
    if not force:
        for candidate in (folder, SHIPPED / name(backbone, width)):
            if _current(candidate, expected) is not None:
                result = json.loads((candidate / "result.json").read_text())
                log(f"[pretrain] the stand-in for {name(backbone, width)} is current: {candidate}")
                return {**result, "folder": str(candidate), "cached": True}
    started = time.perf_counter()
    log(f"[pretrain] rendering {recipe.train_images} + {recipe.val_images} corpus images ...")
    images, labels = render_corpus(0, recipe.train_images + recipe.val_images, recipe.side)
    train_x, train_y = images[: recipe.train_images], labels[: recipe.train_images]
    val_x, val_y = images[recipe.train_images :], labels[recipe.train_images :]
    rendered = time.perf_counter() - started

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = Classifier(backbone, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=True)  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    model.train()
    window_loss, window_steps, window_started = 0.0, 0, time.perf_counter()
    for step in range(1, recipe.steps + 1):
        index = torch.randint(0, recipe.train_images, (recipe.batch,), generator=gen)
        logits = model(_augment(train_x[index], recipe.crop, gen))
        loss = sum(F.cross_entropy(logits[a], train_y[index, i]) for i, a in enumerate(ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window_loss, window_steps = window_loss + loss.item(), window_steps + 1
        if step % 500 == 0 or step == recipe.steps:
            rate = window_steps / max(time.perf_counter() - window_started, 1e-9)
            log(f"[pretrain] step {step}/{recipe.steps}  loss {window_loss / window_steps:.3f}  ({rate:.1f} steps/s)")
            window_loss, window_steps, window_started = 0.0, 0, time.perf_counter()
    val = accuracy(model, val_x, val_y, recipe.crop)
    seconds = time.perf_counter() - started
    result = {"hash": expected, "backbone": backbone, "width": width, "recipe": asdict(recipe),
              "val_accuracy": val, "seconds": seconds, "render_seconds": rendered,
              "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in model.encoder.parameters())}  # fmt: skip
    with atomic_path(folder, directory=True) as tmp:
        torch.save(model.encoder.state_dict(), tmp / "encoder.pt")
        result["bytes"] = (tmp / "encoder.pt").stat().st_size
        write_text(tmp / "result.json", json.dumps(result, indent=2) + "\n")
    accuracies = ", ".join(f"{k} {v:.1f}%" for k, v in val.items())
    log(f"[pretrain] {name(backbone, width)}: val accuracy {accuracies}; {seconds / 60:.1f} min -> {folder}")
    return {**result, "folder": str(folder), "cached": False}


def ship(folder: Path) -> Path:
    """Copy a built stand-in into the project's shipped weights (for the maintainers)."""
    result = json.loads((Path(folder) / "result.json").read_text())
    target = SHIPPED / name(result["backbone"], result["width"])
    with atomic_path(target, directory=True) as tmp:
        for file in ("encoder.pt", "result.json"):
            shutil.copyfile(Path(folder) / file, tmp / file)
    return target
