"""Every preset loads; overrides are validated; unknown keys list the valid ones."""

import json

import pytest

from pipeline.config.presets import BUILTIN, load_preset
from pipeline.config.schema import Config
from pipeline.errors import UsageError
from pipeline.orchestration.hashing import stage_hash

EXPECTED = (
    [f"voc-{n}" for n in (92, 183, 366, 732, 1464)]
    + [f"voc-1/{n}" for n in (16, 8, 4, 2)]
    + [f"cityscapes-1/{n}" for n in (16, 8, 4, 2)]
    + [f"shapes-1/{n}" for n in (16, 8, 4, 2)]
    + [f"shapes48-1/{n}" for n in (32, 16, 8)]
)


def test_every_split_of_the_spec_has_a_preset_and_every_preset_loads():
    assert sorted(BUILTIN) == sorted(EXPECTED)
    errors = {}
    for name in BUILTIN:
        try:
            config = load_preset(name)
            assert config.preset == name
        except UsageError as exc:
            errors[name] = str(exc)
    assert not errors, errors


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(Config)


def test_overrides_are_typed_and_validated():
    config = load_preset("shapes-1/8", ["mim.ratio=0.6", "model.dilations=[1,2,3]", "data.split=92", "mim.conf=null"])
    assert config.mim.ratio == 0.6 and config.model.dilations == (1, 2, 3)
    assert config.data.split == "92" and config.mim.conf is None
    with pytest.raises(UsageError, match="mim.ratio: Input should be less than 1"):
        load_preset("shapes-1/8", ["mim.ratio=1.5"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UsageError) as err:
        load_preset("shapes-1/8", ["mim.ratioo=0.5"])
    assert "unknown key mim.ratioo" in str(err.value) and "ratio, patch" in str(err.value)
    with pytest.raises(UsageError, match="unknown key optimizer; valid keys in top level: .*optim"):
        load_preset("shapes-1/8", ["optimizer.lr=1"])


def test_unknown_preset_lists_presets():
    with pytest.raises(UsageError, match="unknown preset 'voc-1/9'; valid presets: voc-92"):
        load_preset("voc-1/9")


def test_variant_decides_the_terms():
    config = load_preset("shapes-1/8")
    assert config.terms("supervised") == {"x"}
    assert config.terms("unimatch") == {"x", "s1", "s2", "fp"}
    assert config.terms("s4mim") == {"x", "s1", "s2", "fp", "cmim", "fa", "smim"}
    assert "fa" not in load_preset("shapes-1/8", ["fa.weight=0"]).terms()


def test_stage_hash_tracks_what_changes_a_stage():
    base = load_preset("shapes-1/8")
    changed_method = load_preset("shapes-1/8", ["mim.ratio=0.6"])
    changed_loader = load_preset("shapes-1/8", ["data.loader_workers=3"])
    assert stage_hash(base, "warmup") == stage_hash(changed_method, "warmup")
    assert stage_hash(base, "train") != stage_hash(changed_method, "train")
    assert stage_hash(base, "train") == stage_hash(changed_loader, "train")
    assert stage_hash(base, "train", "a") != stage_hash(base, "train", "b")


def test_preset_files(tmp_path):
    short = tmp_path / "mine.json"
    short.write_text(json.dumps({"base": "shapes-1/8", "set": {"mim.ratio": 0.7}}))
    assert load_preset(str(short)).mim.ratio == 0.7
    assert load_preset(str(short)).preset == "mine"
    full = tmp_path / "full.json"
    full.write_text(load_preset("shapes-1/4").model_dump_json())
    assert load_preset(str(full)).data.split == "1/4"
    broken = tmp_path / "broken.json"
    broken.write_text('{"base": "shapes-1/8", "set": {"mim.nope": 1}}')
    with pytest.raises(UsageError, match="unknown key mim.nope"):
        load_preset(str(broken))


def test_testbed_presets_and_their_knobs():
    for split in ("1/32", "1/16", "1/8"):
        config = load_preset(f"shapes48-{split}")
        assert (config.data.split, config.data.crop, config.model.width) == (split, 48, 16)
    with pytest.raises(UsageError, match="model.width applies to resnet18_slim only"):
        load_preset("voc-1/8", ["model.width=16"])
    with pytest.raises(UsageError, match="train.match=epochs .* needs variant=supervised"):
        load_preset("shapes48-1/8", ["train.match=epochs"])
    with pytest.raises(UsageError, match="train.steps_per_epoch"):
        load_preset("shapes-1/8", ["variant=supervised", "train.match=epochs", "train.steps_per_epoch=null"])
    matched = load_preset("shapes48-1/8", ["variant=supervised", "train.match=epochs"])
    assert stage_hash(matched, "train") != stage_hash(load_preset("shapes48-1/8", ["variant=supervised"]), "train")


def test_every_builtin_preset_carries_the_chosen_cmim_input(tmp_path):
    """mim.input=whole was chosen on the development data: every built-in preset and every preset file
    based on one has it, --set takes it back, and schema.py's own default stays SPEC §3.2's isolated input."""
    assert Config().mim.input == "isolated"
    assert {name: load_preset(name).mim.input for name in BUILTIN} == dict.fromkeys(BUILTIN, "whole")
    assert load_preset("shapes48-1/32", ["mim.input=isolated"]).mim.input == "isolated"
    derived = tmp_path / "derived.json"
    derived.write_text(json.dumps({"base": "voc-1/8", "set": {"mim.ratio": 0.6}}))
    assert load_preset(str(derived)).mim.input == "whole"  # its cache key: test_engine's knob tests


def test_a_section_set_whole_merges_into_the_presets_section(tmp_path):
    """``--set 'mim={...}'`` changes the keys it names; the others keep the preset's values (Cityscapes'
    patch is 80, the default 32). The installed s4mim, as a user types it."""
    from tests.pipeline.cli_helpers import one_line_error, run_s4mim

    assert BUILTIN["cityscapes-1/8"]["mim"]["patch"] == 80 and Config().mim.patch == 32  # what the test tells apart
    done = run_s4mim("presets", "--show", "cityscapes-1/8", "--set", 'mim={"ratio": 0.6}')
    assert done.returncode == 0, done.stderr
    mim = json.loads(done.stdout)["mim"]
    assert mim["ratio"] == 0.6 and mim["patch"] == 80
    derived = tmp_path / "derived.json"
    derived.write_text(json.dumps({"base": "cityscapes-1/8", "set": {"mim": {"ratio": 0.6}}}))
    assert load_preset(str(derived)).mim.patch == 80  # a preset file's "set" merges the same way
    done = run_s4mim("presets", "--show", "cityscapes-1/8", "--set", 'mim={"ratioo": 0.6}')
    assert done.returncode == 2
    assert "unknown key mim.ratioo; valid keys in mim: " in one_line_error(done.stderr)
