"""Integration: stages as Ray Train jobs on a real local Ray, tracked in a real MLflow store."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
import time

import pytest

from tests.conftest import tiny_args
from tests.pipeline.cli_helpers import S4MIM, run_s4mim
from tests.pipeline.ray_helpers import (
    env_for,
    kill,
    mlflow_runs,
    start_cluster,
    train_worker_pids,
    wait_for,
)

pytestmark = pytest.mark.filterwarnings("ignore")
ANSI = re.compile(r"\x1b\[")
SPEC_TAGS = {"dataset", "split", "labeled_count", "variant", "stage", "git_sha", "config_hash", "world_size"}


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(nodes=1, cpus_per_node=2)
    yield cluster
    cluster.shutdown()


def s4mim(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_s4mim(*args, env=env, timeout=timeout)


def _tracking(runs):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")


def test_pipeline_runs_as_ray_jobs_and_is_tracked_then_cached(cluster, tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    env = {**env_for(runs, cluster.address), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    args = ["pipeline", "run", "shapes-1/8", *tiny_args(tiny_shapes, "scaling.workers=2")]
    first = s4mim(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "MLflow parent run: " in first.stdout and "make ui" in first.stdout
    for stage in ("warmup", "train", "evaluate"):
        assert f"\n{stage:<10} ran" in first.stdout
    _check_console(first, runs)

    records = mlflow_runs(runs / "mlflow.db")
    parents = [r for r in records if "mlflow.parentRunId" not in r["tags"]]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in records if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
    assert sorted(c["tags"]["stage"] for c in children) == ["evaluate", "train", "warmup"]
    for child in children:
        assert SPEC_TAGS <= set(child["tags"]), child["tags"]
        assert child["status"] == "FINISHED"
        assert child["tags"]["split"] == "shapes-1/8" and child["tags"]["world_size"] == "2"
        assert child["tags"]["labeled_count"] == "10"
    by_stage = {c["tags"]["stage"]: c for c in children}
    assert by_stage["warmup"]["tags"]["variant"] == "supervised" and by_stage["train"]["tags"]["variant"] == "s4mim"

    client = _tracking(runs)
    train = client.get_run(by_stage["train"]["run_id"])
    for key in ("train/loss", "train/loss_x", "train/loss_cmim", "train/loss_fa", "train/loss_smim", "train/lr",
                "train/mask_ratio", "train/img_per_s", "val/miou"):  # fmt: skip
        assert key in train.data.metrics, key
    assert train.data.params["mim.ratio"] == "0.5"
    evaluation = client.get_run(by_stage["evaluate"]["run_id"])
    assert "val/iou/background" in evaluation.data.metrics and "val/miou" in evaluation.data.metrics
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"iou.csv", "grid.png", "config.json"} <= artifacts
    assert "val/miou" in client.get_run(parent["run_id"]).data.metrics

    # The UI's view: a model-training experiment, datasets, a logged and registered model, system metrics.
    experiment = client.get_experiment(train.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for child in children:
        run = client.get_run(child["run_id"])
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name == "shapes/1/4" and dataset.dataset.digest  # TINY_OVERRIDES: 1/4
        context = "eval" if child["tags"]["stage"] == "evaluate" else "train"
        assert [t.value for t in dataset.tags] == [context]
        assert run.data.tags["mlflow.source.name"] == "s4mim"
    for stage in ("warmup", "train"):
        assert any(k.startswith("system/cpu") for k in client.get_run(by_stage[stage]["run_id"]).data.metrics), stage
    (version,) = client.search_model_versions("name='s4mim-shapes'")
    assert version.run_id == train.info.run_id and version.tags["split"] == "shapes-1/8"
    assert version.tags["variant"] == "s4mim" and float(version.tags["val_miou"]) >= 0
    assert train.data.tags["registered_model"] == f"s4mim-shapes/{version.version}"
    _check_pyfunc_scores(runs, f"models:/s4mim-shapes/{version.version}")

    result = json.loads(next((runs / "stages" / "shapes-1_8").glob("warmup-*/result.json")).read_text())
    assert result["world_size"] == 2 and result["steps_per_epoch"] == 1  # 10 labeled, batch 4, 2 workers

    second = s4mim(*args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("prepare", "warmup", "train", "evaluate"):
        assert f"\n{stage:<10} cached" in second.stdout
    assert "running ->" not in second.stdout
    assert len(mlflow_runs(runs / "mlflow.db")) == len(records)  # nothing new was trained or logged


def _check_console(done: subprocess.CompletedProcess, runs) -> None:
    """The console shows the project's own lines only, without colours into a pipe; Ray's and MLflow's
    own output lands in each stage folder's ``stage.log``."""
    shown = done.stdout + done.stderr
    assert "core_worker.cc" not in shown and "(RayTrainWorker pid=" not in shown and "TrainController" not in shown
    assert not ANSI.search(shown), shown
    assert "Pickle" not in shown and "registered model" not in shown
    assert "FutureWarning" not in shown  # torch's deprecations are the project's to follow, not the user's to read
    assert "[warmup] epoch 1/1  loss" in done.stdout and "[train] epoch 1/1  loss" in done.stdout  # from the workers
    stages = runs / "stages" / "shapes-1_8"
    logs = {folder.name.split("-")[0]: (folder / "stage.log").read_text() for folder in stages.glob("*-*")
            if (folder / "stage.log").is_file()}  # fmt: skip
    assert set(logs) == {"warmup", "train", "evaluate"}
    for stage, text in logs.items():
        assert "(TrainController pid=" in text, stage  # Ray's own output, with its plain prefix
        assert not ANSI.search(text), stage
    assert "Pickle" in logs["train"]  # MLflow's warning when the model is logged


def _check_pyfunc_scores(runs, uri: str) -> None:
    """``mlflow.pyfunc.load_model(uri).predict`` gives the class scores of the checkpoint loaded directly."""
    import mlflow
    import numpy as np
    import torch

    from pipeline.config.schema import Config
    from pipeline.tracking.runs import using_tracking_uri
    from pipeline.training.engine import build_model, load_weights
    from pipeline.training.stages import load_state

    batch = np.random.default_rng(0).standard_normal((2, 3, 40, 44)).astype(np.float32)
    with using_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}"):  # and not for the tests after this one
        served = np.asarray(mlflow.pyfunc.load_model(uri).predict(batch))
    result = json.loads(next((runs / "stages" / "shapes-1_8").glob("train-*/result.json")).read_text())
    state = load_state(result["checkpoint"])
    model = build_model(Config.model_validate(state["config"]), len(state["classes"]), reconstruction=False)
    load_weights(model, state["engine"]["model"])
    with torch.no_grad():
        direct = model.eval()(torch.from_numpy(batch)).logits.numpy()
    assert served.shape == direct.shape == (2, len(state["classes"]), 40, 44)
    np.testing.assert_allclose(served, direct, atol=1e-5)


def test_killed_worker_resumes_from_its_checkpoint_into_the_same_run(cluster, tiny_shapes, tmp_path):
    """Also run with --verbose: Ray's own output then reaches the console beside the project's lines."""
    runs = tmp_path / "runs"
    env = env_for(runs, cluster.address)
    args = [
        "warmup",
        "shapes-1/8",
        "--verbose",
        *tiny_args(tiny_shapes, "warmup.epochs=5", "warmup.eval_every=1", "scaling.workers=2", "data.split=1/2"),
    ]
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("done", s4mim(*args, env=env)))
    thread.start()
    storage = runs / "ray"
    wait_for(lambda: list(storage.glob("*/epoch_0002")), 300, "the second epoch's checkpoint")
    victims = wait_for(lambda: train_worker_pids(cluster), 60, "a train worker of this test's cluster")
    kill(victims[-1])
    thread.join(600)
    done = outcome["done"]
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(next((runs / "stages" / "shapes-1_8").glob("warmup-*/result.json")).read_text())
    assert result["epochs"] == 5
    records = [r for r in mlflow_runs(runs / "mlflow.db") if r["tags"].get("stage") == "warmup"]
    assert len(records) == 1  # the restarted workers logged into the same run
    client = _tracking(runs)
    epochs = [m.step for m in client.get_metric_history(records[0]["run_id"], "val/miou")]
    assert sorted(epochs) == [1, 2, 3, 4, 5]  # every epoch once: none lost, none repeated
    steps = [m.step for m in client.get_metric_history(records[0]["run_id"], "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 5 * result["steps_per_epoch"]

    # --verbose: the project's lines as without it, Ray's own output on stderr, and both still in stage.log
    assert "[warmup] epoch 5/5  loss" in done.stdout
    assert "(TrainController pid=" in done.stderr
    (log,) = (runs / "stages" / "shapes-1_8").glob("warmup-*/stage.log")
    assert "(TrainController pid=" in log.read_text()


def test_cluster_that_cannot_fit_the_workers_fails_before_training(cluster, tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    args = tiny_args(tiny_shapes, "scaling.workers=5")
    done = s4mim("warmup", "shapes-1/8", *args, env=env_for(runs, cluster.address), timeout=120)
    assert done.returncode == 2
    assert "can never fit 5 worker(s)" in done.stderr and "scaling.workers" in done.stderr
    assert not (runs / "ray").exists() or not any((runs / "ray").iterdir())


@pytest.mark.slow  # about 70 s: Ray Train replaces killed workers twice before the stage fails
def test_a_stage_whose_workers_keep_dying_fails_with_the_tail_of_its_log(cluster, tiny_shapes, tmp_path):
    """The train workers are killed each time they have saved a new checkpoint, more often than
    ``FailureConfig`` replaces them: the stage fails, and what Ray said last (the cause is there, not in
    the driver's traceback) is printed from the stage folder's ``stage.log``."""
    runs = tmp_path / "runs"
    args = ["warmup", "shapes-1/8", *tiny_args(tiny_shapes, "warmup.epochs=50")]
    env = {**os.environ, **env_for(runs, cluster.address)}
    kills, seen = 0, 0
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([str(S4MIM), *args], stdout=out, stderr=err, text=True, env=env)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            saved = len(list((runs / "ray").glob("*/epoch_*")))
            if saved > seen:  # a worker group that has started training: kill it (a start-up failure would be retried)
                seen = saved
                for pid in train_worker_pids(cluster):
                    kill(pid)
                kills += 1
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            raise AssertionError(f"the stage still ran after its workers were killed {kills} times")
    stderr = (tmp_path / "err").read_text()
    assert proc.returncode not in (0, 2), stderr[-3000:]  # not a success, and not a user error
    assert kills >= 3, kills  # the first group and the two replacements FailureConfig allows
    (log,) = (runs / "stages" / "shapes-1_8").glob("warmup-*/stage.log")
    heading = f"the warmup stage failed; the last lines of {log}:"
    assert heading in stderr, stderr[-3000:]
    after = stderr.split(heading, 1)[1].splitlines()[1:]
    shown = [line[2:] for line in itertools.takewhile(lambda line: line.startswith("  "), after)]
    lines = log.read_text().splitlines()
    assert shown and shown == lines[-len(shown) :]  # the log's own last lines
