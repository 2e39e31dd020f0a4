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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_the_whole_server_and_frees_the_port(signum, tmp_path):
    port = _free_port()
    env = {**os.environ, "S4MIM_RUNS": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = subprocess.Popen([str(S4MIM), "ui", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{port}"):
            assert ui.poll() is None, f"s4mim ui exited with {ui.returncode} before the server answered"
            assert time.monotonic() < deadline, "the MLflow server did not answer within 120 s"
            time.sleep(0.5)
        tree = psutil.Process(ui.pid).children(recursive=True)
        # the server, its uvicorn worker and its huey consumers: what used to stay behind
        assert len(tree) >= 2, [p.cmdline() for p in tree]

        ui.send_signal(signum)  # to s4mim alone, as `kill` or `timeout` sends it
        assert ui.wait(60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
        assert _can_listen(port)
    finally:
        for process in [psutil.Process(ui.pid), *tree] if ui.poll() is None else tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
