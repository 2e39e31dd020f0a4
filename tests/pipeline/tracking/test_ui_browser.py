"""The MLflow UI as a user sees it: headless Chromium renders the runs table after a tiny pipeline.

Slow, and skipped unless ``chromium`` is on PATH (Debian: ``apt-get install chromium``); it installs
nothing itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import tiny_args
from tests.pipeline.cli_helpers import S4MIM, run_s4mim

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed"),
]
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1000",
]  # fmt: skip


def render(url: str, profile, *, screenshot=None, budget_ms: int = 25000) -> str:
    """The DOM of ``url`` after the page settles (or a screenshot of it)."""
    what = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *what, url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def wait_until_up(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=3) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the MLflow UI at {base} did not answer within {timeout:.0f} s")


def test_the_runs_table_shows_runs_datasets_and_models(tiny_shapes, tmp_path):
    env = {"S4MIM_RUNS": str(tmp_path / "runs"), "RAY_AUTH_MODE": "disabled"}
    done = run_s4mim("pipeline", "run", "shapes-1/8", *tiny_args(tiny_shapes), env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    server = subprocess.Popen(
        [str(S4MIM), "ui", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # the server and the workers it starts, stopped together
    )
    try:
        runs_page = None
        for line in server.stdout:
            if line.startswith("runs of experiment s4mim: "):
                runs_page = line.split(": ", 1)[1].strip()
                break
        assert runs_page and runs_page.endswith("/runs"), runs_page
        wait_until_up(runs_page.split("/#/")[0])
        dom = render(runs_page, tmp_path / "profile")
        train_page = render(f"{runs_page}/{_train_run_id(tmp_path / 'runs')}", tmp_path / "profile")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert "Training runs" in dom  # a model-training experiment opens on its runs table
    header = _cells(dom, "Run Name")
    assert all(f"| {column} |" in header for column in ("Dataset", "Source", "Models")), header
    pipeline_row = _cells(dom, "shapes-1/8 s4mim")  # the pipeline's run, by name
    assert "shapes/1/4" in pipeline_row and "| s4mim |" in pipeline_row  # its Dataset and Source cells
    # The train stage's own page: its dataset, and the model it logged, registered.
    assert "| Datasets | shapes/1/4" in _cells(train_page, "About this run", 2000)
    assert "| Registered models | s4mim-shapes | v1 |" in _cells(train_page, "About this run", 2000)


def _train_run_id(runs) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs(["1"], "tags.stage = 'train'")
    return run.info.run_id


def _cells(dom: str, run_name: str, width: int = 600) -> str:
    """The text of the table row that starts with ``run_name``, cells separated by ' | '."""
    text = re.sub(r"(\s*\|\s*)+", " | ", re.sub(r"<[^>]+>", " | ", dom))
    at = text.find(f"| {run_name} |")
    at = at if at >= 0 else text.find(f"{run_name} |")
    assert at >= 0, f"no row {run_name!r} in the page"
    return text[at : at + width]
