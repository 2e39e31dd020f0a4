"""``s4mim predict``: the masks ``evaluate`` scores, images of any mode, bad files, and Ray Data sharding."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.decode import read_mask
from data_prep.palette import voc_palette
from pipeline.training.metrics import confusion_matrix, mean_iou
from tests.conftest import tiny_args
from tests.pipeline.cli_helpers import one_line_error, run_s4mim


@pytest.fixture
def trained(tiny_pipeline) -> Path:
    """A runs folder holding a finished tiny pipeline (--local), the session's."""
    return tiny_pipeline


def _stage(runs: Path, stage: str) -> Path:
    (folder,) = (runs / "stages" / "shapes-1_8").glob(f"{stage}-*")
    return folder


def _val_images(root: Path) -> list[Path]:
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    return [root / "JPEGImages" / f"{i}.jpg" for i in ids]


def test_predicted_masks_are_what_evaluate_scores(trained, tiny_shapes, tmp_path):
    out = tmp_path / "preds"
    images = _val_images(tiny_shapes)
    done = run_s4mim("predict", str(_stage(trained, "train")), *map(str, images), "--out", str(out), "--overlay",
                     "--confidence", env={"S4MIM_RUNS": str(trained)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    evaluation = json.loads((_stage(trained, "evaluate") / "result.json").read_text())
    classes = len(evaluation["iou"])
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    for image in images:
        with Image.open(out / f"{image.stem}.png") as mask:
            assert mask.mode == "P" and mask.getpalette()[:48] == voc_palette()[:48]
            predicted = torch.from_numpy(np.asarray(mask).copy())
        truth = read_mask(tiny_shapes / "SegmentationClass" / f"{image.stem}.png")
        assert predicted.shape == truth.shape
        confusion += confusion_matrix(predicted, truth, classes)
        assert (out / "overlay" / f"{image.stem}.png").is_file() and (
            out / "confidence" / f"{image.stem}.png"
        ).is_file()
    assert mean_iou(confusion) == pytest.approx(evaluation["miou"], abs=1e-9)

    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]
    for row in rows:
        assert sum(float(row[name]) for name in evaluation["iou"]) == pytest.approx(1.0, abs=1e-5)


def moved(runs: Path, to: Path) -> Path:
    """A copy of ``runs`` at ``to`` whose results name checkpoints where the runs folder used to be, a
    place that is gone: the runs folder as a user finds it after moving it (from a cluster, to a disk)."""
    shutil.copytree(runs, to)
    for result in to.glob("stages/*/*/result.json"):
        text = result.read_text().replace(str(runs), "/a/folder/that/is/gone/runs")
        assert text != result.read_text()
        result.write_text(text)
    return to


def test_a_moved_runs_folder_still_predicts_and_evaluates(trained, tiny_shapes, tmp_path):
    runs = moved(trained, tmp_path / "moved")
    train = _stage(runs, "train")
    image = str(_val_images(tiny_shapes)[0])
    done = run_s4mim("predict", str(train), image, "--out", str(tmp_path / "preds"), env={"S4MIM_RUNS": str(runs)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "preds" / f"{Path(image).stem}.png").is_file()

    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes)]
    again = run_s4mim(*args, "--force", "evaluate", env={"S4MIM_RUNS": str(runs)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "\ntrain      cached" in again.stdout and "\nevaluate   ran" in again.stdout
    assert str(train) in json.loads((_stage(runs, "evaluate") / "result.json").read_text())["evaluated"]

    for state in train.glob("*.pt"):  # a checkpoint that is nowhere any more: one line, and the fix
        state.unlink()
    gone = run_s4mim("predict", str(train), image, "--out", str(tmp_path / "none"), env={"S4MIM_RUNS": str(runs)})
    assert gone.returncode == 2
    assert "its checkpoint" in one_line_error(gone.stderr) and "is gone" in one_line_error(gone.stderr)
    forced = run_s4mim(*args, "--force", "evaluate", env={"S4MIM_RUNS": str(runs)})
    assert forced.returncode == 2 and "--force on the stage before evaluate" in one_line_error(forced.stderr)


def test_images_of_any_mode_are_converted(trained, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 36, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "print.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 36), dtype=np.uint16)).save(folder / "deep.png")
    (folder / "nested").mkdir()
    Image.fromarray(rgb).save(folder / "nested" / "plain.bmp")
    out = tmp_path / "preds"
    done = run_s4mim("predict", "shapes-1/8", str(folder), "--out", str(out), env={"S4MIM_RUNS": str(trained)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"with {_stage(trained, 'train')}" in done.stdout  # a preset means its latest train stage
    for name in ("grey", "alpha", "print", "deep", "nested/plain"):
        with Image.open(out / f"{name}.png") as mask:
            assert mask.size == (36, 30) and mask.mode == "P", name
    with (out / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 5


def test_an_unreadable_image_is_exit_2_unless_skipped(trained, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "preds"
    env = {"S4MIM_RUNS": str(trained)}
    done = run_s4mim("predict", "shapes-1/8", str(folder), "--out", str(out), env=env)
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert str(folder / "broken.jpg") in line and "--skip-bad" in line
    assert not (out / "predictions.csv").exists()

    skipped = run_s4mim("predict", "shapes-1/8", str(folder), "--out", str(out), "--skip-bad", env=env)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"skipped {folder / 'broken.jpg'}" in skipped.stdout
    with (out / "predictions.csv").open() as handle:
        assert [Path(r["image"]).name for r in csv.DictReader(handle)] == ["good.png"]


def test_a_text_file_named_jpg_stops_predict_before_any_mask_is_written(trained, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a", "b", "c", "d", "f"):  # four images sort before the bad file, one after
        Image.fromarray(np.full((20, 20, 3), ord(name), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "e.jpg").write_text("this is a text file, not a photo\n")
    out = tmp_path / "preds"
    done = run_s4mim("predict", "shapes-1/8", str(folder), "--out", str(out), env={"S4MIM_RUNS": str(trained)})
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done.stderr)
    assert f"{folder / 'e.jpg'}: image does not decode (the file holds text, not image data)" in line
    assert "nothing was written" in line and "--skip-bad" in line
    assert ".cpp" not in line and "avif" not in line and "heic" not in line  # torchvision's own words
    assert not out.exists() or not any(out.rglob("*.png"))


@pytest.mark.parametrize(
    "model, expected",
    [("nowhere/at/all", "is not a checkpoint, a stage folder, a preset or an MLflow model URI"),
     ("shapes-1/2", "no finished train stage for shapes-1/2")],
)  # fmt: skip
def test_a_model_that_is_not_there_says_what_model_can_be(trained, tiny_shapes, tmp_path, model, expected):
    image = _val_images(tiny_shapes)[0]
    done = run_s4mim("predict", model, str(image), "--out", str(tmp_path / "p"), env={"S4MIM_RUNS": str(trained)})
    assert done.returncode == 2
    assert expected in one_line_error(done.stderr)


@pytest.mark.slow  # starts a Ray of its own (about 40 s)
def test_predict_on_ray_writes_what_predict_in_process_writes(trained, tiny_shapes, tmp_path):
    images = [str(p) for p in sorted((tiny_shapes / "JPEGImages").glob("*.jpg"))[:16]]
    env = {"S4MIM_RUNS": str(trained), "RAY_AUTH_MODE": "disabled"}
    local = run_s4mim("predict", "shapes-1/8", *images, "--out", str(tmp_path / "local"), "--overlay", env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    on_ray = run_s4mim("predict", "shapes-1/8", *images, "--out", str(tmp_path / "ray"), "--overlay",
                       "--ray-address", "local", "--workers", "2", env=env)  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "Ray local" in on_ray.stdout
    for image in images:
        name = f"{Path(image).stem}.png"
        for sub in ("", "overlay/"):
            assert (tmp_path / "ray" / sub / name).read_bytes() == (tmp_path / "local" / sub / name).read_bytes()
    assert (tmp_path / "ray" / "predictions.csv").read_text() == (tmp_path / "local" / "predictions.csv").read_text()


def test_an_out_folder_that_cannot_be_written(trained, tiny_shapes, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    image = _val_images(tiny_shapes)[0]
    done = run_s4mim("predict", "shapes-1/8", str(image), "--out", str(blocker), env={"S4MIM_RUNS": str(trained)})
    assert done.returncode == 2
    assert f"--out {blocker} cannot be written (it is a file)" in one_line_error(done.stderr)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("register", [True, False])
def test_the_logged_model_is_registered_unless_told_not_to(trained, tmp_path, register):
    from mlflow import MlflowClient

    from pipeline.config.schema import Config
    from pipeline.tracking.runs import Tracker, log_trained_model
    from pipeline.training.stages import load_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    tracker = Tracker(uri)
    run_id = tracker.create(tracker.experiment("s4mim"), "train-x", "shapes-1/8 train", {"stage": "train"})
    checkpoint = json.loads((_stage(trained, "train") / "result.json").read_text())["checkpoint"]
    config = Config.model_validate(load_state(Path(checkpoint))["config"])
    info = log_trained_model(uri, run_id, checkpoint, config, register)
    client = MlflowClient(uri)
    assert [m.model_id for m in client.search_logged_models([tracker.experiment("s4mim")])] == [info.model_id]
    versions = client.search_model_versions("name='s4mim-shapes'")
    assert len(versions) == (1 if register else 0)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # nothing leaks into later child processes
