"""Tests never reach the developer's services: conftest.py's sealing, checked from a shell that names them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SEALED_NAMES, SEALED_PREFIXES

DEVELOPER_SHELL = {
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # a team server, unreachable here
    "MLFLOW_REGISTRY_URI": "http://127.0.0.1:9",
    "RAY_ADDRESS": "127.0.0.1:1",  # a cluster, dead here
    "S4MIM_RUNS": "/nonexistent/their-runs",
    "S4MIM_DATA": "/nonexistent/their-data",
    "S4MIM_STORAGE": "s3://their-bucket/ray",
}


def _sealed_names(environ) -> list[str]:
    return sorted(n for n in environ if n.startswith(SEALED_PREFIXES) or n in SEALED_NAMES)


def test_a_test_and_its_child_processes_see_no_service_of_the_shell():
    from pipeline.backends.ray_train import storage_path
    from pipeline.paths import runs_dir
    from pipeline.tracking.runs import tracking_uri

    assert _sealed_names(os.environ) == []
    assert tracking_uri() == f"sqlite:///{runs_dir() / 'mlflow.db'}"
    assert not str(runs_dir()).startswith("/nonexistent") and not storage_path(runs_dir()).startswith("s3://")
    child = subprocess.run(
        [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        capture_output=True, text=True, env={**os.environ}, check=True,
    )  # fmt: skip
    assert _sealed_names(json.loads(child.stdout)) == []


def test_the_seal_holds_when_the_shell_names_a_server_and_a_cluster():
    root = Path(__file__).parents[1]
    probe = f"{Path(__file__).relative_to(root)}::test_a_test_and_its_child_processes_see_no_service_of_the_shell"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", probe],
        capture_output=True, text=True, env={**os.environ, **DEVELOPER_SHELL}, cwd=root, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
