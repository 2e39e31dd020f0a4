"""The documented torchrun commands on two gloo ranks: the ranks prepare in turn and train in step."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[3]


def _torchrun(command: list[str], extra: list[str], env: dict) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m pipeline COMMAND`` with the tiny config, then ``extra`` over it."""
    overrides = [item for o in TINY_OVERRIDES for item in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline", *command, *overrides, *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=900, cwd=ROOT)


def _result(runs: Path, stage: str) -> dict:
    (path,) = (runs / "stages" / "shapes-1_8").glob(f"{stage}-*/result.json")
    return json.loads(path.read_text())


def test_torchrun_warmup_and_train_keep_both_ranks_parameters_equal(tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    env = {"OMP_NUM_THREADS": "1", "S4MIM_RUNS": str(runs)}
    data = ["--data-root", str(tiny_shapes), "--set", "data.split=1/2", "--set", "unimatch.threshold=0.5"]
    for stage in ("warmup", "train"):
        done = _torchrun([stage, "shapes-1/8"], data, env)  # README: torchrun ... -m pipeline warmup shapes-1/8
        assert done.returncode == 0, done.stderr[-3000:]
        result = _result(runs, stage)
        first, second = result["parameters"]  # one digest per rank
        assert first == second, stage
    # 20 labeled images, batch 4, 2 ranks: 2 steps each; the epoch is shared, not repeated.
    assert _result(runs, "warmup")["steps_per_epoch"] == 2


def test_torchrun_pipeline_generates_a_missing_dataset_once(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    env = {"OMP_NUM_THREADS": "1", "S4MIM_RUNS": str(runs), "S4MIM_DATA": str(data)}
    budget = ["--set", "warmup.steps_per_epoch=2", "--set", "train.steps_per_epoch=2", "--set", "eval.grid_images=0"]
    done = _torchrun(["pipeline", "run", "shapes-1/8"], budget, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (data / "shapes" / "shapes.json").is_file()
    assert done.stdout.count("summary for shapes-1/8") == 1, done.stdout  # rank 0's, once
    for stage in ("warmup", "train"):
        first, second = _result(runs, stage)["parameters"]
        assert first == second, stage
    assert 0 <= _result(runs, "evaluate")["miou"] <= 100
