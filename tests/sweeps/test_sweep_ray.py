"""Integration: sweeps on a real Ray Tune, tracked in a real MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from pipeline.config.schema import parse_override
from tests.conftest import TINY_OVERRIDES, copy_runs
from tests.pipeline.ray_helpers import env_for, mlflow_runs, start_cluster, wait_for

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(nodes=1, cpus_per_node=2)
    yield cluster
    cluster.shutdown()


def _spec(tmp_path, tiny_shapes, name: str, ratios: list[float], epochs: int = 2, **extra) -> str:
    fixed = {".".join(path): value for path, value in map(parse_override, TINY_OVERRIDES)}
    fixed |= {
        "data.root": str(tiny_shapes),
        "train.epochs": epochs,
        "train.steps_per_epoch": 1,
        "scaling.cpus_per_worker": 0.99,
    }
    spec = {
        "name": name,
        "preset": "shapes-1/8",
        "num_samples": 1,
        "space": {"mim.ratio": {"grid": ratios}},
        "scheduler": {"grace_period": 1, "reduction_factor": 2},
        "set": fixed,
        **extra,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _sweep(spec: str, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sweep", spec],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, **kwargs,
    )  # fmt: skip


def test_two_trial_sweep_nests_runs_and_writes_a_best_preset(cluster, tiny_shapes, tiny_pipeline, tmp_path):
    """In a runs folder that holds the tiny pipeline: the sweep's teacher is that pipeline's warmup, from the
    stage cache (the interrupted-sweep tests train theirs)."""
    runs = copy_runs(tiny_pipeline, tmp_path / "runs")
    env = env_for(runs, cluster.address)
    spec = _spec(tmp_path, tiny_shapes, "tiny-two", [0.3, 0.6])
    proc = _sweep(spec, env)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "2 trial(s), up to 2 at once" in out  # 2 CPUs, a trial takes 0.01 + 0.99
    assert "best config written to" in out

    records = mlflow_runs(runs / "mlflow.db")
    (parent,) = [r for r in records if r["tags"].get("stage") == "sweep"]
    assert parent["tags"]["sweep_id"] == "tiny-two" and "mlflow.parentRunId" not in parent["tags"]
    trials = [r for r in records if r["tags"].get("trial_id")]
    assert len(trials) == 2
    for trial in trials:
        assert trial["status"] in ("FINISHED", "KILLED") and trial["tags"]["trial_status"] in ("completed", "stopped")
        assert trial["tags"]["mlflow.parentRunId"] == parent["run_id"]
        assert trial["tags"]["sweep_id"] == "tiny-two" and trial["tags"]["stage"] == "train"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    ratios = sorted(float(client.get_run(t["run_id"]).data.params["mim.ratio"]) for t in trials)
    assert ratios == [0.3, 0.6]
    assert "[warmup] shared by every trial" in out and "[warmup] cached: " in out
    assert not [r for r in records if r["tags"].get("stage") == "warmup"]  # cached: no warmup trained or logged
    assert len(list((runs / "stages" / "shapes-1_8").glob("warmup-*"))) == 1

    preset = runs / "presets" / "tiny-two-best.json"
    best = json.loads(preset.read_text())
    assert best["base"] == "shapes-1/8" and best["set"]["mim.ratio"] in (0.3, 0.6)
    dry = subprocess.run([sys.executable, "-m", "pipeline", "pipeline", "run", str(preset), "--dry-run"],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=120)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    listed = subprocess.run([sys.executable, "-m", "pipeline", "presets"], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)  # fmt: skip
    assert "tiny-two-best.json" in listed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(cluster, tiny_shapes, tmp_path, signum):
    """Ctrl-C (SIGINT to the process group), or SIGTERM to the sweep alone, as ``kill`` sends it."""
    runs = tmp_path / "runs"
    env = env_for(runs, cluster.address)
    spec = _spec(tmp_path, tiny_shapes, "tiny-stop", [0.3, 0.6], epochs=2, max_concurrent=1)
    from mlflow import MlflowClient

    db = runs / "mlflow.db"
    proc = _sweep(spec, env, start_new_session=True)

    def finished_trial():
        for record in mlflow_runs(db):
            if record["tags"].get("trial_id"):  # the store exists: a client may open it now
                client = MlflowClient(f"sqlite:///{db}")
                epochs = [m.step for m in client.get_metric_history(record["run_id"], "val/miou")]
                if 2 in epochs:  # its last epoch is logged
                    return record
        return None

    first = wait_for(finished_trial, 600, "the first trial to finish", interval=1.0)
    # One trial at a time: Tune starts the second (which opens its run first thing) once it has ended the first.
    wait_for(lambda: len([r for r in mlflow_runs(db) if r["tags"].get("trial_id")]) == 2, 300, "the second trial")
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "sweep interrupted" in out, out[-3000:]
    assert "stopped early by ASHA" not in out and not (runs / "presets" / "tiny-stop-best.json").exists()
    client = MlflowClient(f"sqlite:///{db}")
    history = [m.step for m in client.get_metric_history(first["run_id"], "val/miou")]
    assert history == [1, 2]

    again = _sweep(spec, env)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    assert "restoring sweep tiny-stop" in out
    assert [m.step for m in client.get_metric_history(first["run_id"], "val/miou")] == [1, 2]
    trials = [r for r in mlflow_runs(db) if r["tags"].get("trial_id")]
    assert len(trials) == 2 and all(r["status"] in ("FINISHED", "KILLED") for r in trials)
    assert {r["tags"]["trial_status"] for r in trials} <= {"completed", "stopped"}
    ids = {r["tags"]["trial_id"] for r in trials}
    table = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ids]
    assert len(table) == 2 and all(row[-1] in ("completed", "stopped") for row in table)


@pytest.mark.parametrize("as_uri", [False, True])
def test_remove_storage_tree_deletes_a_folder_given_as_a_path_or_a_uri(tmp_path, as_uri):
    from pipeline.backends.ray_train import remove_storage_tree

    folder = tmp_path / "sweeps" / "old"
    (folder / "trial").mkdir(parents=True)
    (folder / "trial" / "result.json").write_text("{}")
    keep = tmp_path / "sweeps" / "other"
    keep.mkdir()
    remove_storage_tree(folder.as_uri() if as_uri else str(folder))
    assert not folder.exists() and keep.is_dir()
    remove_storage_tree(folder.as_uri() if as_uri else str(folder))  # already gone: nothing to do, no error


@pytest.mark.slow
def test_fresh_sweep_on_uri_storage_starts_over(cluster, tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    storage = tmp_path / "storage"
    env = {**env_for(runs, cluster.address), "S4MIM_STORAGE": storage.as_uri()}
    spec = _spec(tmp_path, tiny_shapes, "tiny-fresh", [0.3], epochs=1)
    first = _sweep(spec, env)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert (storage / "sweeps" / "tiny-fresh").is_dir()

    changed = _spec(tmp_path, tiny_shapes, "tiny-fresh", [0.6], epochs=1)  # same name, another spec
    refused = _sweep(changed, env)
    out, err = refused.communicate(timeout=900)
    assert refused.returncode == 2 and "pass --fresh" in err, (out[-2000:], err[-2000:])

    fresh = subprocess.run([sys.executable, "-m", "pipeline", "sweep", changed, "--fresh"], capture_output=True,
                           text=True, env={**os.environ, **env}, timeout=900)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "restoring sweep" not in fresh.stdout
    best = json.loads((runs / "presets" / "tiny-fresh-best.json").read_text())
    assert best["set"]["mim.ratio"] == 0.6  # the new spec's only trial, not the restored old one
