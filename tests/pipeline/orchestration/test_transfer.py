"""``s4mim runs export`` / ``runs import``: finished stages carried to an empty runs folder are found cached."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.orchestration import transfer
from pipeline.orchestration.transfer import export_runs, import_runs
from tests.conftest import copy_runs, tiny_args
from tests.pipeline.cli_helpers import one_line_error, run_s4mim, tree_state


def _stage(runs: Path, name: str, result: dict | None, checkpoint: Path | None = None) -> Path:
    folder = runs / "stages" / "shapes-1_8" / name
    folder.mkdir(parents=True)
    (folder / "hash.json").write_text(json.dumps({"config": name}))
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"weights of " + name.encode())
    if result is not None:
        result = {**result, "checkpoint": str(checkpoint)} if checkpoint else result
        (folder / "result.json").write_text(json.dumps(result))
    return folder


@pytest.fixture
def filled(tmp_path) -> Path:
    """A runs folder: a finished warmup (its teacher a Ray checkpoint folder), a train its evaluate has
    scored, a finished train not scored yet, and an interrupted train."""
    runs = tmp_path / "runs"
    stages = runs / "stages" / "shapes-1_8"
    _stage(runs, "warmup-aaaaaaaaaaaa", {"best_miou": 40.0}, runs / "ray" / "warm" / "epoch_0010" / "state.pt")
    _stage(runs, "train-bbbbbbbbbbbb", {"best_miou": 50.0}, stages / "train-bbbbbbbbbbbb" / "best.pt")
    scored = {"miou": 49.0, "evaluated": str(stages / "train-bbbbbbbbbbbb" / "best.pt")}
    (_stage(runs, "evaluate-cccccccccccc", scored) / "iou.csv").write_text("class,iou\n")
    _stage(runs, "train-dddddddddddd", None, stages / "train-dddddddddddd" / "last.pt")
    _stage(runs, "train-eeeeeeeeeeee", {"best_miou": 51.0}, stages / "train-eeeeeeeeeeee" / "best.pt")
    (runs / "splits" / "shapes-x" / "1_8-seed0").mkdir(parents=True)
    (runs / "splits" / "shapes-x" / "1_8-seed0" / "labeled.txt").write_text("a\n")
    return runs


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


FINISHED = ("warmup-aaaaaaaaaaaa", "train-bbbbbbbbbbbb", "evaluate-cccccccccccc", "train-eeeeeeeeeeee")


def test_export_holds_finished_stages_and_the_weights_still_to_be_used(filled, tmp_path):
    dest = tmp_path / "export"
    done = export_runs(filled, dest)
    assert _files(dest) == {
        "exports.json",
        "splits/shapes-x/1_8-seed0/labeled.txt",
        "ray/warm/epoch_0010/state.pt",  # the teacher
        "stages/shapes-1_8/train-eeeeeeeeeeee/best.pt",  # no evaluate has scored it yet
        *(f"stages/shapes-1_8/{s}/{f}" for s in FINISHED for f in ("hash.json", "result.json")),
        "stages/shapes-1_8/evaluate-cccccccccccc/iou.csv",
        # the interrupted train (--local): what it resumes from
        "stages/shapes-1_8/train-dddddddddddd/hash.json",
        "stages/shapes-1_8/train-dddddddddddd/last.pt",
    }
    assert sorted(done.stages) == sorted(f"shapes-1_8/{s}" for s in FINISHED) and done.left_out == []
    assert done.interrupted == ["shapes-1_8/train-dddddddddddd @ last.pt"]
    source = filled / "stages/shapes-1_8/warmup-aaaaaaaaaaaa/result.json"
    assert (dest / "stages/shapes-1_8/warmup-aaaaaaaaaaaa/result.json").stat().st_mtime == source.stat().st_mtime
    log = json.loads((dest / "exports.json").read_text())
    assert len(log) == 1 and "cores" in log[0]["machine"]

    again = export_runs(filled, dest)  # nothing new: nothing written, the log not extended
    assert again.files == 0 and again.stages == [] and again.interrupted == []
    assert len(json.loads((dest / "exports.json").read_text())) == 1

    evaluated = filled / "stages" / "shapes-1_8" / "evaluate-cccccccccccc" / "result.json"
    evaluated.write_text(json.dumps({**json.loads(evaluated.read_text()), "miou": 51.0}))
    assert export_runs(filled, dest).stages == ["shapes-1_8/evaluate-cccccccccccc"]  # a forced rerun replaces it
    assert json.loads((dest / "stages/shapes-1_8/evaluate-cccccccccccc/result.json").read_text())["miou"] == 51.0
    assert len(json.loads((dest / "exports.json").read_text())) == 2


def test_a_warmup_whose_teacher_is_gone_is_left_out_whole(filled, tmp_path):
    shutil.rmtree(filled / "ray")
    done = export_runs(filled, tmp_path / "export")
    assert "shapes-1_8/warmup-aaaaaaaaaaaa" not in done.stages
    assert len(done.left_out) == 1 and "warmup-aaaaaaaaaaaa" in done.left_out[0]
    assert not (tmp_path / "export" / "stages" / "shapes-1_8" / "warmup-aaaaaaaaaaaa").exists()


def test_import_into_an_empty_runs_folder_finds_the_weights_where_the_results_name_them(filled, tmp_path):
    from pipeline.orchestration.results import read_result

    dest = tmp_path / "export"
    export_runs(filled, dest)
    shutil.rmtree(filled)  # the original runs folder is gone
    elsewhere = tmp_path / "elsewhere" / "runs"
    done = import_runs(dest, elsewhere)
    assert sorted(done.stages) == sorted(f"shapes-1_8/{s}" for s in FINISHED) and done.left_out == []
    teacher = read_result(elsewhere / "stages" / "shapes-1_8" / "warmup-aaaaaaaaaaaa")
    assert Path(teacher["checkpoint"]) == elsewhere / "ray" / "warm" / "epoch_0010" / "state.pt"
    assert Path(teacher["checkpoint"]).read_bytes() == b"weights of warmup-aaaaaaaaaaaa"
    unscored = read_result(elsewhere / "stages" / "shapes-1_8" / "train-eeeeeeeeeeee")
    assert Path(unscored["checkpoint"]).read_bytes() == b"weights of train-eeeeeeeeeeee"
    assert not (elsewhere / "exports.json").exists()


def test_import_keeps_what_the_runs_folder_holds_and_writes_results_last(filled, tmp_path, monkeypatch):
    dest = tmp_path / "export"
    export_runs(filled, dest)
    mine = tmp_path / "mine"
    _stage(mine, "evaluate-cccccccccccc", {"miou": 12.0})  # finished here: kept
    # an interrupted run of the warmup here, its teacher from another epoch: the stage is not imported
    _stage(mine, "warmup-aaaaaaaaaaaa", None)
    (mine / "ray" / "warm" / "epoch_0010").mkdir(parents=True)
    (mine / "ray" / "warm" / "epoch_0010" / "state.pt").write_bytes(b"half trained")
    order: list[str] = []
    copy = transfer._copy
    monkeypatch.setattr(transfer, "_copy", lambda s, t, d: (order.append((t.parent.name, t.name)), copy(s, t, d)))
    done = import_runs(dest, mine)
    assert json.loads((mine / "stages/shapes-1_8/evaluate-cccccccccccc/result.json").read_text()) == {"miou": 12.0}
    assert "shapes-1_8/evaluate-cccccccccccc" not in done.stages
    assert (mine / "ray" / "warm" / "epoch_0010" / "state.pt").read_bytes() == b"half trained"
    assert not (mine / "stages/shapes-1_8/warmup-aaaaaaaaaaaa/result.json").exists()
    assert len(done.left_out) == 1 and "warmup-aaaaaaaaaaaa" in done.left_out[0]
    assert sorted(done.stages) == ["shapes-1_8/train-bbbbbbbbbbbb", "shapes-1_8/train-eeeeeeeeeeee"]
    # a stage's weights and records before its result.json
    assert [name for stage, name in order if stage == "train-eeeeeeeeeeee"] == ["best.pt", "hash.json", "result.json"]
    assert done.interrupted == ["shapes-1_8/train-dddddddddddd @ last.pt"]  # nothing of it here: imported


def test_an_export_of_nothing_and_an_import_of_a_non_export_are_refused(tmp_path):
    (tmp_path / "runs" / "stages").mkdir(parents=True)
    with pytest.raises(UsageError, match="no finished or interrupted stage"):
        export_runs(tmp_path / "runs", tmp_path / "export")
    with pytest.raises(UsageError, match="not an export"):
        import_runs(tmp_path / "runs", tmp_path / "other")
    assert not (tmp_path / "export").exists() and not (tmp_path / "other").exists()


def test_a_broken_export_log_or_an_unwritable_target_is_a_usage_error(filled, tmp_path):
    dest = tmp_path / "export"
    export_runs(filled, dest)
    (dest / "exports.json").write_text("<<<<<<< HEAD\n")
    (filled / "stages" / "shapes-1_8" / "evaluate-cccccccccccc" / "result.json").write_text('{"miou": 51.0}')
    with pytest.raises(UsageError, match="exports.json is not valid JSON"):
        export_runs(filled, dest)
    assert (dest / "exports.json").read_text() == "<<<<<<< HEAD\n"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError, match="runs export failed: .*a-file"):
        export_runs(filled, tmp_path / "a-file")


def test_a_pipeline_imported_on_another_runs_folder_is_cached_and_trains_from_its_teacher(
    tiny_pipeline, tiny_shapes, tmp_path
):
    """Through the installed s4mim: the whole tiny pipeline, exported, its runs folder deleted, imported
    into another; the same command then runs no stage, and a new train budget trains from the teacher."""
    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes)]
    first, second, export = tmp_path / "first", tmp_path / "second", tmp_path / "export"
    copy_runs(tiny_pipeline, first)  # the session's finished pipeline, as if trained in first
    done = run_s4mim("runs", "export", str(export), env={"S4MIM_RUNS": str(first)})
    assert done.returncode == 0, done.stderr
    assert "exported 3 stage(s)" in done.stdout
    assert not [p for p in export.rglob("*.pt") if "warmup-" not in str(p)]  # the teacher's weights alone
    (trained,) = export.glob("stages/*/train-*/result.json")
    assert "cores" in json.loads(trained.read_text())["machines"][0]  # which machine trained it
    shutil.rmtree(first)

    done = run_s4mim("runs", "import", str(export), env={"S4MIM_RUNS": str(second)})
    assert done.returncode == 0, done.stderr
    assert "imported 3 finished stage(s)" in done.stdout
    done = run_s4mim(*args, env={"S4MIM_RUNS": str(second)})
    assert done.returncode == 0, done.stderr
    assert "every stage is cached" in done.stdout, done.stdout
    done = run_s4mim(*args, "--set", "train.steps_per_epoch=3", env={"S4MIM_RUNS": str(second)})
    assert done.returncode == 0, done.stderr
    assert re.search(r"^warmup +cached", done.stdout, re.M), done.stdout
    assert re.search(r"^train +ran", done.stdout, re.M), done.stdout


def test_import_of_a_folder_that_is_no_export_is_one_line_and_exit_2(tmp_path):
    runs = tmp_path / "runs"
    (runs / "notes").mkdir(parents=True)
    (runs / "notes" / "earlier.txt").write_text("written before")
    before = tree_state(runs)
    done = run_s4mim("runs", "import", str(tmp_path / "nowhere"), env={"S4MIM_RUNS": str(runs)})
    assert done.returncode == 2
    assert "not an export" in one_line_error(done.stderr)
    assert tree_state(runs) == before


def _epoch(runs: Path, run: str, name: str, whole: bool = True) -> Path:
    """An epoch folder of a Ray run, its state.pt a zip as torch.save writes, or cut short."""
    folder = runs / "ray" / run / name
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "state.pt", "w") as archive:
        archive.writestr("data.pkl", f"state of {run} {name}")
    if not whole:
        data = (folder / "state.pt").read_bytes()
        (folder / "state.pt").write_bytes(data[: len(data) // 2])
    return folder


RUN = "shapes-1_8-train-ffffffffffff"  # the Ray run of stages/shapes-1_8/train-ffffffffffff


def test_ray_run_names_match_the_stage_folders_and_say_where_a_run_resumes(tmp_path):
    from pipeline.backends.ray_train import run_name
    from pipeline.config.presets import load_preset
    from pipeline.orchestration.orchestrate import ray_run_folder, resumes, stage_folder

    config, runs = load_preset("shapes-1/8"), tmp_path / "runs"
    folder = stage_folder(runs, config, "train", "0123456789abcdef")
    assert ray_run_folder(folder, runs) == runs / "ray" / run_name(config, "train", "0123456789abcdef")
    assert resumes(folder, runs) == "resumes"  # nothing under Ray (with --local, last.pt)
    _epoch(runs, ray_run_folder(folder, runs).name, "epoch_0003")
    _epoch(runs, ray_run_folder(folder, runs).name, "epoch_0007")
    _epoch(runs, ray_run_folder(folder, runs).name, "epoch_0008", whole=False)  # being written
    assert resumes(folder, runs) == "resumes after epoch 7"


def test_an_interrupted_ray_stage_travels_with_its_epochs_and_the_export_follows_it(filled, tmp_path):
    dest = tmp_path / "export"
    _stage(filled, "train-ffffffffffff", None)
    _epoch(filled, RUN, "epoch_0003")  # the best evaluated one
    _epoch(filled, RUN, "epoch_0005")  # the latest Ray committed
    _epoch(filled, RUN, "epoch_0006", whole=False)  # Ray is writing it
    (filled / "ray" / RUN / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own, by absolute paths
    done = export_runs(filled, dest)
    assert "shapes-1_8/train-ffffffffffff @ epoch_0005" in done.interrupted
    assert {p for p in _files(dest) if RUN in p or "train-ffffffffffff" in p} == {
        "stages/shapes-1_8/train-ffffffffffff/hash.json",
        f"ray/{RUN}/epoch_0003/state.pt",
        f"ray/{RUN}/epoch_0005/state.pt",
    }
    assert json.loads((dest / "exports.json").read_text())[-1]["interrupted"] == done.interrupted

    # Ray finished epoch 6, then 7, and deleted epoch 5: the export follows
    shutil.rmtree(filled / "ray" / RUN / "epoch_0006")
    _epoch(filled, RUN, "epoch_0006")
    _epoch(filled, RUN, "epoch_0007")
    shutil.rmtree(filled / "ray" / RUN / "epoch_0005")
    shutil.rmtree(filled / "ray" / RUN / "epoch_0006")
    assert export_runs(filled, dest).interrupted == ["shapes-1_8/train-ffffffffffff @ epoch_0007"]
    assert {p for p in _files(dest) if RUN in p} == {f"ray/{RUN}/epoch_0003/state.pt", f"ray/{RUN}/epoch_0007/state.pt"}
    assert not (dest / "ray" / RUN / "epoch_0005").exists()

    # it finished, and an evaluate scored its best checkpoint: only its records stay in the export
    best = filled / "ray" / RUN / "epoch_0003"
    _write_result(filled / "stages/shapes-1_8/train-ffffffffffff", {"best_miou": 52.0, "checkpoint": str(best)})
    _stage(filled, "evaluate-999999999999", {"miou": 52.0, "evaluated": str(best)})
    done = export_runs(filled, dest)
    assert "shapes-1_8/train-ffffffffffff" in done.stages and done.interrupted == []
    assert not (dest / "ray" / RUN).exists()
    assert (dest / "stages/shapes-1_8/train-ffffffffffff/result.json").is_file()


def _write_result(folder: Path, result: dict) -> None:
    (folder / "result.json").write_text(json.dumps(result))


def test_an_imported_interrupted_stage_lands_where_it_resumes_unless_one_is_running_there(filled, tmp_path):
    dest = tmp_path / "export"
    _stage(filled, "train-ffffffffffff", None)
    _epoch(filled, RUN, "epoch_0003")
    _epoch(filled, RUN, "epoch_0005")
    export_runs(filled, dest)

    elsewhere = tmp_path / "elsewhere"
    done = import_runs(dest, elsewhere)
    assert sorted(done.interrupted) == ["shapes-1_8/train-dddddddddddd @ last.pt",
                                        "shapes-1_8/train-ffffffffffff @ epoch_0005"]  # fmt: skip
    for rel in (f"ray/{RUN}/epoch_0003/state.pt", f"ray/{RUN}/epoch_0005/state.pt"):
        assert (elsewhere / rel).read_bytes() == (filled / rel).read_bytes()
    assert not (elsewhere / "stages/shapes-1_8/train-ffffffffffff/result.json").exists()  # still to finish
    assert import_runs(dest, elsewhere).interrupted == []  # imported already: nothing to do

    mine = tmp_path / "mine"  # a run of the same stage got further here: kept, the export's left out
    _stage(mine, "train-ffffffffffff", None)
    ours = _epoch(mine, RUN, "epoch_0009") / "state.pt"
    before = ours.read_bytes()
    done = import_runs(dest, mine)
    assert "shapes-1_8/train-ffffffffffff @ epoch_0005" not in done.interrupted
    (why,) = [w for w in done.left_out if "train-ffffffffffff" in w]
    assert "interrupted run of it" in why and "epoch_0009" in why
    assert ours.read_bytes() == before and not (mine / "ray" / RUN / "epoch_0005").exists()


def test_an_epoch_folder_ray_is_still_writing_waits_for_the_next_export(filled, tmp_path):
    _stage(filled, "train-ffffffffffff", None)
    _epoch(filled, RUN, "epoch_0003")
    (filled / "ray" / RUN / "epoch_0004").mkdir()  # made, its state.pt not written yet
    done = export_runs(filled, tmp_path / "export")
    assert "shapes-1_8/train-ffffffffffff @ epoch_0003" in done.interrupted
    assert not (tmp_path / "export" / "ray" / RUN / "epoch_0004").exists()


def test_a_stage_the_export_holds_finished_is_not_replaced_by_an_interrupted_run_of_it(filled, tmp_path):
    """Machine B finished a stage imported from A and exported it; A's export of its own interrupted run
    of that stage, later, leaves the finished one in place."""
    dest = tmp_path / "export"
    _stage(filled, "train-ffffffffffff", None)
    _epoch(filled, RUN, "epoch_0005")
    export_runs(filled, dest)
    b = tmp_path / "b"
    import_runs(dest, b)
    _epoch(b, RUN, "epoch_0008")
    _write_result(b / "stages/shapes-1_8/train-ffffffffffff", {"best_miou": 55.0,
                  "checkpoint": str(b / "ray" / RUN / "epoch_0008")})  # fmt: skip
    assert "shapes-1_8/train-ffffffffffff" in export_runs(b, dest).stages
    finished = _files(dest)
    done = export_runs(filled, dest)  # A again
    assert _files(dest) == finished and f"ray/{RUN}/epoch_0008/state.pt" in finished
    assert any("train-ffffffffffff" in why and "holds it finished" in why for why in done.left_out)


def test_a_second_import_replaces_the_epochs_the_first_left_unless_the_run_went_on_here(filled, tmp_path):
    dest, b = tmp_path / "export", tmp_path / "b"
    _stage(filled, "train-ffffffffffff", None)
    _epoch(filled, RUN, "epoch_0003")
    _epoch(filled, RUN, "epoch_0005")
    export_runs(filled, dest)
    import_runs(dest, b)  # not resumed on b yet
    _epoch(filled, RUN, "epoch_0007")  # a: further, and a better epoch 6 replaced 3 and 5
    _epoch(filled, RUN, "epoch_0006")
    shutil.rmtree(filled / "ray" / RUN / "epoch_0003")
    shutil.rmtree(filled / "ray" / RUN / "epoch_0005")
    export_runs(filled, dest)
    assert import_runs(dest, b).interrupted == ["shapes-1_8/train-ffffffffffff @ epoch_0007"]
    assert sorted(p.name for p in (b / "ray" / RUN).iterdir()) == ["epoch_0006", "epoch_0007"]

    (b / "ray" / RUN / "checkpoint_manager_snapshot.json").write_text("{}")  # it ran on b since: kept
    _epoch(filled, RUN, "epoch_0009")
    export_runs(filled, dest)
    done = import_runs(dest, b)
    assert done.interrupted == [] and any("interrupted run of it" in why for why in done.left_out)
    assert not (b / "ray" / RUN / "epoch_0009").exists()


def test_ray_checkpoints_kept_outside_the_runs_folder_are_named_not_lost(filled, tmp_path, monkeypatch):
    dest = tmp_path / "export"
    _stage(filled, "train-ffffffffffff", None)
    _epoch(filled, RUN, "epoch_0003")
    export_runs(filled, dest)
    monkeypatch.setenv("S4MIM_STORAGE", str(tmp_path / "bucket"))
    done = import_runs(dest, tmp_path / "b")
    assert not (tmp_path / "b" / "ray" / RUN).exists()
    assert any("train-ffffffffffff" in why and "S4MIM_STORAGE" in why for why in done.left_out)
    assert any("S4MIM_STORAGE" in why for why in export_runs(filled, tmp_path / "export2").left_out)


def test_a_manifest_of_the_same_data_generated_again_leaves_the_export_alone(filled, tiny_shapes, tmp_path):
    """A new machine generates the dataset again: same images, other modification times, so its manifest's
    bytes differ (the fingerprint holds the mtimes). The export keeps its manifest; other data replaces it."""
    import os

    import pyarrow.parquet as pq

    from data_prep.manifest import prepare

    data = tmp_path / "data" / "shapes"
    shutil.copytree(tiny_shapes, data)
    manifest = prepare("shapes", data, filled / "manifests")[0].path
    dest = tmp_path / "export"
    export_runs(filled, dest)
    exported = dest / "manifests" / manifest.name
    before = exported.read_bytes()
    for path in data.rglob("*.png"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert prepare("shapes", data, filled / "manifests")[0].path == manifest and manifest.read_bytes() != before
    assert export_runs(filled, dest).files == 0 and exported.read_bytes() == before

    table = pq.read_table(manifest)
    other = table.slice(1).replace_schema_metadata({**table.schema.metadata, b"content_hash": b"other"})
    pq.write_table(other, manifest)  # other data: the export follows it
    assert export_runs(filled, dest).files == 1 and exported.read_bytes() == manifest.read_bytes()
