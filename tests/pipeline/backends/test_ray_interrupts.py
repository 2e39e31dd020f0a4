"""Ctrl-C, a cluster that goes away, and someone else's Ray on the host: the installed ``s4mim`` on a real Ray.

Slow (each case starts Ray): ``make test-slow``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from ray._private.utils import get_num_cpus

from tests.conftest import tiny_args
from tests.pipeline.cli_helpers import S4MIM, run_s4mim
from tests.pipeline.ray_helpers import RayHead, wait_for
from tests.pipeline.test_bad_input import epoch_line, interrupt_after, last_epoch_seen

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
HINT = "interrupted; run the same command again to resume"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warmup_args(tiny_shapes, epochs: int = 8) -> list[str]:
    # Epochs of a few seconds, so that Ctrl-C lands long before the last one even on a loaded machine.
    return ["warmup", "shapes-1/8", *tiny_args(tiny_shapes, f"warmup.epochs={epochs}", "warmup.eval_every=1",
            "data.split=1/2", "warmup.steps_per_epoch=30")]  # fmt: skip


@pytest.mark.parametrize(("attempt", "signum"), [*((n, signal.SIGINT) for n in range(4)), (0, signal.SIGTERM)],
                         ids=["ctrl-c-0", "ctrl-c-1", "ctrl-c-2", "ctrl-c-3", "sigterm"])  # fmt: skip
def test_ctrl_c_under_ray_exits_130_and_resumes_from_the_last_finished_epoch(tiny_shapes, tmp_path, attempt, signum):
    """Ctrl-C, and SIGTERM to s4mim alone (which ray.init would have end the process at once)."""
    env = {"S4MIM_RUNS": str(tmp_path / "runs"), "RAY_AUTH_MODE": "disabled"}
    args = _warmup_args(tiny_shapes)
    code, out, err = interrupt_after(args, env, epoch_line("warmup", 2 + attempt % 2, 8), signum=signum)
    assert code == 130, (out + err)[-3000:]
    assert err.strip().splitlines()[-1] == HINT, err[-3000:]
    assert "Traceback" not in err.split("Ray local", 1)[-1].rsplit(HINT, 1)[-1]
    seen = last_epoch_seen(out, "warmup")

    done = run_s4mim(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = int(done.stdout.split("[warmup] resuming after epoch ", 1)[1].split()[0])
    assert resumed >= seen, done.stdout  # every epoch printed before Ctrl-C is kept
    assert epoch_line("warmup", seen, 8) not in done.stdout
    assert epoch_line("warmup", 8, 8) in done.stdout


def test_without_an_address_s4mim_runs_on_a_private_ray(tiny_shapes, tmp_path):
    head = RayHead(_free_port(), cpus=1)  # someone else's cluster on this host
    try:
        done = run_s4mim(*_warmup_args(tiny_shapes, epochs=1), env={"S4MIM_RUNS": str(tmp_path / "runs")})
        assert done.returncode == 0, done.stderr[-3000:]
        host_cpus = get_num_cpus()  # what a Ray started here detects (cgroup limits included)
        assert f"Ray local (private to this command): 1 node(s), {host_cpus:g} CPU" in done.stdout
        assert head.pids(), "the other cluster was taken down"
        joined = run_s4mim(
            *_warmup_args(tiny_shapes, epochs=1),
            "--set", "seed=1", "--ray-address", "auto",
            env={"S4MIM_RUNS": str(tmp_path / "runs"), **head.env},
        )  # fmt: skip
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert f":{head.port}: 1 node(s), 1 CPU" in joined.stdout  # --ray-address auto joins the one running here
    finally:
        head.stop()


def test_a_cluster_that_dies_mid_run_is_one_line_and_the_rerun_resumes(tiny_shapes, tmp_path):
    head = RayHead(_free_port(), cpus=2)
    env = {"S4MIM_RUNS": str(tmp_path / "runs"), "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled"}
    args = _warmup_args(tiny_shapes, epochs=30)
    process = subprocess.Popen(
        [str(S4MIM), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    try:
        out = []
        for line in process.stdout:
            out.append(line)
            if epoch_line("warmup", 2, 30) in line:
                break
        head.stop()
        rest, err = process.communicate(timeout=300)
    finally:
        head.stop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2, ("".join(out) + rest + err)[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "the Ray cluster went away during the warmup stage" in lines[0], err[-3000:]
    assert "run the same command again to resume" in lines[0]
    assert "Traceback" not in err.split(epoch_line("warmup", 2, 30))[-1], err[-3000:]

    wait_for(lambda: not head.pids(), 30, "the dead cluster's processes to end")
    env.pop("RAY_ADDRESS")
    done = run_s4mim(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split("[warmup] resuming after epoch ", 1)[1].split()[0]) >= 2


def test_an_interrupted_run_exported_and_imported_elsewhere_resumes_there_keeping_its_best_epoch(tiny_shapes, tmp_path):
    """Ctrl-C mid-warmup, 's4mim runs export', 'runs import' into an empty runs folder (another machine's):
    the same command there resumes after the last exported epoch, without Ray's record of the run, and the
    teacher it names is the epoch of the best val mIoU over the whole run."""
    first, second, export = tmp_path / "first", tmp_path / "second", tmp_path / "export"
    args = _warmup_args(tiny_shapes)
    env = {"S4MIM_RUNS": str(first), "RAY_AUTH_MODE": "disabled"}
    code, out, err = interrupt_after(args, env, epoch_line("warmup", 3, 8))
    assert code == 130, (out + err)[-3000:]
    seen = last_epoch_seen(out, "warmup")

    done = run_s4mim("runs", "export", str(export), env=env)
    assert done.returncode == 0, done.stderr
    assert "1 interrupted" in done.stdout, done.stdout
    done = run_s4mim("runs", "import", str(export), env={**env, "S4MIM_RUNS": str(second)})
    assert done.returncode == 0, done.stderr
    assert "1 interrupted" in done.stdout, done.stdout
    assert not list((second / "ray").glob("*/*.json"))  # none of Ray's own records came along
    plan = run_s4mim("pipeline", "run", *args[1:], "--dry-run", env={**env, "S4MIM_RUNS": str(second)})
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"resumes after epoch {seen}" in plan.stdout or f"resumes after epoch {seen + 1}" in plan.stdout, plan.stdout

    done = run_s4mim(*args, env={**env, "S4MIM_RUNS": str(second)})
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = int(done.stdout.split("[warmup] resuming after epoch ", 1)[1].split()[0])
    assert resumed >= seen, done.stdout
    (folder,) = (second / "stages").glob("*/warmup-*")
    result = json.loads((folder / "result.json").read_text())
    teacher = int(Path(result["checkpoint"]).name.removeprefix("epoch_"))
    assert Path(result["checkpoint"]).is_relative_to(second)
    assert {c["epoch"]: c["val/miou"] for c in result["curve"]}[teacher] == result["best_miou"], result["curve"]
    assert [c["epoch"] for c in result["curve"]] == list(range(1, 9))  # the epochs before the import counted too
    assert result["machines"] and "cores" in result["machines"][0]
