"""Real Ray clusters for integration tests, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import psutil


def start_cluster(nodes: int = 1, cpus_per_node: int = 2):
    """A Ray cluster of ``nodes`` nodes on this machine (``ray.cluster_utils.Cluster``)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def env_for(runs: Path, address: str) -> dict:
    return {
        "S4MIM_RUNS": str(runs),
        "S4MIM_DATA": str(runs.parent / "data"),
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }


def train_worker_pids(cluster) -> list[int]:
    """PIDs of the live Ray Train workers of ``cluster`` (a ``start_cluster`` cluster), and of no other Ray.

    A worker is a child of its node's raylet, so only the started nodes' raylets are looked into.
    """
    from ray._private import ray_constants

    pids = []
    for node in cluster.list_all_nodes():
        for raylet in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
            try:
                children = psutil.Process(raylet.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if "RayTrainWorker" in child.name() + " ".join(child.cmdline()):
                        pids.append(child.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
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

    It runs in the foreground (``--block``) with a temp folder of its own, so that this cluster's
    processes are exactly the descendants of the process started here, and its address file is not
    the one other Rays on the host write. ``stop()`` kills only those processes: ``ray stop`` would take
    down every Ray on the host. ``env`` is what a command needs to find it with ``--ray-address auto``.
    """

    def __init__(self, port: int, cpus: int = 1):
        import subprocess
        import sys
        import tempfile

        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.root = Path(tempfile.mkdtemp(prefix="s4mim-ray-"))  # short: Ray's socket paths must fit 107 bytes
        self.env = {"RAY_TMPDIR": str(self.root)}
        ray = Path(sys.executable).parent / "ray"
        command = [str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}",
                   "--include-dashboard=false", f"--temp-dir={self.root / 'ray'}"]  # fmt: skip
        self._log = self.root / "ray-start.log"
        with self._log.open("w") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
            )
        self._root = psutil.Process(self._process.pid)
        self._seen: set[psutil.Process] = set()
        address_file = self.root / "ray" / "ray_current_cluster"  # written once the head is up
        try:
            wait_for(lambda: address_file.is_file() or self._process.poll() is not None, 120, "ray start --head")
            assert self._process.poll() is None, self._log.read_text()[-2000:]
        except BaseException:
            self.stop()
            raise

    def _members(self) -> set[psutil.Process]:
        """The started process and every descendant seen so far, ended ones left out."""
        for proc in [self._root, *self._seen]:
            try:
                self._seen.update(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return {proc for proc in [self._root, *self._seen] if _alive(proc)}

    def pids(self) -> list[int]:
        return sorted(proc.pid for proc in self._members())

    def stop(self) -> None:
        """SIGKILL every process of this cluster, suspended first so that none starts another meanwhile."""
        frozen: set[psutil.Process] = set()
        while fresh := self._members() - frozen:
            for proc in fresh:
                try:
                    proc.suspend()
                except psutil.NoSuchProcess:
                    pass
            frozen |= fresh
        for proc in frozen:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self._process.wait()
        psutil.wait_procs(list(frozen), timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
