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


def _start_ui(tmp_path, port: int, ignored: tuple[signal.Signals, ...] = ()) -> subprocess.Popen:
    """``s4mim ui`` as a terminal starts it: SIGINT and SIGHUP at their defaults (a test runner started in
    the background has SIGINT ignored, and its children would inherit that), except ``ignored``."""

    def signals_of_a_terminal() -> None:
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)

    env = {**os.environ, "S4MIM_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([str(S4MIM), "ui", "--port", str(port)], env=env, preexec_fn=signals_of_a_terminal,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _wait_until_it_answers(ui: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while not _answers(f"http://127.0.0.1:{port}"):
        assert ui.poll() is None, f"s4mim ui exited with {ui.returncode} before the server answered"
        assert time.monotonic() < deadline, "the MLflow server did not answer within 120 s"
        time.sleep(0.5)


def _kill_all(ui: subprocess.Popen, tree: list[psutil.Process]) -> None:
    for process in [psutil.Process(ui.pid), *tree] if ui.poll() is None else tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_the_whole_server_and_frees_the_port(signum, tmp_path):
    port = _free_port()
    ui = _start_ui(tmp_path, port)
    tree: list[psutil.Process] = []
    try:
        _wait_until_it_answers(ui, port)
        tree = psutil.Process(ui.pid).children(recursive=True)
        # the server, its uvicorn worker and its huey consumers: what used to stay behind
        assert len(tree) >= 2, [p.cmdline() for p in tree]

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
        ui.send_signal(signal.SIGTERM)  # and it still stops when asked to
        assert ui.wait(60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        _kill_all(ui, tree)
