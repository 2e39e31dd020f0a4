"""``s4mim ui`` stopped as a service manager, ``timeout`` or a closed terminal stops it: nothing of the
real ``mlflow server`` tree is left, and the port is free again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import psutil
import pytest

from tests.pipeline.cli_helpers import S4MIM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _can_listen(port: int) -> bool:
    """As the next server would (uvicorn binds with SO_REUSEADDR: closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def _start_ui(tmp_path, port: int, ignored: tuple[signal.Signals, ...] = (), env: dict | None = None):
    """``s4mim ui`` as a terminal starts it: SIGINT and SIGHUP at their defaults (a test runner started in
    the background has SIGINT ignored, and its children would inherit that), except ``ignored``."""

    def signals_of_a_terminal() -> None:
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)

    env = {**os.environ, "S4MIM_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([str(S4MIM), "ui", "--port", str(port)], env=env, preexec_fn=signals_of_a_terminal,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _wait_until_it_answers(ui: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 300  # a hang guard: a busy machine takes minutes to start the server
    while not _answers(f"http://127.0.0.1:{port}"):
        assert ui.poll() is None, f"s4mim ui exited with {ui.returncode} before the server answered"
        assert time.monotonic() < deadline, "the MLflow server did not answer within 300 s"
        time.sleep(0.5)


def _kill_all(ui: subprocess.Popen, tree: list[psutil.Process]) -> None:
    """Whatever is left of ``s4mim ui`` and its server, also when a test failed before it listed the tree."""
    if ui.poll() is None:
        try:
            tree = [*tree, *psutil.Process(ui.pid).children(recursive=True), psutil.Process(ui.pid)]
        except psutil.NoSuchProcess:
            pass
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


JOBS_ON = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}  # the server's job runner and huey consumers as well


@pytest.mark.parametrize(
    "signum, env",
    [
        pytest.param(signal.SIGTERM, {}, marks=pytest.mark.slow),  # the nohup test below ends with one
        (signal.SIGINT, {}),
        pytest.param(signal.SIGHUP, {}, marks=pytest.mark.slow),  # the same handler as SIGTERM's and SIGINT's
        pytest.param(signal.SIGTERM, JOBS_ON, marks=pytest.mark.slow),  # a server of nine processes: minutes to start
    ],
    ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGTERM-jobs-on"],
)
def test_a_signal_stops_the_whole_server_and_frees_the_port(signum, env, tmp_path):
    port = _free_port()
    ui = _start_ui(tmp_path, port, env=env)
    tree: list[psutil.Process] = []
    try:
        _wait_until_it_answers(ui, port)
        tree = psutil.Process(ui.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "mlflow server" in names and "uvicorn" in names, names  # what used to stay behind
        if env is JOBS_ON:  # turned on in the user's shell, the job runner's consumers stop with the rest
            assert "huey_consumer" in names, names
        else:  # off by default: s4mim submits no MLflow jobs
            assert "huey_consumer" not in names and "_job_runner" not in names, names

        ui.send_signal(signum)  # to s4mim alone, as `kill` or `timeout` sends it
        assert ui.wait(60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
        assert _can_listen(port)
    finally:
        _kill_all(ui, tree)


def test_under_nohup_a_hangup_leaves_the_server_running(tmp_path):
    port = _free_port()
    ui = _start_ui(tmp_path, port, ignored=(signal.SIGHUP,))  # as `nohup s4mim ui &` starts it
    tree: list[psutil.Process] = []
    try:
        _wait_until_it_answers(ui, port)
        tree = psutil.Process(ui.pid).children(recursive=True)
        ui.send_signal(signal.SIGHUP)  # the terminal closes
        with pytest.raises(subprocess.TimeoutExpired):
            ui.wait(3)
        assert _answers(f"http://127.0.0.1:{port}")
        ui.send_signal(signal.SIGTERM)  # and it still stops when asked to, as `kill` or `timeout` asks
        assert ui.wait(60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
        assert _can_listen(port)
    finally:
        _kill_all(ui, tree)
