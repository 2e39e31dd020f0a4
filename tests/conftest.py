"""Shared fixtures: a tiny ``shapes`` dataset and a tiny config that trains in seconds on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.shapes import ShapesSettings, synthesize

TINY_SHAPES = ShapesSettings(train=40, val=12, min_side=40, max_side=48, min_clutter=1, max_clutter=3)

TINY_OVERRIDES = [
    "data.crop=32",
    "data.batch_size=4",
    "data.loader_workers=0",
    "data.split=1/4",
    "model.aspp_channels=16",
    "model.decoder_channels=16",
    "model.low_level_channels=8",
    "mim.patch=8",
    "mim.min_pixels=4",
    "warmup.epochs=1",
    "train.epochs=1",
    "train.steps_per_epoch=4",  # the presets' 90 steps would make every tiny pipeline's train stage most of its time
    "eval.grid_images=2",
    "scaling.cpus_per_worker=1",
]


# What s4mim and the libraries it drives read from the environment to find a user's services and
# folders: MLflow reads every MLFLOW_* (tracking and registry URIs, experiment, credentials), Ray
# joins RAY_ADDRESS, s4mim reads S4MIM_* and torchrun's rank variables.
SEALED_PREFIXES = ("S4MIM_", "MLFLOW_")
SEALED_NAMES = ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def _seal(patch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(SEALED_PREFIXES) or n in SEALED_NAMES]:
        patch.delenv(name)


@pytest.fixture(autouse=True, scope="session")
def _sealed_session():
    """No test, module fixture or child process sees the developer's tracking server, cluster or folders.

    Session-wide, so that it holds before the module fixtures that start clusters and pipelines;
    subprocesses inherit it through ``{**os.environ, ...}``.
    """
    with pytest.MonkeyPatch.context() as patch:
        _seal(patch)
        yield


@pytest.fixture(autouse=True)
def _sealed(monkeypatch):
    _seal(monkeypatch)  # again per test: a variable one test set without monkeypatch leaks no further


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    return synthesize(root, seed=0, settings=TINY_SHAPES)


def tiny_args(data_root: Path, *extra: str) -> list[str]:
    """The command-line options of the tiny config on ``data_root``, with ``extra`` overrides."""
    args = ["--data-root", str(data_root)]
    for item in (*TINY_OVERRIDES, *extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_shapes, tmp_path_factory) -> Path:
    """A runs folder holding the tiny pipeline, finished (``--local``) by the installed ``s4mim``.

    One for the whole session: a test that writes into a runs folder takes a copy (``copy_runs``).
    """
    from tests.pipeline.cli_helpers import run_s4mim

    runs = tmp_path_factory.mktemp("tiny-pipeline") / "runs"
    done = run_s4mim("pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes), env={"S4MIM_RUNS": str(runs)})
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


def copy_runs(source: Path, to: Path) -> Path:
    """A copy of the runs folder ``source`` at ``to``, its results naming checkpoints in the copy: as if the
    copy had trained them, so that nothing in it leads back to ``source``."""
    shutil.copytree(source, to)
    for result in to.glob("stages/*/*/result.json"):
        result.write_text(result.read_text().replace(str(source), str(to)))
    return to


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "runs"
    monkeypatch.setenv("S4MIM_RUNS", str(path))
    monkeypatch.setenv("S4MIM_DATA", str(tmp_path / "data"))
    return path


@pytest.fixture
def tiny_config(tiny_shapes):
    from pipeline.config.presets import load_preset

    def make(*extra: str):
        return load_preset("shapes-1/8", [*TINY_OVERRIDES, f'data.root="{tiny_shapes}"', *extra])

    return make


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ARGS`` the way a user runs ``s4mim ARGS``."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
