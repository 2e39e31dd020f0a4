"""Each generator seed of `shapes` has its own default folder, shared by `data synth` and the pipeline."""

from __future__ import annotations

import json
import os

from pipeline.config.presets import load_preset
from pipeline.training.prepare import dataset_root
from tests.pipeline.cli_helpers import run_main


def test_synth_with_another_seed_leaves_the_development_data_alone(capsys, runs, tmp_path):
    data = tmp_path / "data"
    code, _, err = run_main(capsys, "data", "synth", "--seed", "3")
    assert code == 0, err
    assert json.loads((data / "shapes-seed3" / "shapes.json").read_text())["seed"] == 3
    assert not (data / "shapes").exists()
    # The pipeline looks for that seed where `data synth` put it, and for seed 0 where it always has.
    assert dataset_root(load_preset("shapes-1/8", ["data.synth_seed=3"])) == data / "shapes-seed3"
    assert dataset_root(load_preset("shapes-1/8")) == data / "shapes"


def test_a_command_finding_the_dataset_being_generated_waits_and_reads_it(capsys, tiny_shapes, tmp_path, monkeypatch):
    """Two commands that need the same missing dataset: the second waits for the first's, and never
    generates it again over the first's folder."""
    import shutil
    import threading
    import time

    from data_prep import shapes
    from pipeline.locks import WAITING
    from pipeline.training.prepare import ensure_shapes, shapes_lock

    def generated_twice(*args, **kwargs):
        raise AssertionError("generated a second time")

    monkeypatch.setattr(shapes, "synthesize", generated_twice)
    root = tmp_path / "data" / "shapes"
    outcome = []

    def second():
        try:
            ensure_shapes(root, 0)
            outcome.append("read")
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    with shapes_lock(root, 0):  # the first command, generating
        thread = threading.Thread(target=second)
        thread.start()
        printed, deadline = "", time.monotonic() + 120
        while WAITING not in printed and time.monotonic() < deadline and thread.is_alive():
            printed += capsys.readouterr().out
            time.sleep(0.05)
        assert f"the shapes generator (seed 0) is running in another s4mim (pid {os.getpid()} on " in printed
        assert outcome == []
        shutil.copytree(tiny_shapes, root)  # the first command's dataset, in place
    thread.join(timeout=120)
    assert outcome == ["read"]
