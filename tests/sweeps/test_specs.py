"""Every shipped sweep spec loads; bad specs exit 2 with a message listing what is valid."""

import json

import pytest

from pipeline.errors import UsageError
from sweeps.spec import REPORTED_METRICS, load_spec, spec_names
from tests.pipeline.cli_helpers import run_main


def test_every_spec_loads():
    names = spec_names()
    assert "default" in names
    errors = {}
    for name in names:
        try:
            spec = load_spec(name)
            assert spec.space and spec.metric in REPORTED_METRICS
        except UsageError as exc:
            errors[name] = str(exc)
    assert not errors, errors


def test_default_spec_sweeps_the_method_knobs():
    spec = load_spec("default")
    assert spec.preset == "shapes-1/8"
    assert {"mim.ratio", "mim.weight", "fa.weight", "smim.weight"} <= set(spec.space)
    assert spec.num_samples >= 6


def _write(tmp_path, **changes):
    spec = json.loads(load_spec("default").model_dump_json())
    spec.update(changes)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"space": {"mim.ratioo": {"uniform": [0.3, 0.6]}}}, "unknown key mim.ratioo; valid keys in mim: mode, weight"),
        ({"space": {}}, "the search space is empty"),
        ({"metric": "val/accuracy"}, "metric 'val/accuracy' is not reported by the train stage; valid: val/miou"),
        ({"space": {"mim.ratio": {"uniform": [0.3, 0.6], "choice": [1]}}}, "give exactly one of grid, choice"),
        ({"space": {"mim.ratio": {"normal": [0, 1]}}}, "unknown key space.mim.ratio.normal; valid keys: grid"),
        ({"space": {"optim.lr": {"choice": [0.01, 0.02]}}}, "space.optim.lr changes the warmup stage"),
        ({"tuner": {}}, "unknown key tuner; valid keys: name, preset"),
        ({"space": {"mim.ratio": {"uniform": [0.3, 1.5]}}}, "space.mim.ratio: mim.ratio: Input should be less than 1"),
    ],
)
def test_bad_spec_exits_2_with_the_valid_choices(capsys, runs, tmp_path, changes, expected):
    path = _write(tmp_path, **changes)
    code, _, err = run_main(capsys, "sweep", str(path))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err


def test_unknown_spec_name_lists_the_shipped_ones(capsys, runs):
    code, _, err = run_main(capsys, "sweep", "no-such-sweep")
    assert code == 2 and "default" in err
