"""Configuration: nested pydantic models grouped by concern, validated strictly.

Every field has a description (shown by ``s4mim presets --show NAME``). Unknown keys are fatal and
the error lists the valid ones. ``--set section.key=value`` overrides any field; the value is read
as JSON where it parses (``0.5``, ``true``, ``[6,12,18]``, ``null``) and as a string otherwise.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UsageError

Variant = Literal["supervised", "unimatch", "s4mim"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class DataConfig(Section):
    dataset: Literal["voc", "cityscapes", "shapes", "custom"] = Field(
        "shapes", description="Dataset kind: voc, cityscapes, shapes (embedded, synthetic) or custom."
    )
    root: str | None = Field(None, description="Dataset folder. Default: $S4MIM_DATA/<dataset>, i.e. data/<dataset>.")
    voc_set: Literal["classic", "blended"] = Field(
        "blended",
        description="VOC only. classic: labeled ids from the 1,464 fine train images; blended: from all 10,582.",
    )
    split: str = Field("1/8", description="Labeled part of the train pool: a fraction (1/8) or a count (92).")
    split_seed: int = Field(0, description="Seed of the class-aware labeled draw; change it for another split.")
    labeled_ids: str | None = Field(
        None, description="File of labeled ids (community split files work); overrides the draw."
    )
    crop: int = Field(64, ge=16, description="Training crop side in pixels (321 for VOC, 801 for Cityscapes).")
    scale_range: tuple[float, float] = Field(
        (0.5, 2.0), description="Random rescale range of the weak view, relative to the image's size."
    )
    pad: Literal["black_bottom_right", "mean_random"] = Field(
        "black_bottom_right",
        description="How a rescaled image smaller than the crop is padded (the padding never counts in a loss): "
        "black_bottom_right, black on the right and bottom as UniMatch does; mean_random, the mean colour "
        "around a random position.",
    )
    batch_size: int = Field(
        8, ge=1, description="Labeled images per worker and step; the unlabeled batch is the same size."
    )
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes per training worker; 0 decodes in the training process."
    )
    synth_seed: int = Field(0, description="shapes only: seed of the generated dataset.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        return self


class ModelConfig(Section):
    backbone: Literal["resnet18", "resnet18_slim", "resnet50", "resnet101"] = Field(
        "resnet18_slim", description="Encoder: resnet50/101 for real data, resnet18(_slim) for CPU."
    )
    init: str = Field(
        "none",
        description="Backbone initialisation: none (random), imagenet (torchvision weights; needs the "
        "network or a cached copy), standin (the ImageNet stand-in of s4mim pretrain, pretrained on a synthetic "
        "classification corpus) or the path of a local state dict.",
    )
    width: int = Field(
        32,
        ge=4,
        description="resnet18_slim only: channels of its first stage (the others have 2, 4 and 8 times as many). "
        "32 is half a ResNet-18; 16, a quarter, makes a step several times cheaper.",
    )
    aspp_channels: int = Field(256, ge=8, description="Channels of the ASPP branches and output.")
    decoder_channels: int = Field(256, ge=8, description="Channels of the stride-4 decoder features (F).")
    low_level_channels: int = Field(48, ge=4, description="Channels the stride-4 encoder features are reduced to.")
    dilations: tuple[int, int, int] = Field((6, 12, 18), description="ASPP atrous rates at output stride 16.")
    fp_dropout: float = Field(0.5, ge=0, lt=1, description="Dropout2d rate of UniMatch's feature perturbation.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.width != 32 and self.backbone != "resnet18_slim":
            raise ValueError(f"model.width applies to resnet18_slim only; {self.backbone} has fixed widths")
        return self


class LossConfig(Section):
    supervised: Literal["ce", "ohem"] = Field(
        "ce",
        description="L_x: ce (cross-entropy) or ohem (online hard example mining, UniMatch's Cityscapes "
        "choice: CE over the pixels whose true-class probability is at most ohem_threshold, at least the "
        "ohem_min_kept hardest). Used by the warmup and the train stage alike.",
    )
    ohem_threshold: float = Field(0.7, gt=0, le=1, description="ohem: pixels this sure of their class or less count.")
    ohem_min_kept: int = Field(
        200_000, ge=0, description="ohem: at least this many of the hardest labeled pixels of a batch count."
    )


class UniMatchConfig(Section):
    threshold: float = Field(0.95, ge=0, le=1, description="τ: confidence a pseudo label needs to count.")
    cutmix_source: Literal["batch", "roll"] = Field(
        "batch",
        description="batch: CutMix partners from a second unlabeled batch (one extra no-grad forward); "
        "roll: from the same batch rolled by one (cheaper).",
    )
    cutmix_p: float = Field(0.5, ge=0, le=1, description="Probability of a CutMix box in each strong view.")
    feature_perturbation: bool = Field(True, description="Use L_fp, the loss on Dropout2d-perturbed features.")
    teacher: Literal["self", "ema"] = Field(
        "self", description="Pseudo-labeler: the model itself (UniMatch) or an EMA copy of it."
    )
    ema_decay: float = Field(0.999, gt=0, lt=1, description="Decay of the EMA teacher.")
    strong_jitter: tuple[float, float, float, float] = Field(
        (0.5, 0.5, 0.5, 0.25),
        description="Colour jitter of the strong views: brightness, contrast, saturation, hue. Set hue 0 where "
        "colour tells classes apart.",
    )
    strong_jitter_p: float = Field(0.8, ge=0, le=1, description="Probability of colour jitter in a strong view.")
    strong_grayscale_p: float = Field(
        0.2, ge=0, le=1, description="Probability of grayscale in a strong view (0 where colour tells classes apart)."
    )
    strong_blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="Range of the Gaussian blur sigma in pixels (UniMatch's, at crop 321)."
    )
    strong_blur_p: float = Field(0.5, ge=0, le=1, description="Probability of blur in a strong view.")


class MIMConfig(Section):
    mode: Literal["none", "plain", "classwise"] = Field(
        "classwise",
        description="Masked image modeling: classwise (CMIM), plain (whole-image, SimMIM-style) or none.",
    )
    weight: float = Field(1.0, ge=0, description="λ_cmim, weight of the reconstruction loss; 0 switches it off.")
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of patches masked.")
    patch: int = Field(32, ge=1, description="Side of a masked patch in pixels (32 at crop 321).")
    loss: Literal["l1", "l2"] = Field("l1", description="Reconstruction error.")
    head: Literal["decoder", "encoder"] = Field(
        "encoder",
        description="Features the reconstruction head reads: encoder (stride 16, SimMIM's choice; with "
        "fa.feature=encoder the masked forward stops after the encoder) or decoder (stride 4, the segmentation "
        "features, which the reconstruction then pulls toward RGB).",
    )
    max_classes: int = Field(2, ge=1, description="Classes reconstructed per image: the cost bound.")
    min_pixels: int = Field(64, ge=1, description="Pixels a class needs in an image to be reconstructed.")
    conf: float | None = Field(
        None, ge=0, le=1, description="Confidence an unlabeled pixel needs to join a class map; null means τ."
    )
    on: Literal["labeled", "unlabeled", "both"] = Field("both", description="Images that take part.")
    input: Literal["isolated", "whole"] = Field(
        "isolated",
        description="classwise only: the masked forward sees each chosen class isolated, x·1[class=c]·(1−M) "
        "(SPEC §3.2), or whole: the image with its patches masked, as plain MIM sees it, the reconstruction still "
        "scored per (image, class) pair. A diagnosis knob: it tells the class-isolated input from the per-class loss.",
    )
    freeze_bn_stats: bool = Field(
        True,
        description="Keep BatchNorm running statistics out of the masked forward pass, whose mostly "
        "empty inputs would skew them.",
    )


class FAConfig(Section):
    weight: float = Field(0.1, ge=0, description="λ_fa, weight of feature aggregation; 0 switches it off.")
    feature: Literal["decoder", "encoder"] = Field(
        "encoder", description="Features aggregated: encoder (stride 16) or decoder (stride 4, before the classifier)."
    )
    stop_grad: bool = Field(True, description="Detach the visible prototype v_c.")


class SMIMConfig(Section):
    weight: float = Field(0.5, ge=0, description="λ_smim, weight of masked modeling in semantic space; 0 is off.")
    ratio: float | None = Field(None, gt=0, lt=1, description="Masked fraction of the strong view; null: mim.ratio.")
    patch: int | None = Field(None, ge=1, description="Patch side; null: mim.patch.")
    view: Literal["s2", "extra", "weak"] = Field(
        "s2",
        description="s2: mask the second strong view (no extra forward; it then carries L_s2 and L_smim); "
        "extra: an additional masked copy of the first strong view; weak: masked consistency (MIC-style), an "
        "additional masked copy of the weak view, against the pseudo labels of the whole weak view.",
    )
    pixels: Literal["all", "visible", "masked"] = Field(
        "all",
        description="Pixels L_smim is scored on: all of the masked view's, only those its patch mask leaves "
        "visible, or only the masked ones; the loss is averaged over those pixels.",
    )
    count: Literal["add", "replace"] = Field(
        "add",
        description="With view s2: add counts the masked view's loss in L_base as L_s2 and again as λ_smim L_smim; "
        "replace counts it once, as λ_smim L_smim in place of L_s2 (λ_smim 0.125 keeps L_s2's share).",
    )

    @model_validator(mode="after")
    def _check(self) -> SMIMConfig:
        if self.count == "replace" and self.view != "s2":
            raise ValueError("smim.count=replace needs smim.view=s2: only the second strong view can be replaced")
        return self


class OptimConfig(Section):
    lr: float = Field(0.001, gt=0, description="Backbone learning rate (SGD).")
    head_lr_mult: float = Field(10.0, gt=0, description="The head learns at lr × this.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay.")
    poly_power: float = Field(0.9, ge=0, description="Power of the poly decay, stepped every iteration.")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="Autocast precision (bf16 on recent GPUs).")
    channels_last: bool = Field(False, description="channels_last memory format (faster convs on GPU).")


class StageConfig(Section):
    epochs: int = Field(..., ge=1, description="Epochs of this stage.")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Steps in an epoch; null means one pass over the pool (unlabeled for train, labeled for "
        "warmup). Shorter epochs give sweeps more evaluations to stop trials on.",
    )
    eval_every: int = Field(1, ge=1, description="Evaluate on the val set every this many epochs (and at the end).")
    lr: float | None = Field(
        None,
        gt=0,
        description="Backbone learning rate of this stage; null means optim.lr.",
    )


class TrainStageConfig(StageConfig):
    match: Literal["steps", "epochs"] = Field(
        "steps",
        description="variant=supervised only: the budget it is matched to. steps: as many steps as the "
        "semi-supervised runs (the stricter baseline); epochs: as many passes over the labeled set as they make "
        "over the unlabeled set, as UniMatch's supervised baseline runs (each epoch of steps_per_epoch steps "
        "shrinks by labeled/unlabeled). Needs steps_per_epoch.",
    )


class EvalConfig(Section):
    mode: Literal["original", "center_crop", "sliding_window"] = Field(
        "original", description="original: whole image (VOC); center_crop; sliding_window (Cityscapes)."
    )
    crop: int | None = Field(None, ge=16, description="Window or crop side; null means data.crop.")
    stride: float = Field(2 / 3, gt=0, le=1, description="Sliding-window stride as a fraction of the window.")
    grid_images: int = Field(6, ge=0, description="Val images in the evaluation picture grid.")


class ScalingConfig(Section):
    workers: int = Field(1, ge=1, description="Training workers (processes; one per GPU on a GPU cluster).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; 0 trains on CPU with gloo.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves per worker.")


# ``register`` is the natural key for registering models; it shadows ABCMeta's classmethod only.
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingConfig" shadows', category=UserWarning)


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; null means $MLFLOW_TRACKING_URI or sqlite:///<runs>/mlflow.db."
    )
    experiment: str = Field("s4mim", description="MLflow experiment name.")
    register: bool = Field(
        True,
        description="Register the train stage's best model as s4mim-<dataset> in the MLflow model registry "
        "(one version per pipeline run); false logs the model without registering it.",
    )
    system_metrics: bool = Field(
        True, description="Log CPU, memory, disk and (where there is one) GPU use to each training stage's run."
    )
    grad_norm_every: int = Field(
        50,
        ge=0,
        description="Every this many steps of a semi-supervised stage (at a logged step), log each loss term's "
        "gradient norm on the encoder (train/grad_norm/<term>): which term drives training. 0 switches it off. "
        "A measured step costs about 2.3x a plain one (one extra backward pass per term): +2.6% at 50, +13% "
        "at 10; the training itself is unchanged.",
    )
    pseudo_acc: bool = Field(
        True,
        description="Where every unlabeled train image has a mask (shapes, VOC's blended set), log how often the "
        "pseudo labels match it (train/pseudo_acc, train/pseudo_acc_confident). The masks are read for this "
        "measure alone and never trained on.",
    )


class Config(Section):
    preset: str = Field("custom", description="Name of the preset this config came from.")
    variant: Variant = Field("s4mim", description="Method of the train stage: supervised, unimatch or s4mim.")
    seed: int = Field(0, description="Seed of model init, sampling and augmentation.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, split and loading.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network.")
    unimatch: UniMatchConfig = Field(default_factory=UniMatchConfig, description="Weak-to-strong baseline.")
    mim: MIMConfig = Field(default_factory=MIMConfig, description="Class-wise masked image modeling.")
    fa: FAConfig = Field(default_factory=FAConfig, description="Intra-class feature aggregation.")
    smim: SMIMConfig = Field(default_factory=SMIMConfig, description="Masked modeling in semantic space.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The supervised loss.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and precision.")
    warmup: StageConfig = Field(
        default_factory=lambda: StageConfig(epochs=40), description="Teacher warmup: supervised, labeled split only."
    )
    train: TrainStageConfig = Field(
        default_factory=lambda: TrainStageConfig(epochs=80), description="Semi-supervised training from the teacher."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers and resources.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.variant == "s4mim" and self.fa.weight > 0 and self.mim.mode == "none":
            raise ValueError("fa.weight > 0 needs masked inputs: set mim.mode to classwise or plain, or fa.weight=0")
        if self.train.match == "epochs" and (self.variant != "supervised" or self.train.steps_per_epoch is None):
            raise ValueError(
                "train.match=epochs matches a supervised baseline to a semi-supervised budget: it needs "
                "variant=supervised and train.steps_per_epoch (the semi-supervised epoch)"
            )
        return self

    def terms(self, variant: str | None = None) -> frozenset[str]:
        """The loss terms a variant computes (default: this config's variant)."""
        variant = variant or self.variant
        if variant == "supervised":
            return frozenset({"x"})
        terms = {"x", "s1", "s2"} | ({"fp"} if self.unimatch.feature_perturbation else set())
        if variant == "s4mim":
            masked = self.mim.mode != "none"
            terms |= {"cmim"} if masked and self.mim.weight > 0 else set()
            terms |= {"fa"} if masked and self.fa.weight > 0 else set()
            terms |= {"smim"} if self.smim.weight > 0 else set()
        return frozenset(terms)

    @property
    def eval_crop(self) -> int:
        return self.eval.crop or self.data.crop


def _section_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _field_model(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem; an unknown key lists the valid keys of its section."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            parent = _field_model(loc[:-1])
            valid = ", ".join(_section_keys(parent)) if parent else "?"
            where = ".".join(str(p) for p in loc[:-1]) or "top level"
            lines.append(f"unknown key {dotted}; valid keys in {where}: {valid}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{dotted}: {msg}" if dotted else msg)
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected section.key=value, e.g. --set mim.ratio=0.6")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UsageError(f"--set {text!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(config: Config, overrides: list[str] | dict[str, object]) -> Config:
    """Return a validated copy of ``config`` with ``section.key=value`` overrides applied."""
    data = config.model_dump()
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for path, value in items:
        path = path.split(".") if isinstance(path, str) else path
        node = data
        for i, part in enumerate(path[:-1]):
            if part in node and not isinstance(node[part], dict):
                raise UsageError(f"{'.'.join(path[: i + 1])} is a value, not a section; cannot set {'.'.join(path)}")
            if part not in node:
                parent = _field_model(tuple(path[:i]))
                valid = ", ".join(_section_keys(parent)) if parent else "?"
                where = ".".join(path[:i]) or "top level"
                raise UsageError(f"unknown key {'.'.join(path[: i + 1])}; valid keys in {where}: {valid}")
            node = node[part]
        node[path[-1]] = _merged(node.get(path[-1]), value)
    return validate_config(data)


def _merged(old: object, new: object) -> object:
    """``new`` over ``old``. A section given whole (``--set 'mim={"ratio": 0.6}'``) merges key by key:
    the keys it leaves out keep the preset's values instead of going back to the defaults."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{key: _merged(old.get(key), value) for key, value in new.items()}}


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a user's file, or a UsageError naming the file and the problem."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path}: expected a JSON object")
    return data


def validate_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
