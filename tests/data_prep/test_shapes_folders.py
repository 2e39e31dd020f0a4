"""Each generator seed of `shapes` has its own default folder, shared by `data synth` and the pipeline."""

from __future__ import annotations

import json

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
