"""The ImageNet stand-in: its corpus, its pretraining as a cached stage, and ``model.init=standin``."""

import json
from pathlib import Path

import pytest
import torch

from data_prep.corpus import ATTRIBUTES, CORPUS_SEED, SHAPES, TEXTURES, render_example
from pipeline.orchestration.hashing import stage_hash
from tests.pipeline.cli_helpers import run_s4mim


def test_the_corpus_is_deterministic_covers_its_vocabulary_and_is_apart_from_shapes():
    image, labels = render_example(3)
    again, same = render_example(3)
    assert torch.equal(image, again) and labels == same
    assert image.shape == (3, 56, 56) and image.dtype == torch.uint8
    seen = [render_example(i)[1] for i in range(160)]
    for position, (attribute, count) in enumerate(ATTRIBUTES.items()):
        values = {labels[position] for labels in seen}
        assert values <= set(range(count)), attribute
        assert len(values) >= count - 1, attribute  # 160 draws leave at most one value unseen
    assert (len(SHAPES), len(TEXTURES)) == (8, 6)
    # shapes datasets draw image i of seed s from s * 1_000_003 + i: far below the corpus stream
    assert CORPUS_SEED > 100 * 1_000_003 + 10**6


@pytest.fixture
def tiny_recipe(monkeypatch):
    from pipeline.training import standin

    recipe = standin.Recipe(train_images=96, val_images=32, batch=16, steps=3)
    monkeypatch.setattr(standin, "RECIPE", recipe)
    return recipe


def test_pretrain_builds_once_and_model_init_standin_loads_it(runs, tiny_recipe, tiny_config):
    from pipeline.training.engine import build_model
    from pipeline.training.standin import pretrain

    logged = []
    built = pretrain("resnet18_slim", 16, runs, log=logged.append)
    assert not built["cached"] and set(built["val_accuracy"]) == set(ATTRIBUTES)
    assert built["parameters"] > 0 and built["bytes"] > 0 and any("val accuracy" in line for line in logged)
    again = pretrain("resnet18_slim", 16, runs, log=logged.append)
    assert again["cached"] and again["folder"] == built["folder"]

    config = tiny_config("model.width=16", "model.init=standin")
    model = build_model(config, 9)
    weights = torch.load(f"{built['folder']}/encoder.pt", weights_only=True)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    # The stage hash follows the weights: the same recipe rebuilds the same weights, other weights change it.
    before = stage_hash(config, "warmup")
    assert json.loads(Path(built["folder"], "result.json").read_text())["recipe"]["steps"] == tiny_recipe.steps
    pretrain("resnet18_slim", 16, runs, force=True, log=logged.append)
    assert stage_hash(config, "warmup") == before
    torch.save({k: v + 1 for k, v in weights.items()}, Path(built["folder"], "encoder.pt"))
    assert stage_hash(config, "warmup") != before


def test_the_shipped_stand_in_is_current_and_found():
    from pipeline.training.standin import SHIPPED, find

    shipped = SHIPPED / "resnet18_slim-w16" / "encoder.pt"
    assert find("resnet18_slim", 16) == shipped  # its hash is the current code's: rebuild and ship it if not
    result = json.loads((shipped.parent / "result.json").read_text())
    assert result["bytes"] == shipped.stat().st_size and min(result["val_accuracy"].values()) > 50


def test_a_missing_or_broken_stand_in_is_one_line_and_exit_2(tmp_path):
    from pipeline.training.standin import cache_folder

    env = {"S4MIM_RUNS": str(tmp_path / "runs"), "S4MIM_DATA": str(tmp_path / "data")}
    args = ["warmup", "shapes48-1/8", "--local", "--set", "model.init=standin"]
    missing = run_s4mim(*args, "--set", "model.width=8", env=env)  # no stand-in is shipped at width 8
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "s4mim pretrain" in missing.stderr

    folder = cache_folder(tmp_path / "runs", "resnet18_slim", 16)
    folder.mkdir(parents=True)
    (folder / "encoder.pt").write_text("not weights")
    (folder / "result.json").write_text(json.dumps({"hash": folder.name.rsplit("-", 1)[1]}))
    broken = run_s4mim(*args, env=env)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().count("\n") == 0 and "not a torch weights file" in broken.stderr
    assert not (tmp_path / "data").exists()  # refused before any data was generated
