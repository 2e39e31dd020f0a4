"""Real Ray clusters for integration tests, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import psutil

from tests.conftest import TINY_OVERRIDES


def start_cluster(nodes: int = 1, cpus_per_node: int = 2):
    """A Ray cluster of ``nodes`` nodes on this machine (``ray.cluster_utils.Cluster``)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def tiny_args(data_root: Path, *extra: str) -> list[str]:
    args = ["--data-root", str(data_root)]
    for item in (*TINY_OVERRIDES, *extra):
        args += ["--set", item]
    return args


def env_for(runs: Path, address: str) -> dict:
    return {
        "S4MIM_RUNS": str(runs),
        "S4MIM_DATA": str(runs.parent / "data"),
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes on this machine."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RayTrainWorker" in text:
            pids.append(proc.info["pid"])
    return pids


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def mlflow_runs(db: Path) -> list[dict]:
    """Every run of the store with its tags, read straight from the sqlite file.

    Reading with sqlite never creates or migrates the schema, so a poller cannot race the process
    that is creating the store; a store still being created reads as empty.
    """
    if not Path(db).is_file():
        return []
    try:
        with sqlite3.connect(db, timeout=60) as conn:  # a busy machine can hold a writer's lock for seconds
            rows = conn.execute("select run_uuid, status from runs where lifecycle_stage = 'active'").fetchall()
            tags = conn.execute("select run_uuid, key, value from tags").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the schema is still being created
            return []
        raise
    runs = {run_id: {"run_id": run_id, "status": status, "tags": {}} for run_id, status in rows}
    for run_id, key, value in tags:
        if run_id in runs:
            runs[run_id]["tags"][key] = value
    return list(runs.values())


class RayHead:
    """A cluster started with ``ray start --head``, as a user or another tool on this host would.

    ``stop()`` kills only this cluster's processes (found by its session folder and port): ``ray stop``
    would take down every Ray on the host.
    """

    def __init__(self, port: int, cpus: int = 1):
        import subprocess
        import sys

        self.port = port
        ray = Path(sys.executable).parent / "ray"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        started = subprocess.run(
            [str(ray), "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-2000:]
        self.session = Path("/tmp/ray/session_latest").resolve().name
        self.address = f"127.0.0.1:{port}"

    def pids(self) -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            text = " ".join(proc.info["cmdline"] or [])
            if self.session in text or f":{self.port} " in f"{text} " or f"--port={self.port}" in text:
                found.append(proc.info["pid"])
        return [pid for pid in found if pid != os.getpid()]

    def stop(self) -> None:
        for pid in self.pids():
            kill(pid)
