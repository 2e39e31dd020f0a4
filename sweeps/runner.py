"""``s4mim sweep SPEC``: Ray Tune over the train stage, from one shared warmup checkpoint.

    s4mim sweep default                          # sweeps/specs/default.json, on a local Ray
    RAY_ADDRESS=head:6379 s4mim sweep my-spec.json

Each trial is a small driver function (0.01 CPU) that builds and fits a ``TorchTrainer`` and
reports through ``TuneReportCallback``; ASHA stops weak trials on ``val/miou`` with the epoch as
its time attribute. Rerunning a sweep restores it: finished trials are kept, unfinished ones
resume from their own checkpoints. At the end the best config is written as a preset file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from data_prep.atomic import write_text
from pipeline.config.schema import Config, apply_overrides
from pipeline.console import say
from pipeline.errors import UsageError
from pipeline.orchestration.hashing import stage_hash
from sweeps.spec import SweepSpec

TRIAL_DRIVER_CPU = 0.01  # a Tune trial only waits on its TorchTrainer


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    metric: float | None
    epochs: int
    status: str  # completed, stopped (by ASHA), error, unfinished (the sweep was interrupted)


@dataclass
class SweepOutcome:
    rows: list[TrialRow]
    best: TrialRow | None
    preset_file: Path | None
    parent_run_id: str | None
    interrupted: bool = False


def concurrency(spec: SweepSpec, config: Config) -> tuple[int, str]:
    """How many trials fit on the cluster at once; fails when not even one ever fits."""
    import ray

    total = ray.cluster_resources()
    s = config.scaling
    cpu = TRIAL_DRIVER_CPU + s.workers * s.cpus_per_worker
    gpu = s.workers * s.gpus_per_worker
    fit = math.floor(total.get("CPU", 0) / cpu + 1e-9)
    if gpu > 0:
        fit = min(fit, math.floor(total.get("GPU", 0) / gpu + 1e-9))
    need = f"{cpu:g} CPU" + (f" and {gpu:g} GPU" if gpu else "")
    if fit < 1:
        raise UsageError(
            f"a trial needs {need} but the cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU, "
            'so it can never run; lower scaling.* in the spec\'s "set", or add nodes'
        )
    trials = trial_count(spec)
    n = min(fit, spec.max_concurrent or fit, trials)
    return (
        n,
        f"{trials} trial(s), up to {n} at once (a trial takes {need}; the cluster has {total.get('CPU', 0):g} CPU)",
    )


def trial_count(spec: SweepSpec) -> int:
    """Trials in the sweep: ``num_samples`` times the size of the grid, if any key is a grid."""
    return spec.num_samples * math.prod(len(d.grid) for d in spec.space.values() if d.kind == "grid")


def ended_trials(path: str) -> set[str]:
    """Ids of the trials that ended (completed, stopped by the scheduler, or errored), from the
    experiment state Tune saves as fit() returns. On Ctrl-C, Tune's clean-up then marks the
    interrupted trials terminated in memory, but the saved state still has them running."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id for t in ExperimentAnalysis(path).trials if t.status in ("TERMINATED", "ERROR")}


def _trial(params: dict, *, base: dict, prepared, teacher: str, storage: str, tracking: dict | None, sweep: str):
    """One Tune trial: the train stage as a TorchTrainer, reporting to Tune through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.backends.ray_train import run_job

    config = apply_overrides(Config.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    run_id = None
    if tracking:
        run_id = _trial_run(tracking, config, prepared, sweep, trial_id)
    result = run_job(
        config,
        "train",
        prepared,
        storage=storage,
        name=f"{sweep}-{trial_id}",
        init_checkpoint=teacher,
        tracking={"uri": tracking["uri"], "run_id": run_id} if run_id else None,
        callbacks=[TuneReportCallback()],
    )
    if run_id:
        from pipeline.tracking.runs import Tracker

        Tracker(tracking["uri"]).finish(run_id, "FAILED" if result.error else "FINISHED")
    if result.error:
        raise result.error


def _trial_run(tracking: dict, config: Config, prepared, sweep: str, trial_id: str) -> str:
    from pipeline.tracking.runs import Tracker, flat_params, run_tags

    tracker = Tracker(tracking["uri"])
    key = f"trial-{sweep}-{trial_id}"
    found = tracker.find(tracking["experiment_id"], key, tracking["parent_id"])
    if found:
        tracker.reopen(found)
        return found
    digest = stage_hash(config, "train", prepared.inputs_hash)
    tags = run_tags(config, "train", prepared.labeled, digest, config.scaling.workers)
    tags |= {"sweep_id": sweep, "trial_id": trial_id}
    run_id = tracker.create(tracking["experiment_id"], key, f"{sweep} {trial_id}", tags, tracking["parent_id"])
    tracker.log_params(run_id, flat_params(config))
    return run_id


def _fingerprint(spec: SweepSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]


def run_sweep(spec: SweepSpec, runs: Path, backend, *, fresh: bool = False) -> SweepOutcome:
    """Warm up once (or reuse the cached warmup), then run or restore the Tune experiment."""
    from functools import partial

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.backends.ray_train import remove_storage_tree
    from pipeline.orchestration.orchestrate import claimed, prepare_inputs, run_claimed

    base = spec.check_keys()
    prepared = prepare_inputs(base, runs)
    # Claimed before the sweep's run is tracked, so that a refused sweep leaves no trace.
    with claimed(runs, base, "warmup", prepared) as warm_claim:
        backend.begin(
            base,
            prepared,
            parent_key=f"sweep-{spec.name}-{_fingerprint(spec)}",
            parent_name=f"sweep {spec.name}",
            parent_tags={"sweep_id": spec.name, "stage": "sweep"},
            fresh=fresh,
        )
        n_concurrent, plan = concurrency(spec, base)
        say(f"sweep {spec.name}: {plan}")
        say(f"  space: {', '.join(f'{k} ({d.kind} {getattr(d, d.kind)})' for k, d in spec.space.items())}")
        epochs = base.train.epochs
        asha = spec.scheduler
        say(
            f"  ASHA on {spec.metric} ({spec.mode}), epochs 1..{epochs}, grace {asha.grace_period}, "
            f"reduction factor {asha.reduction_factor:g}"
        )
        ok = interrupted = False
        try:
            say("[warmup] shared by every trial")
            warm = run_claimed(backend, base, prepared, warm_claim, None)

            experiments = f"{backend.storage.rstrip('/')}/sweeps"
            path = f"{experiments}/{spec.name}"
            marker = runs / "sweeps" / spec.name / "spec.json"
            if fresh:
                remove_storage_tree(path)  # the Tune experiment, wherever it is stored, so nothing restores it
                marker.unlink(missing_ok=True)
            tracking = None
            if backend.pipeline is not None:
                tracking = {
                    "uri": backend.tracking_uri,
                    "parent_id": backend.pipeline.parent_id,
                    "experiment_id": backend.pipeline.experiment_id,
                }
            trainable = tune.with_resources(
                partial(
                    _trial,
                    base=base.model_dump(mode="json"),
                    prepared=prepared,
                    teacher=warm["checkpoint"],
                    storage=backend.storage,
                    tracking=tracking,
                    sweep=spec.name,
                ),
                {"CPU": TRIAL_DRIVER_CPU},
            )
            if tune.Tuner.can_restore(path):
                if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != _fingerprint(spec):
                    raise UsageError(f"sweep {spec.name} exists with another spec; rename the sweep or pass --fresh")
                say(f"restoring sweep {spec.name} from {path}: finished trials are kept")
                tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
            else:
                write_text(marker, json.dumps({"fingerprint": _fingerprint(spec), "spec": spec.model_dump()}, indent=2))
                scheduler = ASHAScheduler(
                    time_attr="epoch",
                    max_t=epochs,
                    grace_period=spec.scheduler.grace_period,
                    reduction_factor=spec.scheduler.reduction_factor,
                )
                tuner = tune.Tuner(
                    trainable,
                    param_space={k: d.to_tune() for k, d in spec.space.items()},
                    tune_config=tune.TuneConfig(
                        metric=spec.metric,
                        mode=spec.mode,
                        num_samples=spec.num_samples,
                        scheduler=scheduler,
                        max_concurrent_trials=n_concurrent,
                    ),
                    run_config=tune.RunConfig(name=spec.name, storage_path=experiments, verbose=1),
                )
            grid = tuner.fit()
            # Tune returns from fit() on Ctrl-C too; the trials it had not ended were interrupted,
            # not stopped by ASHA, and the ones it had not started yet are missing from the grid.
            rows = _rows(grid, spec, epochs, ended_trials(path))
            interrupted = len(rows) < trial_count(spec) or any(r.status == "unfinished" for r in rows)
            best = None if interrupted else _best(rows, spec.mode)
            _mark_outcomes(backend, spec, rows, best)
            preset_file = _write_preset(spec, best, runs) if best else None
            ok = not interrupted
        finally:
            parent = backend.end(ok, "KILLED" if interrupted else None)
    return SweepOutcome(rows, best, preset_file, parent, interrupted)


def _rows(grid, spec: SweepSpec, epochs: int, ended: set[str]) -> list[TrialRow]:
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        values = frame[spec.metric].dropna() if frame is not None and spec.metric in frame else []
        metric = None
        if len(values):
            metric = float(values.max() if spec.mode == "max" else values.min())
        reached = int(frame["epoch"].max()) if frame is not None and "epoch" in frame and len(frame) else 0
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(Path(result.path).name)
        if result.error is not None:
            status = "error"
        elif trial_id not in ended:
            status = "unfinished"
        elif reached < epochs:
            status = "stopped"
        else:
            status = "completed"
        params = {k: (result.config or {}).get(k) for k in spec.space}  # no config if it never reported
        rows.append(TrialRow(str(trial_id), params, metric, reached, status))
    return sorted(rows, key=lambda r: r.trial_id)


def _trial_id_of(folder: str) -> str:
    """The trial id in a trial folder's name: ``<trainable>_<trial id>_<index>_<params>_<time>``."""
    found = re.search(r"_([0-9a-f]+_\d{5})_", folder)
    return found.group(1) if found else folder


def _best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def _mark_outcomes(backend, spec: SweepSpec, rows: list[TrialRow], best: TrialRow | None) -> None:
    """Close every trial's run from here: ASHA stops trials at its rungs and at max_t alike, and a
    stopped trial never reaches the code after its fit()."""
    if backend.pipeline is None:
        return
    tracker, parent = backend.pipeline.tracker, backend.pipeline.parent_id
    for row in rows:
        run_id = tracker.find(backend.pipeline.experiment_id, f"trial-{spec.name}-{row.trial_id}", parent)
        if run_id is None:
            continue
        if row.status == "unfinished":
            continue  # left open: the resumed sweep appends to it and closes it
        tracker.set_tags(run_id, {"trial_status": row.status})
        if row.status == "stopped":
            tracker.set_tags(run_id, {"stopped_by": "asha"})
            tracker.finish(run_id, "KILLED")
        elif row.status == "error":
            tracker.finish(run_id, "FAILED")
        else:
            tracker.finish(run_id, "FINISHED")
    if best is not None:
        tracker.log_metrics(parent, {f"best/{spec.metric}": best.metric}, 0)
        tracker.set_tags(parent, {"best_trial": best.trial_id})


def _write_preset(spec: SweepSpec, best: TrialRow, runs: Path) -> Path:
    from pipeline.config.presets import user_presets_dir

    path = user_presets_dir() / f"{spec.name}-best.json"
    preset = {
        "base": spec.preset,
        "preset": f"{spec.name}-best",
        "description": f"best trial {best.trial_id} of sweep {spec.name}: {spec.metric} {best.metric:.2f}",
        "set": best.params,
    }
    write_text(path, json.dumps(preset, indent=2) + "\n")
    return path


def trial_table(rows: list[TrialRow], spec: SweepSpec) -> str:
    keys = list(spec.space)
    header = ["trial", *keys, spec.metric, "epochs", "status"]
    lines = [header]
    for r in rows:
        values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.params[k] for k in keys)]
        metric = f"{r.metric:.2f}" if r.metric is not None else "-"
        lines.append([r.trial_id, *values, metric, str(r.epochs), r.status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)
