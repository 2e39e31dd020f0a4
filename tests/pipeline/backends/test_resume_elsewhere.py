"""Resuming from epoch folders Ray has no record of (an imported run, or one stopped mid-commit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.backends.local import LocalContext
from pipeline.backends.ray_train import _uploaded_after


def _save(run, epoch: int, miou: float | None, best: float, machines=("machine A",), whole: bool = True) -> None:
    folder = run / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True)
    metrics = {"train/loss": 1.0} if miou is None else {"train/loss": 1.0, "val/miou": miou}
    state = {"epoch": epoch - 1, "metrics": metrics, "best_miou": best, "machines": list(machines)}
    torch.save(state, folder / "state.pt")
    if not whole:
        data = (folder / "state.pt").read_bytes()
        (folder / "state.pt").write_bytes(data[: len(data) // 2])


def _epochs(states: list[dict]) -> list[int]:
    return [s["epoch"] + 1 for s in states]


def test_the_best_earlier_epoch_is_reported_before_the_newest(tmp_path):
    run = tmp_path / "run"
    _save(run, 3, 40.0, 40.0)  # the best evaluated
    _save(run, 5, 35.0, 40.0)  # the latest committed
    _save(run, 6, None, 40.0)  # uploaded, not committed
    _save(run, 7, None, 40.0, whole=False)  # cut short
    assert _epochs(_uploaded_after(str(run), 0)) == [3, 6]
    assert _epochs(_uploaded_after(str(run), 3)) == [6]  # Ray knows epoch 3: the newest alone


def test_the_newest_alone_when_it_is_the_best_or_the_best_is_gone(tmp_path):
    run = tmp_path / "run"
    _save(run, 2, 30.0, 30.0)
    _save(run, 4, 45.0, 45.0)
    assert _epochs(_uploaded_after(str(run), 0)) == [4]
    _save(run, 6, None, 50.0)  # its best (epoch 5) is not among the folders
    assert _epochs(_uploaded_after(str(run), 0)) == [6]
    assert _uploaded_after(str(run), 6) == [] and _uploaded_after(str(tmp_path / "none"), 0) == []


def test_a_resumed_local_stage_keeps_the_machines_of_its_earlier_epochs(tmp_path):
    torch.save({"epoch": 2, "machines": ["machine A"]}, tmp_path / "last.pt")
    extras = {"machines": ["machine B"]}
    context = LocalContext("train", tmp_path, 0, 1, torch.device("cpu"), 5, extras)
    assert context.restore()["epoch"] == 2
    assert extras["machines"] == ["machine A", "machine B"]  # what the next checkpoints store
    torch.save({"epoch": 3}, tmp_path / "last.pt")  # written before checkpoints named their machines
    extras = {"machines": ["machine B"]}
    LocalContext("train", tmp_path, 0, 1, torch.device("cpu"), 5, extras).restore()
    assert extras["machines"] == ["machine B", "not recorded (epochs 1-4)"]


RESUME = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.backends.ray_train import RayContext, best_checkpoint_path, connect

    storage = sys.argv[1]
    print(connect(None))

    def loop(config):
        context = RayContext("train", 6, None, config["run_dir"], {"machines": ["machine B"]})
        state = context.restore()
        Path(config["run_dir"], "resumed.txt").write_text(f"{state['epoch'] + 1} {context.extras['machines']}")
        metrics = {"val/miou": 30.0}  # the last epoch: worse than epoch 3
        context.report(metrics, {**state, "epoch": 5, "metrics": metrics}, epoch=5, best=False)

    trainer = TorchTrainer(
        loop,
        train_loop_config={"run_dir": f"{storage}/run"},
        scaling_config=ScalingConfig(num_workers=1),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="run", storage_path=storage, checkpoint_config=CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="val/score", checkpoint_score_order="max")),
    )
    print("best:", best_checkpoint_path(trainer.fit()))
    """
)


@pytest.mark.slow  # a Ray Train job: 80 s beside an experiment (not timed alone)
@pytest.mark.filterwarnings("ignore")
def test_under_ray_an_imported_run_resumes_and_its_best_epoch_stays_the_best(tmp_path):
    """Epoch folders without Ray's record of them (as 's4mim runs import' leaves them): Ray Train resumes
    after the newest, and ranks the best earlier one, which stays the run's best checkpoint."""
    storage = tmp_path / "ray"
    _save(storage / "run", 3, 40.0, 40.0)  # the best evaluated, trained on machine A
    _save(storage / "run", 5, 35.0, 40.0)  # the latest
    done = subprocess.run([sys.executable, "-c", RESUME, str(storage)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (storage / "run" / "resumed.txt").read_text() == "5 ['machine A', 'machine B']"
    best = [line for line in done.stdout.splitlines() if line.startswith("best: ")]
    assert best == [f"best: {storage / 'run' / 'epoch_0003'}"], done.stdout[-3000:]
