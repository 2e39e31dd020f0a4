"""Stages as Ray Train jobs (Train V2): a ``TorchTrainer`` whose workers run the engine.

    s4mim pipeline run shapes-1/8                               # local Ray, started on demand
    RAY_ADDRESS=head:6379 s4mim pipeline run voc-1/8 --data-root /nfs/VOC2012
    ray job submit --address http://head:8265 -- s4mim pipeline run voc-1/8 --data-root /nfs/VOC2012

Each stage run has a deterministic ``RunConfig(storage_path, name)``: running the same stage again
resumes from its last committed checkpoint. Workers report every epoch with a checkpoint holding
the full training state; ``FailureConfig(max_failures=2)`` replaces failed workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from pipeline.backends.worker_logs import route_worker_output, stage_log, tail
from pipeline.config.schema import Config
from pipeline.console import event, prints_into, say
from pipeline.errors import UsageError, find_user_error
from pipeline.machine import with_earlier
from pipeline.orchestration.hashing import stage_hash
from pipeline.orchestration.orchestrate import epoch_number
from pipeline.paths import is_uri, ray_address, slug
from pipeline.signals import retake_stop_signals

STATE_FILE = "state.pt"
STAGE_LOG = "stage.log"  # in the stage folder: Ray's and MLflow's own output while the stage ran


# -- the cluster ---------------------------------------------------------------------------------


def _reachable(address: str, timeout: float = 3.0) -> bool:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port; let Ray interpret it
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def check_reachable(address: str | None) -> None:
    """Fail fast when a named cluster does not answer (before any data is prepared)."""
    address = ray_address(address)
    if address and address not in ("auto", "local") and not _reachable(address):
        raise UsageError(
            f"no Ray cluster answers at {address}; start one with 'ray start --head', fix --ray-address, "
            "or leave it out to run on a local Ray"
        )


def connect(address: str | None = None) -> str:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), or start a private local Ray. Returns a description.

    Without an address this process starts a Ray of its own, even when another one runs on this
    host, so that nobody else's cluster can take the run down with it; ``--ray-address auto`` joins
    the cluster already running here. A local Ray starts with its dashboard: Ray Train's
    placement-group cleaner and Tune's release of stopped trials go through the state API it serves.
    Those look for the API by the Ray running on this host, and fail when there are several (two
    commands at once, or someone else's cluster beside this one): so the private Ray's dashboard gets a
    port of its own choosing here, and every process of the cluster inherits its address.
    """
    import ray

    address = ray_address(address)
    if ray.is_initialized():
        return "connected"
    check_reachable(address)
    private = address in (None, "local")
    if private:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a file, should Ray print itself
    try:
        if private:
            context = _start_private()
        else:
            context = ray.init(address=address, log_to_driver=True, configure_logging=False)
    except ConnectionError as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: {exc}; check --ray-address") from None
    if not private:  # this process's own state API calls go to the cluster it joined, not to one it inherited
        if context.dashboard_url:
            os.environ[API_SERVER] = f"http://{context.dashboard_url}"
        else:
            os.environ.pop(API_SERVER, None)
    retake_stop_signals()  # ray.init makes SIGTERM end the process at once; the command stops as on Ctrl-C
    # Worker output still comes to this process (a line of the project's included), but is no longer
    # printed as Ray prints it: see pipeline.backends.worker_logs.
    route_worker_output()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    where = "local (private to this command)" if private else f"cluster at {ray.get_runtime_context().gcs_address}"
    return f"Ray {where}: {len(nodes)} node(s), {_describe(ray.cluster_resources())}"


API_SERVER = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients look first


def _start_private(attempts: int = 3):
    """``ray.init`` of a private Ray whose dashboard listens on a free port of our choosing, set as
    RAY_API_SERVER_ADDRESS before the node starts so that every process of the cluster inherits it.
    Should another process take the port before the dashboard binds it, another port is tried."""
    import ray

    from pipeline.tracking.ui import free_port

    for attempt in range(attempts):
        port = free_port()
        os.environ[API_SERVER] = f"http://127.0.0.1:{port}"
        try:
            return ray.init(address="local", log_to_driver=True, configure_logging=False, dashboard_port=port)
        except ValueError as exc:  # Ray's words for a dashboard port already taken
            if "already occupied" not in str(exc) or attempt == attempts - 1:
                raise
            ray.shutdown()


def _describe(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def check_fits(config: Config) -> None:
    """Fail before training when the cluster can never place the requested workers."""
    import ray

    s = config.scaling
    need = {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    placeable = sum(
        int(min(node.get(k, 0) // v for k, v in need.items() if v > 0))
        if any(v > 0 for v in need.values())
        else s.workers
        for node in nodes
    )
    if placeable < s.workers:
        have = _describe(ray.cluster_resources())
        raise UsageError(
            f"the cluster ({have}) can never fit {s.workers} worker(s) of {s.cpus_per_worker:g} CPU and "
            f"{s.gpus_per_worker:g} GPU; lower --set scaling.workers / scaling.cpus_per_worker / "
            "scaling.gpus_per_worker, or add nodes"
        )


def storage_path(runs: Path) -> str:
    return os.environ.get("S4MIM_STORAGE") or str(runs / "ray")


def remove_storage_tree(path: str) -> None:
    """Delete a folder of the Ray storage, a local path or a URI (s3://, gs://, file://); a missing one is fine."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)


def check_storage(path: str) -> None:
    """Fail fast when the Ray storage path cannot be written (local folder, NFS or s3://)."""
    try:
        if is_uri(path):
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(path)
            fs.create_dir(root, recursive=True)
            probe = f"{root.rstrip('/')}/.write-probe-{os.getpid()}"
            with fs.open_output_stream(probe) as out:
                out.write(b"")
            fs.delete_file(probe)
        else:
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
    except Exception as exc:  # OSError, pyarrow's ArrowException
        raise UsageError(
            f"storage path {path} is not writable ({exc}); set S4MIM_RUNS or S4MIM_STORAGE to a writable path"
        ) from None


def system_metrics_interval(config: Config) -> float:
    """Seconds between system-metric samples in a stage's run (0: off). Read on the driver, since Ray
    workers do not see its environment: $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else 5."""
    if not config.tracking.system_metrics:
        return 0.0
    return float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 5)


def cluster_lost(exc: BaseException) -> str | None:
    """What an exception says about the cluster itself going away (not the training failing), or None.

    A dead controller actor, a dead node or lost owner, or a lost connection to the cluster's GCS:
    the stage did nothing wrong, and running it again resumes it.
    """
    import ray.exceptions as rex

    infrastructure = (rex.RayActorError, rex.NodeDiedError, rex.OwnerDiedError, rex.RaySystemError, rex.GetTimeoutError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, infrastructure) or isinstance(exc, ConnectionError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"{type(exc).__name__}: {first}"[:200].rstrip(": ")
        exc = exc.__cause__ or exc.__context__
    return None


# -- the workers ---------------------------------------------------------------------------------


def _emit(line: str) -> None:
    """One line of the project's from a worker, for the driver's console."""
    event("line", text=line)


PROGRESS_EVERY = 1.0  # seconds between a worker's progress updates: enough for a bar, few lines to forward


class RayContext:
    """The StageContext of a Ray Train worker: checkpoints through ``ray.train.report``."""

    def __init__(self, stage: str, epochs: int, tracking: dict | None, run_dir: str | None = None,
                 extras: dict | None = None):  # fmt: skip
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.stage, self.epochs, self.run_dir = stage, epochs, run_dir
        self.extras = extras if extras is not None else {}  # the dict every checkpoint stores (StageInputs.extras)
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.started = time.perf_counter()
        self.last_progress = 0.0
        self.logger = None
        self.system_metrics = float(tracking.get("system_metrics") or 0) if tracking else 0.0  # seconds; 0 is off
        if tracking and self.rank == 0:
            from pipeline.tracking.runs import StepLogger

            self.logger = StepLogger(tracking["uri"], tracking["run_id"], self.system_metrics)

    def restore(self) -> dict | None:
        import ray.train
        import torch

        checkpoint = ray.train.get_checkpoint()
        committed = _epoch_of(checkpoint.path) if checkpoint is not None else 0
        states = _uploaded_after(self.run_dir, committed) if self.run_dir else []
        if states:
            # Epochs in the run's folder that Ray does not know of: the run stopped between an epoch's
            # upload and Ray committing it (Ctrl-C, a lost driver), or the folder came from another runs
            # folder ('s4mim runs import'), without Ray's own record. Report them again, the best
            # evaluated one first, so that Ray ranks it with the others and keeps it.
            for state in states:
                self._report_checkpoint(self._reported(state["metrics"], state["epoch"]), state, state["epoch"])
            state = states[-1]
            best = state["best_miou"]
            lost = checkpoint is None and best >= 0 and all(s["metrics"].get("val/miou") != best for s in states)
            if lost and self.rank == 0:
                _emit(f"[{self.stage}] the epoch of its best val mIoU so far ({best:.2f}) is not among the "
                      "checkpoints to resume from: the best checkpoint comes from the epochs from here on")  # fmt: skip
        elif checkpoint is None:
            return None
        else:
            with checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        # the machines that trained the epochs before this one (numerics differ from CPU to CPU)
        self.extras["machines"] = with_earlier(self.extras.get("machines", []), state)
        if self.rank == 0:
            _emit(f"[{self.stage}] resuming after epoch {state['epoch'] + 1}")
            stored = state.get("mlflow_run_id")  # not in this store when the run was imported from another
            moved = self.logger is not None and stored and stored != self.logger.run_id
            if moved and self.logger.tracker.has_run(stored):
                from pipeline.tracking.runs import StepLogger

                self.logger.close()
                self.logger = StepLogger(self.logger.tracker.uri, stored, self.system_metrics)  # the state's run
        return state

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step)

    def progress(self, label: str, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if self.rank == 0 and (done >= total or now - self.last_progress >= PROGRESS_EVERY):
            self.last_progress = now
            event("progress", label=label, done=done, total=total, detail=detail)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    @staticmethod
    def _reported(metrics: dict[str, float], epoch: int) -> dict[str, float]:
        # Every epoch carries a score: its val mIoU, or -1 where it was not evaluated, so that the
        # checkpoint manager keeps the best evaluated checkpoint next to the latest one.
        return {**metrics, "val/score": metrics.get("val/miou", -1.0), "epoch": epoch + 1}

    def _report_checkpoint(self, reported: dict[str, float], state: dict, epoch: int) -> None:
        """``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint."""
        import ray.train
        import torch

        name = f"epoch_{epoch + 1:04d}"
        if self.rank != 0:
            ray.train.report(reported, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)

    def report(self, metrics: dict[str, float], state: dict, *, epoch: int, best: bool) -> None:
        from pipeline.console import format_metrics
        from pipeline.training.stages import EPOCH_KEYS

        if self.rank == 0 and self.logger is not None and "val/miou" in metrics:
            self.logger.log({"val/miou": metrics["val/miou"]}, epoch + 1, key="val/miou")
        self._report_checkpoint(self._reported(metrics, epoch), state, epoch)
        if self.rank != 0:
            return
        elapsed = time.perf_counter() - self.started
        _emit(
            f"[{self.stage}] epoch {epoch + 1}/{self.epochs}  {format_metrics(metrics, EPOCH_KEYS)}  ({elapsed:.0f} s)"
        )


def _epoch_of(checkpoint_path: str) -> int:
    """The epoch number in a checkpoint folder's name (``.../epoch_0003`` -> 3), 0 if it has none."""
    return epoch_number(str(checkpoint_path).rstrip("/").rsplit("/", 1)[-1])


def _uploaded_after(run_dir: str, epoch: int) -> list[dict]:
    """The checkpoint states in ``run_dir`` (local path or URI) past ``epoch`` to resume from: the newest
    complete one, after the one holding its best val mIoU where that is an earlier one. Empty if none.

    Ray commits an uploaded checkpoint only when its controller next polls the workers; a run stopped
    in between leaves a finished epoch's folder that Ray does not know, and an imported run's folders
    are all unknown to it. A folder whose copy was cut short does not load, and the one before it is tried.
    """
    import io

    import pyarrow.fs as pafs
    import torch

    fs, base = pafs.FileSystem.from_uri(run_dir) if is_uri(run_dir) else (pafs.LocalFileSystem(), run_dir)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        number = _epoch_of(info.path)
        if info.type == pafs.FileType.Directory and number > epoch:
            found.append((number, info.path))

    def load(path: str) -> dict | None:
        try:
            with fs.open_input_file(f"{path}/{STATE_FILE}") as handle:
                return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False)
        except Exception:  # missing or truncated: an upload that did not finish
            return None

    folders = [path for _, path in sorted(found, reverse=True)]
    for n, path in enumerate(folders):
        newest = load(path)
        if newest is None:
            continue
        if newest["metrics"].get("val/miou") == newest["best_miou"]:
            return [newest]
        for earlier in map(load, folders[n + 1 :]):
            if earlier is not None and earlier["metrics"].get("val/miou") == newest["best_miou"]:
                return [earlier, newest]
        return [newest]
    return []


def _local_checkpoint(path: str | None):
    """A context manager giving a local state.pt for a checkpoint path or URI."""
    from contextlib import contextmanager, nullcontext

    if path is None:
        return nullcontext(None)
    if not is_uri(path) and Path(path).is_file():
        return nullcontext(Path(path))

    @contextmanager
    def materialise():
        import ray.train

        with ray.train.Checkpoint(path=path).as_directory() as folder:
            yield Path(folder) / STATE_FILE

    return materialise()


def _throttled(send):
    """``send(done=…, total=…)`` at most every ``PROGRESS_EVERY`` seconds, and for the last."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            send(done=done, total=total)

    return report


def _worker_loop(loop: dict):
    """Runs on every Ray Train worker: the stage as plain engine code."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.config.schema import Config
    from pipeline.machine import machine
    from pipeline.training.stages import StageInputs, evaluate, fit, gather

    # Ray Train sets the worker's root logger to INFO; its per-report records would flood the console.
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(loop["threads"])))
    config = Config.model_validate(loop["config"])
    stage = loop["stage"]
    with _local_checkpoint(loop["init_checkpoint"]) as init:
        extras = dict(loop["extras"])
        if stage != "evaluate":  # what trained it: numerics differ from CPU to CPU
            extras["machines"] = sorted(set(gather(machine())))
        inputs = StageInputs(Path(loop["manifest"]), Path(loop["split_dir"]), init, extras)
        if stage == "evaluate":
            context = ray.train.get_context()
            device = ray.train.torch.get_device()
            rank = context.get_world_rank()
            shown = _throttled(partial(event, "progress", label="[evaluate] val batches")) if rank == 0 else None
            evaluation = evaluate(config, inputs, device, rank, context.get_world_size(), progress=shown)
            return {
                "miou": evaluation.miou,
                "iou": evaluation.iou,
                "table_csv": evaluation.table_csv,
                "grid_png": evaluation.grid_png,
            }
        schedule = config.warmup if stage == "warmup" else config.train
        context = RayContext(stage, schedule.epochs, loop["tracking"], loop["run_dir"], extras)  # adds earlier machines
        try:
            result = fit(config, stage, inputs, context)
        finally:
            context.close()
    result["worker_nodes"] = gather(ray.get_runtime_context().get_node_id())
    result["world_size"] = len(result["worker_nodes"])
    result["machines"] = extras["machines"]  # every machine that trained an epoch of it, resumed ones too
    return result


# -- the driver ----------------------------------------------------------------------------------


def run_name(config: Config, stage: str, inputs_hash: str) -> str:
    return f"{slug(config.preset)}-{stage}-{stage_hash(config, stage, inputs_hash)}"


def run_job(
    config: Config,
    stage: str,
    prepared,
    *,
    storage: str,
    name: str,
    init_checkpoint: str | None,
    tracking: dict | None = None,
    callbacks: list | None = None,
):
    """Run one stage as a TorchTrainer and return the Ray Train ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = config.scaling
    use_gpu = s.gpus_per_worker > 0
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if use_gpu else {})}
    loop = {
        "config": config.model_dump(mode="json"),
        "stage": stage,
        "manifest": str(prepared.manifest),
        "split_dir": str(prepared.split_dir),
        "init_checkpoint": init_checkpoint,
        "tracking": tracking,
        "extras": {"mlflow_run_id": tracking["run_id"]} if tracking else {},
        "threads": s.cpus_per_worker,
        "run_dir": f"{storage.rstrip('/')}/{name}",
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val/score", checkpoint_score_order="max"
            ),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return _fit_keeping_ctrl_c(trainer)


def _fit_keeping_ctrl_c(trainer):
    """``trainer.fit()``, with Ctrl-C left to this process.

    Called from the main thread, Ray Train installs a SIGINT handler that aborts the run and exits
    the process with no message, and no hook to resume cleanly. From another thread it installs
    none (as in a Tune trial): the main thread then gets the KeyboardInterrupt, the CLI reports it
    with exit code 130, and the Ray workers end with this driver. Any epoch uploaded but not yet
    committed is picked up by the next run (see ``_uploaded_after``).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a bounded join, so that Ctrl-C reaches this thread at once
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def best_checkpoint_path(result) -> str:
    """The path (or URI) of the run's best checkpoint by val score, or of its last when none is ranked."""
    best = result.get_best_checkpoint("val/score", "max") if result.best_checkpoints else None
    return str((best or result.checkpoint).path)


class RayBackend:
    """Runs each training and evaluation stage as a Ray Train job, tracked in MLflow."""

    def __init__(self, runs: Path, tracking_uri: str | None, address: str | None = None):
        self.runs = runs
        self.storage = storage_path(runs)
        self.tracking_uri = tracking_uri
        self.address = address
        self.pipeline = None  # PipelineTracking, set by begin()
        self.logs = ExitStack()  # the command's log of Ray and MLflow output outside any stage, from begin() to end()

    def begin(
        self, config: Config, prepared, *, parent_key=None, parent_name=None, parent_tags=None, fresh=False
    ) -> None:
        """Join Ray, check the workers fit, and open the parent run (the pipeline's, or a sweep's); ``fresh``
        opens a new parent run even if one with the same key exists."""
        say(connect(self.address))
        self.logs.enter_context(stage_log(self.runs / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))
        check_fits(config)
        if self.tracking_uri:
            from pipeline.tracking.runs import PipelineTracking

            self.pipeline = PipelineTracking(
                self.tracking_uri, config, prepared, key=parent_key, name=parent_name, tags=parent_tags, fresh=fresh
            )

    def forget(self, config: Config, stage: str, prepared) -> None:
        """Remove a stage's Ray run so that it starts from scratch (``--force``)."""
        remove_storage_tree(f"{self.storage.rstrip('/')}/{run_name(config, stage, prepared.inputs_hash)}")

    def run_stage(self, config: Config, stage: str, prepared, folder: Path, init_checkpoint) -> dict:
        run_id = self.pipeline.stage_run(stage) if self.pipeline else None
        tracking = None
        if run_id:
            tracking = {"uri": self.tracking_uri, "run_id": run_id, "system_metrics": system_metrics_interval(config)}
        name = run_name(config, stage, prepared.inputs_hash)
        started = time.perf_counter()
        log = Path(folder) / STAGE_LOG
        try:
            with stage_log(log):
                result = run_job(
                    config,
                    stage,
                    prepared,
                    storage=self.storage,
                    name=name,
                    init_checkpoint=str(init_checkpoint) if init_checkpoint else None,
                    tracking=tracking,
                )
                if result.error is not None:
                    raise result.error
                return self._record(config, stage, folder, init_checkpoint, result, run_id, name, started, log)
        except BaseException as exc:
            if run_id:
                self.pipeline.finish(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            lost = cluster_lost(exc)
            if lost:
                raise UsageError(
                    f"the Ray cluster went away during the {stage} stage ({lost}); check it with 's4mim doctor', "
                    "then run the same command again to resume"
                ) from None
            if not isinstance(exc, KeyboardInterrupt) and find_user_error(exc) is None:
                _show_tail(stage, log)
            raise

    def _record(self, config, stage, folder, init_checkpoint, result, run_id, name, started, log) -> dict:
        """The finished stage's result.json, and what its MLflow run keeps of it."""
        from pipeline.orchestration.results import write_evaluation, write_result

        if stage == "evaluate":
            value = result.return_value
            from pipeline.training.stages import Evaluation

            evaluation = Evaluation(value["miou"], value["iou"], value["table_csv"], value["grid_png"], None)
            out = write_evaluation(folder, evaluation, Path(str(init_checkpoint)))
            if run_id:
                self._log_evaluation(run_id, evaluation, folder)
        else:
            out = dict(result.return_value or {})
            out["checkpoint"] = best_checkpoint_path(result)
            out["ray_run"] = name
            if run_id and stage == "train":
                with prints_into(log):  # MLflow prints its registration steps
                    out["registered"] = self.pipeline.log_model(run_id, out["checkpoint"], out["best_miou"])
            write_result(folder, out)
            if run_id and stage == "warmup":
                self.pipeline.tracker.log_metrics(self.pipeline.parent_id, {"val/miou_warmup": out["best_miou"]}, 0)
        out["seconds"] = time.perf_counter() - started
        if run_id:
            self.pipeline.tracker.log_metrics(run_id, {"stage/seconds": out["seconds"]}, 0)
            self.pipeline.finish(run_id)
        return out

    def _log_evaluation(self, run_id: str, evaluation, folder: Path) -> None:
        tracker = self.pipeline.tracker
        per_class = {f"val/iou/{name.replace(' ', '_')}": value for name, value in evaluation.iou.items()}
        tracker.log_metrics(run_id, {"val/miou": evaluation.miou, **per_class}, 0)
        tracker.log_text(run_id, evaluation.table_csv, "iou.csv")
        if evaluation.grid_png:
            tracker.log_bytes(run_id, evaluation.grid_png, "grid.png")
        tracker.log_metrics(self.pipeline.parent_id, {"val/miou": evaluation.miou}, 0)

    def end(self, ok: bool, status: str | None = None) -> str | None:
        try:
            if self.pipeline is None:
                return None
            self.pipeline.finish(self.pipeline.parent_id, status or ("FINISHED" if ok else "FAILED"))
            return self.pipeline.parent_id
        finally:
            self.logs.close()


def _show_tail(stage: str, log: Path, lines: int = 20) -> None:
    """What Ray and MLflow said last, on stderr: a failure's cause is often there, not in the traceback."""
    last = tail(log, lines)
    if last:
        print(f"the {stage} stage failed; the last lines of {log}:", file=sys.stderr)
        for line in last:
            print(f"  {line}", file=sys.stderr)
        sys.stderr.flush()
