"""``s4mim ui`` / ``make ui``: the MLflow UI for the project's store, on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys

from pipeline.console import say
from pipeline.errors import UsageError
from pipeline.paths import runs_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


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
    from pipeline.tracking import Tracker

    try:
        found = Tracker(uri).client.get_experiment_by_name(experiment)
    except Exception:  # an empty or unreadable store: the UI's own page still helps
        found = None
    return f"{base}/#/experiments/{found.experiment_id}/runs" if found is not None else base


def serve(tracking_uri: str | None, port: int, experiment: str = "s4mim") -> int:
    from pipeline.tracking import tracking_uri as resolve

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
    try:
        return subprocess.call(server_command(uri, port))
    except KeyboardInterrupt:
        return 0
