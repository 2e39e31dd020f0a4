"""``s4mim ui`` / ``make ui``: the MLflow UI for the project's store, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from pipeline.console import say
from pipeline.errors import UsageError
from pipeline.paths import runs_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port``. SO_REUSEADDR, as uvicorn binds: the connections a stopped
    server closed linger in TIME_WAIT for a minute, and they do not stop the next server."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def server_env() -> dict[str, str]:
    """The server's environment: MLflow's job execution off unless the user's shell turns it on.

    It serves MLflow's GenAI jobs, which s4mim never submits, with a job runner and seven
    ``huey_consumer`` processes; without them the server answers its first request 3-5 times sooner
    on a busy 2-core machine (26-42 s against 129-131 s, measured side by side) and starts one process
    instead of nine."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def server_command(uri: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for the store at ``uri`` (one worker: light on memory)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", (runs_dir() / "mlartifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def runs_page(uri: str, experiment: str, base: str) -> str:
    """The URL of ``experiment``'s runs table under the UI at ``base`` (the UI's home if it has no runs yet)."""
    from pipeline.tracking.runs import Tracker

    try:
        found = Tracker(uri).client.get_experiment_by_name(experiment)
    except Exception:  # an empty or unreadable store: the UI's own page still helps
        found = None
    return f"{base}/#/experiments/{found.experiment_id}/runs" if found is not None else base


def serve(tracking_uri: str | None, port: int, experiment: str = "s4mim") -> int:
    from pipeline.tracking.runs import tracking_uri as resolve

    uri = resolve(None, tracking_uri)
    if uri.startswith(("http://", "https://")):
        say(f"the tracking URI is a server already: open {uri}")
        return 0
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if port == 0:
        port = free_port()
    elif not port_free(port):
        raise UsageError(f"port {port} on 127.0.0.1 is taken; pass --port 0 for a free one (make ui PORT=0)")
    base = f"http://127.0.0.1:{port}"
    say(f"MLflow UI for {uri} at {base}  (Ctrl-C stops it)")
    say(f"runs of experiment {experiment}: {runs_page(uri, experiment, base)}")
    # `mlflow server` starts a uvicorn worker (and, with job execution on, huey_consumer processes) that
    # outlive it when only it is signalled: in a session of its own, the tree is one group to stop together.
    server = subprocess.Popen(server_command(uri, port), env=server_env(), start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP (`timeout`, a service manager, a closed terminal),
        return 0  # which the CLI raises as Ctrl-C (pipeline.signals)
    finally:
        stop_server(server)
        _wait_for_port(port)


def stop_server(server: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left after ``grace`` seconds."""
    group = server.pid  # start_new_session: the group id is the leader's pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline and _group_alive(group):
            try:
                server.wait(0.2)  # reap the leader, so that it does not linger as a zombie of the group
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # asked again while it shuts down: no more grace
        pass
    if _group_alive(group):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        server.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    """A killed server's socket can take a moment to close: the next `make ui` should find the port free."""
    deadline = time.monotonic() + timeout
    while not port_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)
