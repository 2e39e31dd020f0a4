"""A stage being run holds a lock: a second s4mim asked for the same stage stops at once, leaving no trace."""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest

from pipeline.errors import UsageError
from pipeline.orchestration.orchestrate import lock_path, stage_folder, stage_lock
from pipeline.training.prepare import prepare_stage
from tests.conftest import tiny_args
from tests.pipeline.cli_helpers import one_line_error, run_s4mim, tree_state
from tests.pipeline.ray_helpers import mlflow_runs


def test_a_held_stage_refuses_a_second_holder_until_released(tmp_path):
    folder = tmp_path / "stages" / "p" / "train-abc"
    lock = tmp_path / "stages" / ".locks" / "train-abc.lock"
    assert lock_path(folder) == lock
    with stage_lock(folder, "train"):
        assert f"pid {os.getpid()} on " in lock.read_text()
        with pytest.raises(UsageError, match=rf"train stage is already running .*pid {os.getpid()} on .*train-abc"):
            with stage_lock(folder, "train"):
                pass
        # the same stage hash under another preset's folder is the same stage
        with pytest.raises(UsageError, match="already running"):
            with stage_lock(tmp_path / "stages" / "other" / "train-abc", "train"):
                pass
        with stage_lock(folder.with_name("train-abd"), "train"):  # another hash is another stage
            pass
    assert not lock.exists()
    lock.write_text("pid 1 on elsewhere, since long ago\n")  # left by a killed run: the kernel holds no lock on it
    with stage_lock(folder, "train"):
        assert f"pid {os.getpid()} on " in lock.read_text()


def _untracked_state(runs):
    return [tree_state(runs / name) if (runs / name).exists() else None for name in ("stages", "manifests", "splits")]


def test_pipeline_and_stage_commands_stop_on_a_stage_in_use(tiny_config, tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    env = {"S4MIM_RUNS": str(runs), "S4MIM_DATA": str(tmp_path / "data"), "RAY_ADDRESS": ""}
    config = tiny_config()
    prepared = prepare_stage(config, runs)
    warmup = stage_folder(runs, config, "warmup", prepared.inputs_hash)
    with stage_lock(warmup, "warmup"):
        before = _untracked_state(runs)
        for command in (["pipeline", "run"], ["warmup"]):
            done = run_s4mim(*command, "shapes-1/8", *tiny_args(tiny_shapes), env=env)
            assert done.returncode == 2, done.stderr[-3000:]
            line = one_line_error(done.stderr)
            assert f"the warmup stage is already running in another s4mim (pid {os.getpid()} on " in line
            assert str(warmup) in line and "wait for it to finish" in line
        assert _untracked_state(runs) == before
    assert mlflow_runs(runs / "mlflow.db") == []  # refused before anything was tracked


def test_a_sweep_stops_before_tracking_when_its_warmup_is_in_use(tiny_shapes, tmp_path):
    from sweeps.spec import load_spec
    from tests.sweeps.test_sweep_ray import _spec

    runs = tmp_path / "runs"
    env = {"S4MIM_RUNS": str(runs), "S4MIM_DATA": str(tmp_path / "data"), "RAY_ADDRESS": ""}
    spec_file = _spec(tmp_path, tiny_shapes, "locked", [0.3])
    base = load_spec(spec_file).check_keys()
    warmup = stage_folder(runs, base, "warmup", prepare_stage(base, runs).inputs_hash)
    with stage_lock(warmup, "warmup"):
        before = _untracked_state(runs)
        done = run_s4mim("sweep", spec_file, env=env)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "the warmup stage is already running in another s4mim" in one_line_error(done.stderr)
        assert _untracked_state(runs) == before
    assert mlflow_runs(runs / "mlflow.db") == []


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_rank_0_prepares_before_the_others(monkeypatch, tmp_path, rank):
    """Every command that runs stages prepares through ``prepare_inputs``; ``pipeline run`` did not."""
    import torch.distributed as dist

    from pipeline.backends.local import LocalBackend
    from pipeline.config.presets import load_preset
    from pipeline.orchestration import orchestrate
    from pipeline.training import distributed

    events = []

    class Stop(Exception):
        pass

    def prepare(config, runs, **kwargs):
        events.append("prepare")
        if events.count("prepare") == (2 if rank == 0 else 1) and "barrier" in events:
            raise Stop  # the last preparation this rank makes: stop before any training
        return None

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(distributed, "init_distributed", lambda: (rank, 2, None))
    monkeypatch.setattr(dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(orchestrate, "prepare_stage", prepare)
    with pytest.raises(Stop):
        orchestrate.run_pipeline(load_preset("shapes-1/8"), tmp_path / "runs", LocalBackend())
    assert events == (["prepare", "barrier", "prepare"] if rank == 0 else ["barrier", "prepare"])


def _wait_for_output(read, text: str, deadline_s: float = 120.0) -> str:
    """``read()`` (everything written so far) once it holds ``text``; fails after ``deadline_s`` rather than hang."""
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if text in (seen := read()):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never printed {text!r}: {seen!r}")


def test_with_wait_a_second_holder_waits_for_the_first_then_holds_the_lock(tmp_path, capsys):
    import threading

    from pipeline.locks import WAITING

    folder = tmp_path / "stages" / "p" / "train-abc"
    entered, holders = threading.Event(), []

    def second():
        with stage_lock(folder, "train", wait=True):
            holders.append(lock_path(folder).read_text())
            entered.set()

    with stage_lock(folder, "train"):
        thread = threading.Thread(target=second)
        thread.start()
        printed = []
        line = _wait_for_output(lambda: "".join(printed.append(capsys.readouterr().out) or printed), WAITING)
        assert f"the train stage is running in another s4mim (pid {os.getpid()} on " in line
        assert str(folder) in line
        assert not entered.is_set()  # it waits while the first holds the lock
    thread.join(timeout=120)
    assert entered.is_set() and holders[0].startswith(f"pid {os.getpid()} on ")
    assert not lock_path(folder).exists()


def test_a_stage_command_with_wait_uses_the_stage_its_holder_finished(tiny_config, tiny_shapes, tmp_path):
    """``s4mim warmup --wait`` on a stage another process is running: it says so, waits, and then finds
    the stage that process finished instead of running it again."""
    import json
    import subprocess

    from tests.pipeline.cli_helpers import S4MIM

    runs = tmp_path / "runs"
    env = {**os.environ, "S4MIM_RUNS": str(runs), "S4MIM_DATA": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    config = tiny_config()
    warmup = stage_folder(runs, config, "warmup", prepare_stage(config, runs).inputs_hash)
    args = [str(S4MIM), "warmup", "shapes-1/8", *tiny_args(tiny_shapes), "--local", "--wait"]
    log = tmp_path / "warmup.log"
    with open(log, "w") as out, ExitStack() as cleanup:
        with stage_lock(warmup, "warmup"):
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
            cleanup.callback(process.kill)  # a failed check below leaves no s4mim behind
            seen = _wait_for_output(lambda: log.read_text(), "waiting for it to finish")
            assert f"the warmup stage is running in another s4mim (pid {os.getpid()} on " in seen
            assert process.poll() is None  # it waits while the stage is held
            warmup.mkdir(parents=True)  # what the holder leaves when it finishes
            (warmup / "best.pt").write_bytes(b"")
            result = {"best_miou": 12.5, "checkpoint": str(warmup / "best.pt")}
            (warmup / "result.json").write_text(json.dumps(result))
        process.wait(timeout=600)
    assert process.returncode == 0, log.read_text()
    assert f"[warmup] already finished for this config: {warmup}" in log.read_text()


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_waiting_rank_0_tries_again_and_tells_the_others_each_time(monkeypatch, tmp_path, rank):
    """The other ranks hear rank 0's outcome in a collective that would time out during a long wait, so rank 0
    does not block in the lock: it tries again every RETRY_S seconds, and every rank hears each try."""
    import threading
    from contextlib import ExitStack

    import torch.distributed as dist

    from pipeline.locks import file_lock
    from pipeline.orchestration import orchestrate
    from pipeline.training import distributed

    folder = tmp_path / "stages" / "p" / "train-abc"
    told, sleeps = [], []
    heard = iter(["retry", "retry", "held"])  # what rank 0 tells rank 1

    def broadcast(box, src):
        assert src == 0
        if rank == 0:
            told.append(box[0])
        else:
            box[0] = next(heard)

    other = ExitStack()
    other.enter_context(stage_lock(folder, "train"))  # another s4mim, before the launch

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            other.close()  # the other s4mim ends

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(distributed, "init_distributed", lambda: (rank, 2, None))
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(orchestrate.time, "sleep", sleep)
    backstop = threading.Timer(30, other.close)  # a rank 0 that blocked in the lock would hang the test, not fail it
    backstop.start()
    with stage_lock(folder, "train", wait=True):
        backstop.cancel()
        if rank == 0:
            assert lock_path(folder).read_text().startswith(f"pid {os.getpid()} on ")
    assert sleeps == [orchestrate.RETRY_S] * 2
    if rank == 0:
        assert told == ["retry", "retry", "held"]
    other.close()
    # without --wait, every rank raises rank 0's refusal at once
    monkeypatch.setattr(orchestrate.time, "sleep", lambda s: pytest.fail("no retry without wait"))
    heard = iter(["the train stage is already running in another s4mim (pid 1 on h)"])
    with file_lock(lock_path(folder), "another", folder), pytest.raises(UsageError, match="already running in another"):
        with stage_lock(folder, "train"):
            pass


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_lock_rank_0_cannot_take_stops_every_rank(monkeypatch, tmp_path, rank):
    """An error taking the lock (an unwritable runs folder) is told to the other ranks too: they would
    otherwise sit in the collective until the process group's timeout."""
    import torch.distributed as dist

    from pipeline.orchestration import orchestrate
    from pipeline.training import distributed

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    told = []

    def broadcast(box, src):
        if rank == 0:
            told.append(box[0])
        else:
            box[0] = "cannot lock the train stage at x: Permission denied; check that the runs folder is writable"

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(distributed, "init_distributed", lambda: (rank, 2, None))
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(orchestrate, "file_lock", unwritable)
    with pytest.raises(UsageError, match="cannot lock the train stage at .*Permission denied"):
        with stage_lock(tmp_path / "stages" / "p" / "train-abc", "train", wait=True):
            pass
    assert len(told) == (1 if rank == 0 else 0)
