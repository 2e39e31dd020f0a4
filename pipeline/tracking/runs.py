"""MLflow tracking with explicit run ids (SPEC §5).

One parent run per pipeline (found again by its key, so a rerun of the same config appends to it)
and one child run per stage execution, tagged with ``mlflow.parentRunId``. Only the driver and
rank 0 log, always through ``MlflowClient`` and a run id, never through the fluent active run. A
stage's run id is stored in its checkpoints, so a resumed stage appends to its own run; metric
steps already in the run's history are not logged again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.errors import UsageError
from pipeline.orchestration.hashing import stage_hash
from pipeline.paths import runs_dir, unwritable_reason

ROOT = Path(__file__).resolve().parents[2]  # the project checkout, when installed editable or run from one
# ``git archive`` writes the archived commit into this file (export-subst in .gitattributes); a checkout
# holds the placeholder.
ARCHIVE_COMMIT = Path(__file__).with_name("archive_commit.txt")

KEY_TAG = "s4mim.key"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the runs table
MODEL_NAME = "model"  # the artifact path of the train stage's logged model
MODEL_PACKAGE = Path(__file__).resolve().parents[2] / "model"  # shipped with it: it loads without s4mim
# Every config key is an MLflow param (so runs compare and the UI show any knob a run changed), except
# these: where the data lives, the store itself, and the labeled id list (up to thousands of ids).
UNLOGGED_KEYS = frozenset({"data.root", "data.labeled_ids", "tracking.uri"})


def tracking_uri(config: Config | None = None, override: str | None = None) -> str:
    if override:
        return override
    if config is not None and config.tracking.uri:
        return config.tracking.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"


def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """Fail fast, with the fix, when the tracking store cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(
                f"MLflow tracking URI {uri} does not answer ({reason}); start the server, or pass "
                f"--tracking-uri sqlite:///runs/mlflow.db for a local store"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        reason = unwritable_reason(folder)
        if reason:
            raise UsageError(f"MLflow store folder {folder} is not writable ({reason}); pass another --tracking-uri")


def _git(*args: str) -> str | None:
    """The output of a git command in the project's checkout, or None outside one (or without git)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _commit() -> tuple[str, str] | None:
    """The full commit of this code and where it was read: ``archive`` in a ``git archive`` copy (which
    writes the commit into ARCHIVE_COMMIT; read first, so that a copy unpacked inside another checkout
    does not report that one's HEAD), ``git`` in a checkout (whose ARCHIVE_COMMIT holds the placeholder);
    None when neither knows."""
    written = ARCHIVE_COMMIT.read_text().strip() if ARCHIVE_COMMIT.is_file() else ""
    if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", written):
        return written, "archive"
    head = _git("rev-parse", "HEAD")
    return (head, "git") if head else None


def git_sha() -> str:
    """The code's commit, short: with ``-dirty`` when a checkout's tracked files changed, ``-archive`` in a
    ``git archive`` copy (whose edits nothing can see), ``unknown`` when neither tells."""
    commit = _commit()
    if commit is None:
        return "unknown"
    sha, source = commit
    if source == "archive":
        return f"{sha[:12]}-archive"
    return sha[:12] + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def flat_params(config: Config, unlogged: frozenset[str] = UNLOGGED_KEYS) -> dict[str, str]:
    """The config's leaves as MLflow params, by dotted key (lists and tuples as JSON), but for ``unlogged``."""
    out: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif name not in unlogged:
                out[name] = json.dumps(value) if isinstance(value, list) else str(value)

    walk(config.model_dump(mode="json"), "")
    return out


def run_tags(config: Config, stage: str, labeled: int, config_hash: str, world_size: int) -> dict[str, str]:
    return {
        "dataset": config.data.dataset,
        "split": config.preset
        if config.preset.startswith(config.data.dataset)
        else f"{config.data.dataset}-{config.data.split}",
        "labeled_count": str(labeled),
        "variant": "supervised" if stage == "warmup" else config.variant,
        "stage": stage,
        "git_sha": git_sha(),
        "config_hash": config_hash,
        "world_size": str(world_size),
    }


class Tracker:
    """A thin layer over ``MlflowClient`` that always names the run it writes to."""

    def __init__(self, uri: str):
        import logging

        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # schema creation and migrations talk at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def experiment(self, name: str) -> str:
        """The experiment's id, created as a model-training experiment if it does not exist yet."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if any(found.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
                for key, value in EXPERIMENT_KIND.items():  # made by an older s4mim
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except Exception:  # created meanwhile by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def find(self, experiment_id: str, key: str, parent_id: str | None = None) -> str | None:
        """The newest run with this key (and parent), or None."""
        query = f"tags.`{KEY_TAG}` = '{key}'"
        if parent_id:
            query += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        runs = self.client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def create(self, experiment_id: str, key: str, name: str, tags: dict, parent_id: str | None = None) -> str:
        tags = {**source_tags(), **tags, KEY_TAG: key}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        return self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(run_id, params=new)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # NaN is not logged
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def last_step(self, run_id: str, key: str) -> int:
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_bytes(self, run_id: str, data: bytes, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_bytes(data)
            parent = str(Path(name).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, context: str) -> None:
        """A dataset input of the run (the runs table's Dataset column): metadata only, no data."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local folder matches two registered source types, both local
            warnings.simplefilter("ignore", UserWarning)
            dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest)
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)])


@contextmanager
def using_tracking_uri(uri: str):
    """MLflow's fluent API on ``uri`` for the block, then back as it was. ``mlflow.set_tracking_uri`` also
    sets $MLFLOW_TRACKING_URI, which every child process would inherit."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets the variable


def source_tags() -> dict[str, str]:
    """The tags MLflow shows in its Source column: the s4mim command and, in a git checkout, the commit."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "s4mim"}
    commit = _commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit[0]
    return tags


class StepLogger:
    """Rank 0's logger inside a stage: skips steps the run already holds (a redone epoch)."""

    def __init__(self, uri: str, run_id: str, system_metrics: float = 0.0):
        self.tracker = Tracker(uri)
        self.run_id = run_id
        self.logged = {key: self.tracker.last_step(run_id, key) for key in ("train/loss", "val/miou")}
        self.monitor = None
        if system_metrics > 0:  # CPU, memory, disk, network, and GPU where there is one, every so many seconds
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=system_metrics, resume_logging=True,
                                                tracking_uri=uri)  # fmt: skip
            self.monitor.start()

    def close(self) -> None:
        if self.monitor is None:
            return
        try:  # one last sample, so that a stage shorter than the interval still shows its use
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        except Exception:  # the monitor's internals moved: the samples already taken are enough
            pass
        self.monitor.finish()
        self.monitor = None

    def log(self, metrics: dict[str, float], step: int, key: str = "train/loss") -> None:
        if step <= self.logged.get(key, -1):
            return
        self.tracker.log_metrics(self.run_id, metrics, step)
        self.logged[key] = step


class PipelineTracking:
    """The parent run of one pipeline config, and its stage children."""

    def __init__(
        self,
        uri: str,
        config: Config,
        prepared,
        *,
        key: str | None = None,
        name: str | None = None,
        tags: dict | None = None,
        fresh: bool = False,
    ):
        self.tracker = Tracker(uri)
        self.config, self.inputs_hash, self.labeled = config, prepared.inputs_hash, prepared.labeled
        self.prepared = prepared
        self.experiment_id = self.tracker.experiment(config.tracking.experiment)
        config_hash = stage_hash(config, "evaluate", self.inputs_hash)
        key = key or f"pipeline-{config_hash}"
        run_tags_ = run_tags(config, "pipeline", prepared.labeled, config_hash, config.scaling.workers)
        run_tags_ |= {"manifest_hash": prepared.content_hash, "labeled_fraction": f"{prepared.labeled_fraction:.6g}"}
        run_tags_ |= tags or {}
        found = None if fresh else self.tracker.find(self.experiment_id, key)
        if found:
            self.parent_id = found
            self.tracker.reopen(found)
        else:
            name = name or f"{config.preset} {config.variant}"
            self.parent_id = self.tracker.create(self.experiment_id, key, name, run_tags_)
            self.tracker.log_text(self.parent_id, json.dumps(config.model_dump(mode="json"), indent=2), "config.json")
            self._log_dataset(self.parent_id, "train")
        # A reused run gets only the keys it lacks (a run logged by an older s4mim has fewer).
        self.tracker.log_params(self.parent_id, flat_params(config))

    def stage_run(self, stage: str, fresh: bool = False) -> str:
        """The child run of ``stage``: the unfinished one to resume, or a new one."""
        config = self.config
        digest = stage_hash(config, stage, self.inputs_hash)
        key = f"{stage}-{digest}"
        found = None if fresh else self.tracker.find(self.experiment_id, key, self.parent_id)
        if found and self.tracker.client.get_run(found).info.status != "FINISHED":
            self.tracker.reopen(found)
            self.tracker.log_params(found, flat_params(config))  # only the keys it lacks, as for the parent
            return found
        tags = run_tags(config, stage, self.labeled, digest, config.scaling.workers)
        run_id = self.tracker.create(self.experiment_id, key, f"{config.preset} {stage}", tags, self.parent_id)
        self.tracker.log_params(run_id, flat_params(config))
        self.tracker.log_text(run_id, json.dumps(config.model_dump(mode="json"), indent=2), "config.json")
        self._log_dataset(run_id, "eval" if stage == "evaluate" else "train")
        return run_id

    def _log_dataset(self, run_id: str, context: str) -> None:
        from pipeline.training.prepare import dataset_root

        name = f"{self.config.data.dataset}/{self.config.data.split}"
        root = str(dataset_root(self.config))
        self.tracker.log_dataset(run_id, name, self.prepared.content_hash, root, context)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.tracker.finish(run_id, status)

    def log_model(self, run_id: str, checkpoint: str, miou: float) -> str | None:
        """Log the train stage's best model into its run and, unless ``tracking.register`` is off, register it
        as a version of ``s4mim-<dataset>``; returns ``name/version`` or None."""
        from mlflow.entities import LoggedModelOutput

        info = log_trained_model(self.tracker.uri, run_id, checkpoint, self.config, self.config.tracking.register)
        self.tracker.client.log_outputs(self.parent_id, [LoggedModelOutput(info.model_id, 0)])  # the pipeline's too
        # The runs table's Models column reads this tag (MLflow 3.17's UI), not the run's outputs.
        history = [{"run_id": run_id, "artifact_path": MODEL_NAME, "utc_time_created": info.utc_time_created,
                    "flavors": {flavor: {} for flavor in info.flavors}, "model_uuid": info.model_uuid}]  # fmt: skip
        self.tracker.set_tags(run_id, {"mlflow.log-model.history": json.dumps(history)})
        if not self.config.tracking.register:
            return None
        name, number = f"s4mim-{self.config.data.dataset}", str(info.registered_model_version)
        split = run_tags(self.config, "train", self.labeled, "", 1)["split"]
        tags = {"split": split, "variant": self.config.variant, "val_miou": f"{miou:.2f}", "run_id": run_id}
        for key, value in tags.items():
            self.tracker.client.set_model_version_tag(name, number, key, value)
        registered = f"{name}/{number}"
        self.tracker.set_tags(run_id, {"registered_model": registered})
        self.tracker.set_tags(self.parent_id, {"registered_model": registered})
        return registered


def log_trained_model(uri: str, run_id: str, checkpoint: str, config: Config, register: bool):
    """``mlflow.pytorch.log_model`` of the checkpoint's model as class scores, with a signature, an input
    example, the checkpoint itself (``extra_files``, for ``s4mim predict``) and the ``model`` package
    (``code_paths``, so that it loads where s4mim is not installed). Returns MLflow's ModelInfo."""
    import tempfile

    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from model.deeplab import ClassScores
    from pipeline.training.engine import build_model, load_weights
    from pipeline.training.stages import load_state

    state = load_state(Path(checkpoint))
    model = build_model(config, len(state["classes"]), reconstruction=False)
    load_weights(model, state["engine"]["model"])
    scorer = ClassScores(model).eval()
    side = config.eval_crop
    example = torch.zeros(1, 3, side, side)
    images = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))  # any batch and size: normalised RGB
    scores = TensorSpec(np.dtype(np.float32), (-1, len(state["classes"]), -1, -1))
    signature = ModelSignature(inputs=Schema([images]), outputs=Schema([scores]))
    name = f"s4mim-{config.data.dataset}" if register else None
    with using_tracking_uri(uri), tempfile.TemporaryDirectory() as tmp:
        kept = {"engine": {"model": state["engine"]["model"]}, "config": state["config"], "classes": state["classes"]}
        torch.save(kept, Path(tmp) / "state.pt")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                scorer, name=MODEL_NAME, signature=signature, input_example=example.numpy(),
                extra_files=[str(Path(tmp) / "state.pt")], code_paths=[str(MODEL_PACKAGE)],
                pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "torchvision"],
                registered_model_name=name, await_registration_for=0,
                serialization_format="pickle",  # any image size; MLflow's default (torch.export) fixes the example's
            )  # fmt: skip
    return info
