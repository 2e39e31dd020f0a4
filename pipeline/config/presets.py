"""Presets: one per dataset and labeled split, named like a row of a results table.

- ``voc-92 … voc-1464``: classic split, labeled ids from the 1,464 fine train images, the rest of
  the 10,582 blended set unlabeled.
- ``voc-1/16 … voc-1/2``: blended split, labeled ids drawn from all 10,582.
- ``cityscapes-1/16 … 1/2`` and ``shapes-1/16 … 1/2``.
- ``shapes48-1/32 … 1/8``: the cheap testbed on the same data (quarter-width encoder, crop 48, budgets
  in steps), where runs train to convergence on a CPU.

VOC and Cityscapes follow UniMatch's published recipe (DeepLabV3+ ResNet-101, ImageNet init,
crop 321 / 801, 8 / 8 images a step over 4 GPUs, lr 0.001 / 0.005). ``shapes`` presets are sized
for a 2-core CPU; docs/shapes.md explains their recipe. A preset can also be a JSON file:
``{"base": "shapes-1/8", "set": {...}}`` or a whole config.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import Config, apply_overrides, read_json_object, validate_config
from pipeline.errors import UsageError

FRACTIONS = ("1/16", "1/8", "1/4", "1/2")
TESTBED_FRACTIONS = ("1/32", "1/16", "1/8")
VOC_COUNTS = ("92", "183", "366", "732", "1464")


def _voc(split: str, classic: bool) -> dict:
    return {
        "data": {"dataset": "voc", "voc_set": "classic" if classic else "blended", "split": split, "crop": 321,
                 "batch_size": 2, "loader_workers": 4},
        "model": {"backbone": "resnet101", "init": "imagenet"},
        "optim": {"lr": 0.001},
        "warmup": {"epochs": 40},
        "train": {"epochs": 80},
        "eval": {"mode": "original"},
        "scaling": {"workers": 4, "gpus_per_worker": 1, "cpus_per_worker": 4},
    }  # fmt: skip


def _cityscapes(split: str) -> dict:
    return {
        "data": {"dataset": "cityscapes", "split": split, "crop": 801, "batch_size": 2, "loader_workers": 4},
        "model": {"backbone": "resnet101", "init": "imagenet"},
        # UniMatch's Cityscapes config: confidence threshold 0, head lr x 1, an OHEM supervised loss.
        "optim": {"lr": 0.005, "head_lr_mult": 1.0},
        "loss": {"supervised": "ohem"},
        "unimatch": {"threshold": 0.0},
        "mim": {"patch": 80},
        "warmup": {"epochs": 80},
        "train": {"epochs": 240},
        "eval": {"mode": "sliding_window"},
        "scaling": {"workers": 4, "gpus_per_worker": 1, "cpus_per_worker": 4},
    }


def _shapes(split: str) -> dict:
    return {
        # Objects fill much of a 64-96 px image: rescaling by 0.75-1.5 keeps whole shapes in a 64 px crop
        # often enough to learn them (docs/shapes.md, calibration).
        "data": {"dataset": "shapes", "split": split, "crop": 64, "batch_size": 8, "loader_workers": 1,
                 "scale_range": [0.75, 1.5]},
        "model": {"backbone": "resnet18_slim", "init": "none", "aspp_channels": 64, "decoder_channels": 64,
                  "low_level_channels": 24, "dilations": [2, 4, 6]},
        "optim": {"lr": 0.01},
        # Colour family and texture define shapes classes: strong views keep hue and colour, and the blur
        # is scaled to the crop (UniMatch's sigma up to 2 px is set for crop 321).
        "unimatch": {"strong_jitter": [0.5, 0.5, 0.5, 0.0], "strong_grayscale_p": 0.0,
                     "strong_blur_sigma": [0.1, 0.4]},
        "mim": {"patch": 8, "min_pixels": 16},
        # A short teacher and a longer train stage at the warmup's lr: the train stage does most of the
        # learning, as when UniMatch trains from the start (docs/shapes.md, "The shapes recipe").
        "warmup": {"epochs": 10, "eval_every": 5},
        "train": {"epochs": 4, "steps_per_epoch": 90, "lr": 0.01},
        "eval": {"mode": "original", "grid_images": 6},
        "scaling": {"workers": 1, "cpus_per_worker": 2},
    }  # fmt: skip


def _shapes48(split: str) -> dict:
    """The cheap testbed: the shapes data at about a quarter of shapes-1/8's UniMatch step cost (0.24x in
    make bench), so that runs can train to convergence on a CPU (docs/shapes.md, "The cheap testbed";
    docs/bench.md for the cost)."""
    return _merge(_shapes(split), {
        "data": {"crop": 48},
        "model": {"width": 16, "aspp_channels": 32, "decoder_channels": 32, "low_level_channels": 12},
        "mim": {"patch": 6, "min_pixels": 9},
        # Budgets in steps, with val mIoU every 500 steps: long enough that the supervised continuation
        # has stopped rising (docs/shapes.md). One thread per run; two runs side by side fill 2 cores.
        "warmup": {"epochs": 10, "steps_per_epoch": 200, "eval_every": 5},
        "train": {"epochs": 40, "steps_per_epoch": 500},
        "scaling": {"cpus_per_worker": 1},
    })  # fmt: skip


# The design chosen on the development data, in every built-in preset (docs/results.md, the design
# trials): CMIM's masked forward sees each image whole with its patches masked, and the reconstruction
# is still scored per (image, class) pair. schema.py keeps the class-isolated input of SPEC §3.2 as
# the field's default, for configs written out in full.
METHOD = {"mim": {"input": "whole"}}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _builtin() -> dict[str, dict]:
    table: dict[str, dict] = {}
    for count in VOC_COUNTS:
        table[f"voc-{count}"] = _voc(count, classic=True)
    for frac in FRACTIONS:
        table[f"voc-{frac}"] = _voc(frac, classic=False)
    for frac in FRACTIONS:
        table[f"cityscapes-{frac}"] = _cityscapes(frac)
    for frac in FRACTIONS:
        table[f"shapes-{frac}"] = _shapes(frac)
    for frac in TESTBED_FRACTIONS:
        table[f"shapes48-{frac}"] = _shapes48(frac)
    return {name: _merge(_merge(METHOD, spec), {"preset": name}) for name, spec in table.items()}


BUILTIN = _builtin()


def user_presets_dir() -> Path:
    from pipeline.paths import runs_dir

    return runs_dir() / "presets"


def preset_names() -> list[str]:
    names = list(BUILTIN)
    folder = user_presets_dir()
    if folder.is_dir():
        names += sorted(str(p) for p in folder.glob("*.json"))
    return names


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """A built-in preset by name, or a preset file, with ``--set`` overrides applied."""
    if name in BUILTIN:
        config = validate_config(BUILTIN[name])
    elif name.endswith(".json") or Path(name).is_file():
        config = _load_file(Path(name))
    else:
        close = [n for n in BUILTIN if n.split("-")[0] == name.split("-")[0]] or list(BUILTIN)
        raise UsageError(f"unknown preset {name!r}; valid presets: {', '.join(close)} (s4mim presets lists all)")
    return apply_overrides(config, overrides or [])


def _load_file(path: Path) -> Config:
    if not path.is_file():
        raise UsageError(f"preset file {path} does not exist")
    data = read_json_object(path, "preset file")
    if "base" in data:
        unknown = set(data) - {"base", "set", "preset", "description"}
        if unknown:
            raise UsageError(
                f"preset file {path}: unknown key {sorted(unknown)[0]!r}; valid: base, set, preset, description"
            )
        if data["base"] not in BUILTIN:
            raise UsageError(f"preset file {path}: unknown base preset {data['base']!r}")
        config = validate_config(BUILTIN[data["base"]])
        config = apply_overrides(config, data.get("set", {}))
        return config.model_copy(update={"preset": data.get("preset", path.stem)})
    try:
        return validate_config(data)
    except UsageError as exc:
        raise UsageError(f"preset file {path}: {exc}") from None
