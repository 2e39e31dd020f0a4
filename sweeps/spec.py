"""Sweep specifications: a search space over config keys, a metric, ASHA and a sample count.

A spec is a JSON file in ``sweeps/specs/`` (or anywhere, by path)::

    {
      "name": "shapes-1_8-knobs",
      "preset": "shapes-1/8",
      "metric": "val/miou", "mode": "max",
      "num_samples": 8,
      "space": {"mim.ratio": {"uniform": [0.3, 0.75]}, "fa.weight": {"loguniform": [0.01, 1.0]}},
      "scheduler": {"grace_period": 1, "reduction_factor": 2},
      "set": {"train.epochs": 4}
    }

A domain is exactly one of ``grid`` (every value, in every sample), ``choice``, ``uniform`` or
``loguniform``. Keys must exist in the config, and must not change the warmup stage: every trial
starts from the preset's one warmup checkpoint. ``set`` holds fixed overrides for the sweep's
trials only (shorter epochs, say); the best-config preset carries the swept values alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config.schema import Config, apply_overrides, read_json_object
from pipeline.errors import UsageError
from pipeline.orchestration.hashing import stage_hash

SPECS_DIR = Path(__file__).resolve().parent / "specs"

# What the train stage reports every epoch, and so what a sweep can optimise.
REPORTED_METRICS = (
    "val/miou", "val/best_miou", "train/loss", "train/loss_x", "train/loss_s", "train/loss_fp", "train/loss_cmim",
    "train/loss_fa", "train/loss_smim", "train/mask_ratio", "train/img_per_s",
)  # fmt: skip
DOMAINS = ("grid", "choice", "uniform", "loguniform")


class Domain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: list[Any] | None = Field(None, min_length=1, description="Every value, each in every sample.")
    choice: list[Any] | None = Field(None, min_length=1, description="One value drawn uniformly per sample.")
    uniform: tuple[float, float] | None = Field(None, description="A float drawn uniformly from [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="A float drawn log-uniformly from [low, high].")

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [k for k in DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAINS)} (got {', '.join(given) or 'none'})")
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} bounds must satisfy low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAINS if getattr(self, k) is not None)

    def examples(self) -> list[Any]:
        """Values that a sample can take at the extremes: used to validate the key."""
        value = getattr(self, self.kind)
        return list(value)

    def to_tune(self):
        from ray import tune

        value = getattr(self, self.kind)
        return {
            "grid": tune.grid_search,
            "choice": tune.choice,
            "uniform": lambda b: tune.uniform(*b),
            "loguniform": lambda b: tune.loguniform(*b),
        }[self.kind](value)


class ASHAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps 1 / reduction_factor of trials at each rung.")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.-]+$", description="Sweep name: its folder, MLflow key and preset file."
    )
    preset: str = Field(..., description="Preset the trials start from (its warmup checkpoint is shared).")
    description: str = Field("", description="What the sweep is for.")
    metric: str = Field("val/miou", description="Metric to optimise; one the train stage reports every epoch.")
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    num_samples: int = Field(..., ge=1, description="Samples drawn from the space (each grid point gets this many).")
    space: dict[str, Domain] = Field(..., description="Search space: config key -> domain.")
    scheduler: ASHAConfig = Field(default_factory=ASHAConfig, description="ASHA, with the epoch as its time attribute.")
    set: dict[str, Any] = Field(default_factory=dict, description="Fixed overrides for the trials.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once; null sizes it from the cluster.")

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not self.space:
            raise ValueError(
                'the search space is empty; give at least one key, e.g. "mim.ratio": {"uniform": [0.3, 0.7]}'
            )
        if self.metric not in REPORTED_METRICS:
            raise ValueError(
                f"metric {self.metric!r} is not reported by the train stage; valid: {', '.join(REPORTED_METRICS)}"
            )
        return self

    def base_config(self) -> Config:
        """The preset with the spec's fixed overrides; every epoch evaluated, so ASHA can compare trials."""
        from pipeline.config.presets import load_preset

        config = load_preset(self.preset)
        return apply_overrides(config, {**self.set, "train.eval_every": 1})

    def check_keys(self) -> Config:
        """Every swept key exists, accepts its domain's values and leaves the warmup stage unchanged."""
        base = self.base_config()
        warmup_hash = stage_hash(base, "warmup")
        problems = []
        for key, domain in self.space.items():
            for value in domain.examples():
                try:
                    changed = apply_overrides(base, {key: value})
                except UsageError as exc:
                    problems.append(f"space.{key}: {exc}")
                    break
                if stage_hash(changed, "warmup") != warmup_hash:
                    problems.append(
                        f"space.{key} changes the warmup stage, which all trials share; sweep train-stage keys "
                        "(unimatch, mim, fa, smim, variant, train)"
                    )
                    break
        if problems:
            raise UsageError("; ".join(problems))
        return base


def spec_names() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.json"))


def load_spec(name_or_path: str) -> SweepSpec:
    path = Path(name_or_path)
    if not path.is_file():
        path = SPECS_DIR / f"{name_or_path.removesuffix('.json')}.json"
    if not path.is_file():
        raise UsageError(f"no sweep spec {name_or_path!r}; give a path or one of: {', '.join(spec_names())}")
    data = read_json_object(path, "sweep spec")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"sweep spec {path}: {_spec_errors(exc)}") from None
    spec.check_keys()
    return spec


def _spec_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            model = (
                Domain
                if len(parent) == 2 and parent[0] == "space"
                else (ASHAConfig if parent == ("scheduler",) else SweepSpec)
            )
            lines.append(f"unknown key {loc}; valid keys: {', '.join(model.model_fields)}")
        else:
            lines.append(
                f"{loc}: {err['msg'].removeprefix('Value error, ')}"
                if loc
                else err["msg"].removeprefix("Value error, ")
            )
    return "; ".join(lines)
