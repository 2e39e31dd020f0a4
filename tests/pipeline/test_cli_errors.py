"""Bad input: exit code 2, one line naming the file or key, no traceback, nothing damaged."""

import re

import pytest

from tests.data_prep.trees import damage_voc_sample, voc_tree
from tests.pipeline.cli_helpers import one_line_error as _one_line_error
from tests.pipeline.cli_helpers import run_main


def test_missing_dataset_root(capsys, runs, tmp_path):
    code, _, err = run_main(capsys, "data", "prepare", "voc", "--root", str(tmp_path / "nowhere"))
    assert code == 2
    assert str(tmp_path / "nowhere") in _one_line_error(err)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("corrupt", "JPEGImages/2007_000004.jpg: image does not decode"),
        ("range", "SegmentationClass/2007_000004.png: label value 77 is outside 0..20"),
        ("size", "SegmentationClass/2007_000004.png: mask is 24x5 but image is 24x20"),
    ],
)
def test_bad_sample_fails_and_keeps_the_old_manifest(capsys, runs, tmp_path, damage, expected):
    root = voc_tree(tmp_path / "voc")
    assert run_main(capsys, "data", "prepare", "voc", "--root", str(root))[0] == 0
    (manifest,) = (runs / "manifests").glob("*.parquet")
    before = manifest.read_bytes()
    damage_voc_sample(root, "2007_000004", damage, value=77)
    code, _, err = run_main(capsys, "data", "prepare", "voc", "--root", str(root))
    assert code == 2
    assert expected in _one_line_error(err)
    assert manifest.read_bytes() == before
    assert [p.name for p in manifest.parent.iterdir()] == [manifest.name]  # no temporary leftovers


def test_unknown_preset(capsys, runs):
    code, _, err = run_main(capsys, "pipeline", "run", "shapes-1/3")
    assert code == 2
    assert "unknown preset 'shapes-1/3'" in _one_line_error(err) and "shapes-1/8" in err


def test_unknown_set_key(capsys, runs):
    code, _, err = run_main(capsys, "train", "shapes-1/8", "--set", "mim.ratioo=0.5")
    assert code == 2
    line = _one_line_error(err)
    assert "unknown key mim.ratioo" in line and "ratio" in line and "max_classes" in line


def test_labeled_ids_naming_a_missing_image(capsys, runs, tmp_path):
    root = voc_tree(tmp_path / "voc")
    ids = tmp_path / "labeled.txt"
    ids.write_text("2007_000001\n2007_999999\n")
    code, _, err = run_main(capsys, "data", "prepare", "voc", "--root", str(root), "--labeled-ids", str(ids))
    assert code == 2
    assert "'2007_999999', which is not a train image" in _one_line_error(err)


def test_debug_shows_the_traceback(capsys, runs):
    with pytest.raises(Exception, match="unknown preset"):
        run_main(capsys, "--debug", "pipeline", "run", "shapes-1/3")


def test_an_eof_error_is_a_fault_not_an_interruption(capsys, monkeypatch):
    """click turns an EOFError into the Abort it makes of Ctrl-C; s4mim reports it as the fault it is."""
    import io
    import pickle

    from pipeline.config import presets

    def truncated(*args, **kwargs):
        return pickle.load(io.BytesIO(b""))  # an empty file: EOFError, "Ran out of input"

    monkeypatch.setattr(presets, "preset_names", truncated)
    with pytest.raises(EOFError):  # no user error: the traceback, as for any other fault
        run_main(capsys, "presets")
    assert "interrupted" not in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    panel = out[out.index("Commands") :]
    rows = {m.group(1) for m in re.finditer(r"^\W+([a-z]+)\s{2,}\S", panel, re.MULTILINE)}  # a row's first word
    expected = {"data", "warmup", "train", "evaluate", "pipeline", "presets", "predict", "sweep", "quality", "runs"}
    assert expected <= rows, rows
    code, out, _ = run_main(capsys, "presets")
    assert code == 0 and "voc-1464" in out and "cityscapes-1/16" in out and "shapes-1/2" in out
