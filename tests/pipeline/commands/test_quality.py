"""``s4mim quality`` on tiny settings, and the results table it writes."""

import os
import re
import sys
from pathlib import Path

import pytest

from pipeline.commands.quality import VARIANTS, Cell, results_markdown
from tests.conftest import TINY_OVERRIDES
from tests.pipeline.cli_helpers import run_main

# quality sets each run's budget itself (--epochs, --steps)
TINY_WITHOUT_BUDGET = [o for o in TINY_OVERRIDES if not o.startswith(("train.epochs=", "train.steps_per_epoch="))]


def _tiny_stem(preset: str, tiny_shapes: Path, baselines: bool = False) -> str:
    """The name quality gives the table of runs with the tiny settings (a hash of those settings)."""
    from pipeline.commands.quality import BASELINES, results_path
    from pipeline.config.presets import load_preset

    budget = ["train.epochs=1", "train.steps_per_epoch=2"]  # the tests' --epochs 1 --steps 2
    config = load_preset(preset, [*TINY_WITHOUT_BUDGET, f'data.root="{tiny_shapes}"', *budget])
    stem = results_path(config, Path("."), BASELINES if baselines else None).stem
    assert re.fullmatch(r"results-(short|testbed)(-baselines)?-1_4-set_[0-9a-f]{8}", stem), stem
    return stem


def test_results_table_gives_mean_std_and_each_seed(tiny_config):
    iou = {0: {"background": 90.0, "disc": 10.0}, 1: {"background": 94.0, "disc": 20.0}}
    cells = [Cell("unimatch", {0: 50.0, 1: 52.0}, final={0: 48.0, 1: 51.0}, iou=iou), Cell("s4mim", {0: 49.0})]
    text = results_markdown(tiny_config(), cells, [0, 1], 3, 7, 125.0, "s4mim quality", "abc123", {0: 40.0, 1: 42.0})
    assert "| unimatch | 51.00 ± 1.41 | 50.00 | 52.00 |" in text
    assert "| s4mim | 49.00 ± 0.00 | 49.00 | - |" in text
    assert "| unimatch | 49.50 ± 2.12 | 48.00 | 51.00 |" in text  # after the last epoch
    assert "| class | unimatch |" in text and "| disc | 15.0 |" in text  # per-class IoU, mean over seeds
    assert "41.00 ± 1.41 | 40.00 | 42.00 |" in text  # the warmup teacher row
    assert "`s4mim quality`" in text and "`abc123`" in text and "3 epochs of 7 steps" in text
    assert "the S4MIM ablation" in text


def test_results_table_names_the_machines_that_trained_its_runs(tiny_config):
    from pipeline.machine import machine

    a, b = "CPU A, 2 cores, torch 2.x (AVX512 kernels)", "CPU B, 16 cores, torch 2.x (AVX2 kernels)"
    cells = [Cell("unimatch", {0: 50.0, 1: 52.0}, machines={0: [a], 1: [b]}), Cell("s4mim", {0: 49.0, 1: 48.0},
             machines={0: [a]})]  # fmt: skip
    text = results_markdown(tiny_config(), cells, [0, 1], 3, 7, 125.0, "s4mim quality", "abc123", {})
    assert f"Train stages trained on: {a} (2 runs); {b} (1 runs); a machine not recorded" in text
    assert "(trained before results named it) (1 runs)." in text
    assert f"of wall time on {machine()}, no GPU" in text or "CUDA GPU(s)" in text  # the machine that wrote it
    older = [Cell("unimatch", {0: 50.0})]  # no run names its machine: no line
    assert "trained on" not in results_markdown(tiny_config(), older, [0], 3, 7, 1.0, "s4mim quality", "abc", {})


def test_results_table_gives_the_last_quarter_diagnostics(tiny_config):
    def epoch(i, ratio, norm):
        return {"epoch": i, "step": 10 * i, "train/mask_ratio": ratio, "train/pseudo_acc": 0.8,
                "train/grad_norm/x": norm, "train/grad_norm/s1": 0.1}  # fmt: skip

    # 8 epochs: the last quarter is epochs 7 and 8
    history = [epoch(i, 0.1 * i, 1.0) for i in range(1, 7)] + [epoch(7, 0.7, 0.3), epoch(8, 0.8, 0.5)]
    other_seed = [epoch(i, 0.5, 0.6) for i in range(1, 9)]
    cells = [
        Cell("supervised (step-matched)", {0: 60.0}, history={0: [{"epoch": 1, "step": 10}]}),
        Cell("unimatch", {0: 65.0, 1: 64.0}, history={0: history, 1: other_seed}),
    ]
    text = results_markdown(tiny_config(), cells, [0, 1], 8, 10, 60.0, "s4mim quality", "abc", {})
    assert "| variant | mask_ratio | pseudo_acc | grad_norm/s1 | grad_norm/x |" in text
    # mask_ratio: seed 0's last quarter 0.75, seed 1's 0.5; grad_norm/x 0.4 and 0.6
    assert "| unimatch | 0.625 | 0.800 | 0.100 | 0.500 |" in text
    assert "| supervised (step-matched) | 0" not in text  # no diagnostics: no row


def test_results_table_differences_each_seed_against_its_reference(tiny_config):
    cells = [
        Cell("supervised (step-matched)", {0: 60.0, 1: 61.0, 2: 62.0}, final={0: 58.0, 1: 59.0, 2: 60.0}),
        Cell("supervised (epoch-matched)", {0: 63.0, 1: 62.0, 2: 66.0}),
        Cell("unimatch", {0: 65.0, 1: 64.0, 2: 65.0}, final={0: 64.0, 1: 63.0, 2: 62.0}),
    ]
    text = results_markdown(tiny_config(), cells, [0, 1, 2], 40, 500, 60.0, "s4mim quality", "abc", {})
    assert "# Results: the baselines on" in text
    assert (
        "| unimatch − supervised (step-matched) | +3.67 ± 1.15 | +5.00 | +3.00 | +3.00 | 3 of 3 | +4.00 ± 2.00 |"
        in text
    )
    assert "| unimatch − supervised (epoch-matched) | +1.00 ± 1.73 | +2.00 | +2.00 | -1.00 | 2 of 3 | - |" in text
    assert "| supervised (epoch-matched) | - | - | - | - |" in text  # no last-epoch figures: dashes, not nan

    s4mim = Cell("s4mim (CMIM + FA + SMIM)", {0: 66.0, 2: 64.0})  # seed 1 still running
    text = results_markdown(tiny_config(), [*cells, s4mim], [0, 1, 2], 40, 500, 60.0, "s4mim quality", "abc", {})
    assert "| s4mim (CMIM + FA + SMIM) − unimatch | +0.00 ± 1.41 | +1.00 | - | -1.00 | 1 of 2 | - |" in text


def test_each_addition_is_differenced_against_the_row_it_adds_to(tiny_config):
    cells = [
        Cell("unimatch", {0: 60.0, 1: 61.0}),
        Cell("unimatch + plain MIM", {0: 62.0, 1: 60.0}),
        Cell("unimatch + CMIM", {0: 63.0, 1: 62.0}),
        Cell("s4mim (CMIM + FA + SMIM)", {0: 59.0, 1: 58.0}),  # no CMIM + FA row: no SMIM step
    ]
    text = results_markdown(tiny_config(), cells, [0, 1], 40, 500, 60.0, "s4mim quality", "abc", {})
    assert "| unimatch + CMIM − unimatch + plain MIM | +1.50 ± 0.71 | +1.00 | +2.00 | 2 of 2 | - |" in text
    assert "| unimatch + CMIM − unimatch | +2.00 ± 1.41 | +3.00 | +1.00 | 2 of 2 | - |" in text
    assert "− unimatch + CMIM + FA |" not in text


def test_a_knob_trial_is_set_against_the_same_rows_without_it(tiny_config):
    cells = [Cell("unimatch", {0: 60.0, 1: 61.0}), Cell("s4mim (CMIM + FA + SMIM)", {0: 58.0, 1: 62.0})]
    without = [Cell("s4mim (CMIM + FA + SMIM)", {0: 57.0, 1: 60.0}, final={0: 56.0, 1: 59.0})]
    trial = ["smim.pixels=visible", "fa.weight=0.2"]
    text = results_markdown(tiny_config(), cells, [0, 1], 40, 500, 60.0, "q", "abc", {}, reference=without,
                            trial=trial)  # fmt: skip
    assert "Against the same variant without `smim.pixels=visible`, `fa.weight=0.2` (`--trial`;" in text
    assert "| s4mim (CMIM + FA + SMIM): with − without | +1.50 ± 0.71 | +1.00 | +2.00 | 2 of 2 | - |" in text
    assert "with − without" not in results_markdown(tiny_config(), cells, [0, 1], 40, 500, 60.0, "q", "abc", {})


def test_without_matplotlib_the_table_is_written_without_charts(tiny_config, tmp_path, monkeypatch, capsys):
    from pipeline.commands.quality import write_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine with torch alone
    cells = [Cell("unimatch", {0: 50.0}, curve={0: [{"step": 1, "val/miou": 50.0}]}), Cell("s4mim", {0: 49.0})]
    path, charts = write_results(tiny_config(), cells, [0], 1, 2, 1.0, {}, tmp_path, "abc")
    assert charts == []
    text = path.read_text()
    assert "| unimatch | 50.00 ± 0.00 | 50.00 |" in text and "![" not in text
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_quality_smoke_writes_table_and_chart(capsys, runs, tiny_shapes, tmp_path):
    from torchvision.io import decode_png, read_file

    docs = tmp_path / "docs"
    tiny = TINY_WITHOUT_BUDGET
    sets = [arg for o in [*tiny, f'data.root="{tiny_shapes}"'] for arg in ("--set", o)]
    args = ["quality", "--regime", "short", "--local", "--seeds", "0", "--epochs", "1", "--steps", "2",
            "--docs", str(docs), *sets]  # fmt: skip
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    stem = _tiny_stem("shapes-1/8", tiny_shapes)  # the tiny settings label 1/4 of the images
    assert f"wrote {docs / stem}.md, {stem}.png, {stem}-curves.png" in out
    text = (docs / f"{stem}.md").read_text()
    for name in VARIANTS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert re.fullmatch(rf"\| {re.escape(name)} \| \d+\.\d\d ± 0\.00 \| \d+\.\d\d \|", row), row
    assert "1 epochs of 2 steps" in text and "warmup teacher" in text
    assert "after their last epoch" in text and "| background |" in text
    assert re.search(r"\| unimatch \| \d\.\d{3} \| \d\.\d{3} \|", text)  # its diagnostics, from the stage result
    assert re.search(rf"Train stages trained on: .*cores.* \({len(VARIANTS)} runs\)\.", text), text
    # A rewrite of the table keeps the notes written below the marker, and only those.
    from pipeline.commands.quality import KEEP_MARKER

    (docs / f"{stem}.md").write_text(text.replace("warmup teacher", "OLD") + f"{KEEP_MARKER}\n## Diagnosis\nkept\n")
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    again = (docs / f"{stem}.md").read_text()
    assert (
        "OLD" not in again and again.endswith(f"{KEEP_MARKER}\n## Diagnosis\nkept\n") and again.count(KEEP_MARKER) == 1
    )
    for chart in (f"{stem}.png", f"{stem}-curves.png"):
        image = decode_png(read_file(str(docs / chart)))
        assert image.shape[0] in (3, 4) and image.shape[1] > 100 and image.shape[2] > 100
    assert f"({stem}-curves.png)" in again
    # every variant ran as its own pipeline: a train stage each, one shared warmup
    stages = runs / "stages" / "shapes-1_8"
    assert len(list(stages.glob("train-*"))) == len(VARIANTS) and len(list(stages.glob("warmup-*"))) == 1
    # --dry-run reads the same cache: every run of the table is found, nothing is trained
    code, out, err = run_main(capsys, *args, "--dry-run")
    assert code == 0, err
    assert f"{len(VARIANTS)} runs of 1 epochs of 2 steps: {len(VARIANTS)} cached, 0 to train" in out
    assert re.search(r"cached: +unimatch, seed 0 \(val mIoU \d+\.\d\d\)", out), out
    assert "not generated or prepared" not in out
    # A knob trial trains the rows that read the knob, and sets them against the same rows at the defaults
    code, out, err = run_main(capsys, *args, "--trial", "smim.pixels=visible", "--variant", "s4mim")
    assert code == 0, err
    trial = next(path for path in docs.glob("*.md") if path.name != f"{stem}.md").read_text()
    assert "Against the same variant without `smim.pixels=visible` (`--trial`;" in trial
    assert re.search(r"\| s4mim \(CMIM \+ FA \+ SMIM\): with − without \| [+-]\d+\.\d\d ± 0\.00 \|", trial), trial
    assert "| unimatch: with − without" not in trial  # the same run with and without: left out


def test_the_testbed_regime_and_the_baselines_have_their_presets_and_tables():
    from pipeline.commands.quality import BASELINES, cell_configs, preset_for, results_path
    from pipeline.config.presets import load_preset
    from pipeline.errors import UsageError

    assert preset_for("1/8", "short") == "shapes-1/8" and preset_for("1/16", "testbed") == "shapes48-1/16"
    assert preset_for() == "shapes48-1/32" and preset_for(None, "short") == "shapes-1/8"  # each regime's default
    with pytest.raises(UsageError, match="the testbed regime has 1/32, 1/16, 1/8"):
        preset_for("1/2", "testbed")
    with pytest.raises(UsageError, match="choose one of short, testbed"):
        preset_for("1/8", "long")
    base = load_preset("shapes48-1/16")
    cells = cell_configs(base, [0, 1], base.train.epochs, base.train.steps_per_epoch, BASELINES)
    assert [(name, seed) for name, seed, _ in cells] == [(n, s) for s in (0, 1) for n in BASELINES]
    matched = {name: config for name, seed, config in cells if seed == 0}
    assert matched["supervised (epoch-matched)"].train.match == "epochs"
    assert matched["supervised (step-matched)"].train.match == "steps"
    assert {c.train.epochs * c.train.steps_per_epoch for c in matched.values()} == {20_000}
    assert results_path(base, Path("d"), BASELINES) == Path("d/results-testbed-baselines-1_16.md")
    # A preset of no regime names its table after itself: never results.md, the written report.
    assert results_path(load_preset("voc-1/8"), Path("d")) == Path("d/results-voc_1_8-imagenet.md")
    standin = load_preset("shapes48-1/32", ["model.init=standin"])
    assert results_path(standin, Path("d"), BASELINES) == Path("d/results-testbed-baselines-1_32-standin.md")
    knobs = load_preset("shapes48-1/32", ["smim.pixels=visible", "fa.weight=0.2", 'data.root="/elsewhere"'])
    assert results_path(knobs, Path("d")) == Path("d/results-testbed-1_32-fa_weight_0_2-smim_pixels_visible.md")
    # Settings that make another experiment are named, those that only say where or how it runs are not.
    assert results_path(load_preset("shapes48-1/32", ["data.split_seed=1"]), Path(".")).stem.endswith("split_seed_1")
    assert results_path(load_preset("shapes48-1/32", ["scaling.workers=2"]), Path(".")).stem.endswith("workers_2")
    assert (
        results_path(load_preset("shapes48-1/32", ["scaling.cpus_per_worker=2"]), Path(".")).stem
        == "results-testbed-1_32"
    )
    # A value the name could not spell unambiguously (a sign, a path) is hashed, as are many knobs.
    first, second = (results_path(load_preset("shapes48-1/32", [f"unimatch.strong_blur_sigma=[{lo}, 0.4]"]),
                                       Path(".")).stem for lo in ("0.2", "0.3"))  # fmt: skip
    assert first != second and re.fullmatch(r"results-testbed-1_32-set_[0-9a-f]{8}", first)


def test_variant_chooses_the_rows_with_unimatch_and_names_their_table(capsys, runs):
    from pipeline.commands.quality import BASELINES, VARIANTS, chosen_variants, results_path
    from pipeline.config.presets import load_preset
    from pipeline.errors import UsageError

    assert chosen_variants([], False) is None and chosen_variants([], True) == BASELINES
    rows = chosen_variants(["s4mim", "cmim"], False)  # in the table's order, the reference added
    assert rows == ("unimatch", "unimatch + CMIM", "s4mim (CMIM + FA + SMIM)")
    assert chosen_variants(["supervised-steps", "supervised-epochs"], False) == BASELINES
    every = ["supervised-steps", "supervised-epochs", "mim", "cmim", "cmim-fa", "s4mim"]
    assert chosen_variants(every, False) == tuple(VARIANTS)
    base = load_preset("shapes48-1/32", ["smim.view=weak"])
    assert results_path(base, Path("d"), rows) == Path("d/results-testbed-only_cmim_s4mim-1_32-smim_view_weak.md")
    assert results_path(base, Path("d"), tuple(VARIANTS)) == results_path(base, Path("d"))
    with pytest.raises(UsageError, match="give one of them"):
        chosen_variants(["cmim"], True)
    code, _, err = run_main(capsys, "quality", "--local", "--variant", "fa")
    assert code == 2 and "unknown --variant 'fa'" in err and "cmim-fa" in err


def test_quality_rejects_a_key_it_sets_itself(capsys, runs):
    code, _, err = run_main(capsys, "quality", "--local", "--set", "train.epochs=3")
    assert code == 2 and "--set train.epochs" in err and "--epochs" in err
    for bad in ("fa.weight=0", "fa.weight=true", "smim.weight=Infinity", 'fa={"weight": 0}'):
        code, _, err = run_main(capsys, "quality", "--local", "--set", bad)
        assert code == 2 and "positive weight" in err, bad
    code, _, err = run_main(capsys, "quality", "--local", "--set", 'mim={"mode": "plain"}')
    assert code == 2 and "--set mim.mode" in err
    code, _, err = run_main(capsys, "quality", "--local", "--trial", "seed=3")  # a trial knob is checked the same
    assert code == 2 and "--trial seed" in err


def test_a_term_weight_set_for_quality_reaches_the_variants_that_train_the_term():
    from pipeline.commands.quality import cell_configs, check_overrides
    from pipeline.config.presets import load_preset

    check_overrides(["fa.weight=0.3", "smim.weight=0.25"])  # accepted
    base = load_preset("shapes48-1/32", ["fa.weight=0.3", "smim.weight=0.25"])
    weights = {name: (c.fa.weight, c.smim.weight) for name, _, c in cell_configs(base, [0], 1, 10)}
    assert weights["s4mim (CMIM + FA + SMIM)"] == (0.3, 0.25)
    assert weights["unimatch + CMIM + FA"] == (0.3, 0)
    assert weights["unimatch + CMIM"] == weights["unimatch + plain MIM"] == (0, 0)


def test_a_dry_run_lists_the_runs_to_train_and_writes_nothing(capsys, runs, tiny_shapes, tmp_path):
    sets = [arg for o in [*TINY_WITHOUT_BUDGET, f'data.root="{tiny_shapes}"'] for arg in ("--set", o)]
    args = ["quality", "--regime", "short", "--local", "--seeds", "0", "--seeds", "1", "--epochs", "1",
            "--steps", "2", "--variant", "s4mim", "--docs", str(tmp_path / "docs"), "--dry-run", *sets]  # fmt: skip
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert "4 runs of 1 epochs of 2 steps: 0 cached, 4 to train (2 warmup(s) first)" in out
    assert "to train: s4mim (CMIM + FA + SMIM), seed 1: warmup, train, evaluate" in out
    assert "generator seed 0 is not generated or prepared yet" in out  # the runs folder has no manifest yet
    assert not runs.exists() and not (tmp_path / "docs").exists()


def test_held_out_data_gets_its_own_table_and_is_never_mixed_up(capsys, runs, tiny_shapes, tmp_path):
    from pipeline.commands.quality import results_path

    def config(*extra):
        from pipeline.config.presets import load_preset

        return load_preset("shapes-1/8", list(extra))

    docs = tmp_path / "docs"
    assert results_path(config(), docs) == docs / "results-short.md"
    assert results_path(config("data.synth_seed=2"), docs) == docs / "results-short-synth2.md"
    assert results_path(config("data.split=1/16", "data.synth_seed=1"), docs) == docs / "results-short-1_16-synth1.md"
    # The tiny dataset was generated with seed 0: asking for held-out seed 1 on it is refused before any run.
    sets = ["--set", f'data.root="{tiny_shapes}"']
    code, _, err = run_main(capsys, "quality", "--local", "--synth-seed", "1", "--docs", str(docs), *sets)
    assert code == 2 and "generated with seed 0, not 1" in err and "data.synth_seed=0" in err
    assert not docs.exists()
    code, _, err = run_main(capsys, "quality", "--local", "--split", "1/3")
    assert code == 2 and "--split 1/3" in err
    code, _, err = run_main(capsys, "quality", "--local", "--set", "data.synth_seed=1")
    assert code == 2 and "--synth-seed" in err


def test_a_pooled_table_has_a_column_per_generator_and_training_seed_pair(tiny_config):
    from pipeline.commands.quality import cell_configs, results_path, samples

    pairs = samples([3, 4], [0, 1])
    assert pairs == [(3, 0), (3, 1), (4, 0), (4, 1)] and samples([3], [0, 1]) == [0, 1]
    runs = cell_configs(tiny_config("data.synth_seed=3"), pairs, 1, 2, ["unimatch"])
    assert [(c.data.synth_seed, c.seed) for _, _, c in runs] == pairs  # each pair its own data and seed
    alone = cell_configs(tiny_config("data.synth_seed=4"), [1], 1, 2, ["unimatch"])
    assert alone[0][2] == runs[-1][2]  # the runs of the single-dataset table: a pooled table finds them cached
    cells = [
        Cell("supervised (step-matched)", {(3, 0): 60.0, (3, 1): 61.0, (4, 0): 50.0, (4, 1): 52.0}),
        Cell("unimatch", {(3, 0): 62.0, (3, 1): 60.0, (4, 0): 54.0, (4, 1): 55.0}),
    ]
    text = results_markdown(tiny_config("data.synth_seed=3"), cells, pairs, 1, 2, 60.0, "q", "abc", {(3, 0): 40.0})
    assert "generated with seeds 3 and 4 (held out, pooled)" in text
    assert "| variant | mean ± std | data 3 seed 0 | data 3 seed 1 | data 4 seed 0 | data 4 seed 1 |" in text
    assert "| unimatch | 57.75 ± 3.86 | 62.00 | 60.00 | 54.00 | 55.00 |" in text
    # every pair counts once: +2, -1, +4, +3 -> mean +2.00, 3 of 4 above 0
    assert "| unimatch − supervised (step-matched) | +2.00 ± 2.16 | +2.00 | -1.00 | +4.00 | +3.00 | 3 of 4 |" in text
    assert "pairs above 0" in text and "| 40.00 | - | - | - |" in text
    assert results_path(tiny_config(), Path("d"), None, [3, 4]).name.endswith("-synth3_4.md")
    assert results_path(tiny_config("data.synth_seed=3"), Path("d")).name.endswith("-synth3.md")


def test_quality_pools_held_out_datasets_in_one_table(capsys, runs, tmp_path):
    """--synth-seed 3 --synth-seed 4: each dataset in its own default folder, one warmup and run per pair, and
    one table whose columns are the pairs."""
    from data_prep.shapes import synthesize
    from tests.conftest import TINY_SHAPES

    for seed in (3, 4):  # tiny stand-ins for the held-out datasets, where quality looks for them
        synthesize(tmp_path / "data" / f"shapes-seed{seed}", seed=seed, settings=TINY_SHAPES)
    docs = tmp_path / "docs"
    sets = [arg for o in TINY_WITHOUT_BUDGET for arg in ("--set", o)]
    args = ["quality", "--regime", "short", "--local", "--seeds", "0", "--epochs", "1", "--steps", "2",
            "--variant", "unimatch", "--synth-seed", "4", "--synth-seed", "3", "--docs", str(docs), *sets]  # fmt: skip
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    (table,) = docs.glob("*.md")
    assert table.stem.endswith("-synth3_4"), table
    text = table.read_text()
    assert re.search(r"\| unimatch \| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \|\n", text), text
    assert "| data 3 seed 0 | data 4 seed 0 |" in text
    manifests = sorted(path.name for path in (runs / "manifests").iterdir())
    assert len(manifests) == 2 and len(list(runs.glob("stages/*/warmup-*"))) == 2  # one per dataset
    # Development data is never pooled with held-out data, and one data root cannot hold two datasets.
    code, _, err = run_main(capsys, "quality", "--local", "--synth-seed", "0", "--synth-seed", "3")
    assert code == 2 and "development data" in err
    code, _, err = run_main(capsys, "quality", "--local", "--synth-seed", "3", "--synth-seed", "4",
                            "--data-root", str(tmp_path / "data" / "shapes-seed3"))  # fmt: skip
    assert code == 2 and "holds one generated dataset" in err


def test_rows_that_share_their_stages_train_them_once(runs, tiny_config, monkeypatch):
    """With mim.weight=0 the plain-MIM and CMIM rows read the same settings: one process trains their stage."""
    from pipeline.commands import quality

    pools = []
    monkeypatch.setattr(quality, "_run_pool", lambda batch, *args, **kwargs: pools.append(batch))
    cells = quality.cell_configs(tiny_config("mim.weight=0"), [0], 1, 2, ["unimatch + plain MIM", "unimatch + CMIM"])
    quality.run_side_by_side(cells, runs, 2, ["--local"])
    warmups, trains = pools
    assert len(warmups) == 1 and [label for label, _, _ in trains] == ["unimatch + plain MIM, seed 0"]


def test_a_trial_and_the_defaults_never_share_a_run_file(runs, tiny_config, monkeypatch):
    """Two quality commands side by side, one with a knob under trial: each run's config file and log is
    its own, so neither command trains the other's settings."""
    from pipeline.commands import quality
    from pipeline.config.schema import Config

    pools = []
    monkeypatch.setattr(quality, "_run_pool", lambda batch, *args, **kwargs: pools.append(batch))
    for overrides in ([], ["smim.ratio=0.25"]):
        cells = quality.cell_configs(tiny_config(*overrides), [0], 1, 2, ["s4mim (CMIM + FA + SMIM)"])
        quality.run_side_by_side(cells, runs, 2, ["--local"], overrides)
    (defaults,), (trial,) = pools[1::2]  # each command's pools: its warmups, then its trains
    assert (defaults[0], trial[0]) == ("s4mim (CMIM + FA + SMIM), seed 0",
                                       "s4mim (CMIM + FA + SMIM) (smim.ratio=0.25), seed 0")  # fmt: skip
    assert defaults[2] != trial[2] and defaults[1][2] != trial[1][2]  # logs, config files
    ratios = [Config.model_validate_json(Path(run[1][2]).read_text()).smim.ratio for run in (defaults, trial)]
    assert ratios[0] != 0.25 and ratios[1] == 0.25
    # a stage the other command is running (the seed's warmup, here) is waited for, not failed on
    commands = [args for pool in pools for _, args, _ in pool]
    assert pools[0][0][1][0] == "warmup" and len(commands) == 4
    assert all(args[-1] == "--wait" for args in commands), commands


def test_quality_runs_side_by_side_each_stage_once(runs, tiny_shapes, tmp_path):
    """--jobs 2: the runs train in two s4mim processes at a time, one warmup per seed, and the table
    comes from their cached stages (the baselines only, to keep it short: the pool is the same)."""
    from pipeline.commands.quality import BASELINES
    from tests.conftest import run_cli

    docs = tmp_path / "docs"
    tiny = TINY_WITHOUT_BUDGET
    sets = [arg for o in [*tiny, f'data.root="{tiny_shapes}"'] for arg in ("--set", o)]
    args = ["quality", "--local", "--jobs", "2", "--seeds", "0", "--epochs", "1", "--steps", "2", "--baselines",
            "--docs", str(docs)]  # fmt: skip
    proc = run_cli(*args, *sets, env={"S4MIM_RUNS": str(runs)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = max(1, (os.cpu_count() or 1) // 2)  # --jobs 2 splits the host's cores between the two runs
    assert f"{len(BASELINES)} runs to train, 2 side by side with {threads} thread(s) each" in proc.stdout
    stages = runs / "stages" / "shapes48-1_32"  # the default regime: the testbed at its split
    assert len(list(stages.glob("warmup-*"))) == 1 and len(list(stages.glob("train-*"))) == len(BASELINES)
    logs = sorted(p.name for p in (runs / "quality" / "logs").iterdir())
    assert len(logs) == len(BASELINES) + 1 and sum(name.startswith("warmup-") for name in logs) == 1
    text = (docs / f"{_tiny_stem('shapes48-1/32', tiny_shapes, baselines=True)}.md").read_text()
    assert "s4mim quality --local --jobs 2" in text and text.count("--regime testbed") == 1 and "--split" not in text
    assert all(f"| {name} |" in text for name in BASELINES)
    assert not any(f"| {name} |" in text for name in VARIANTS if name not in BASELINES)
    # Everything is cached now: a rerun starts no process.
    proc = run_cli(*args, *sets, env={"S4MIM_RUNS": str(runs)})
    assert proc.returncode == 0 and "runs to train" not in proc.stdout


@pytest.mark.slow
def test_quality_side_by_side_runs_join_the_commands_ray(runs, tiny_shapes, tmp_path):
    """Without --local, the side-by-side runs join the Ray the quality command started and log to its MLflow."""
    from tests.conftest import run_cli

    tiny = TINY_WITHOUT_BUDGET
    sets = [arg for o in [*tiny, f'data.root="{tiny_shapes}"'] for arg in ("--set", o)]
    args = ["quality", "--regime", "short", "--jobs", "2", "--seeds", "0", "--epochs", "1", "--steps", "2",
            "--docs", str(tmp_path / "d")]  # fmt: skip
    proc = run_cli(*args, *sets, env={"S4MIM_RUNS": str(runs)}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = list((runs / "quality" / "logs").glob("*.log"))
    assert len(logs) == len(VARIANTS) + 1
    addresses = {line.split()[3].rstrip(":") for log in logs for line in log.read_text().splitlines()
                 if line.startswith("Ray cluster at")}  # fmt: skip
    assert len(addresses) == 1  # every run joined the one cluster
    assert (runs / "mlflow.db").is_file()
    assert (tmp_path / "d" / f"{_tiny_stem('shapes-1/8', tiny_shapes)}.md").is_file()


def test_a_rerun_of_a_pool_run_adds_to_its_log(tmp_path):
    """A run that is started again (to resume it) appends to its log: what the first attempt wrote stays."""
    from pipeline.commands.quality import _run_pool

    log = tmp_path / "run.log"
    for _ in range(2):
        _run_pool([("presets", ["presets"], log)], 1, [], dict(os.environ))
    text = log.read_text()
    assert text.count("== ") == 2 and text.count("s4mim presets") == 2
    assert text.count("shapes-1/8") == 2  # both listings, one after the other


def test_a_table_names_the_command_that_makes_it_again():
    """The regime and the split are spelled out, so that a table's command survives a change of defaults."""
    from pipeline.commands.quality import reproducing_command
    from pipeline.config.presets import load_preset

    testbed, short = load_preset("shapes48-1/32"), load_preset("shapes-1/8")
    assert reproducing_command(testbed, ["quality", "--jobs", "2"]) == (
        "s4mim quality --jobs 2 --regime testbed --split 1/32"
    )
    assert reproducing_command(short, ["quality", "--regime=short", "--seeds", "0"]) == (
        "s4mim quality --regime=short --seeds 0 --split 1/8"
    )
    assert reproducing_command(testbed, ["quality", "--split", "1/32", "--regime", "testbed"]) == (
        "s4mim quality --split 1/32 --regime testbed"
    )
    assert reproducing_command(short, []) == "s4mim quality --jobs 2 --regime short --split 1/8"  # make quality
    split_set = reproducing_command(short, ["quality", "--regime", "short", "--set", "data.split=1/4"])
    assert split_set == "s4mim quality --regime short --set data.split=1/4"  # --set decides the split: no --split


def test_quality_in_one_process_waits_for_a_stage_another_command_runs(runs, tiny_config, monkeypatch):
    """``--jobs 1`` runs each pipeline in this process: with ``wait``, as the side-by-side runs get ``--wait``."""
    from pipeline.commands import quality
    from pipeline.orchestration import orchestrate

    class Seen(Exception):
        pass

    def run_pipeline(config, runs, backend, **kwargs):
        raise Seen(kwargs)

    monkeypatch.setattr(orchestrate, "run_pipeline", run_pipeline)
    with pytest.raises(Seen) as seen:
        quality.run_quality(tiny_config(), [0], 1, 2, runs, backend=None, variants=["unimatch"])
    assert seen.value.args[0].get("wait") is True


def test_the_pool_says_when_a_run_waits_for_another_command(tmp_path, capsys):
    """A run whose stage another quality command is training waits for it (``--wait``); its line says so."""
    from pipeline.commands.quality import _run_pool

    waiting = "the train stage is running in another s4mim (pid 7 on h, since now), into /x; waiting for it to finish"
    script = tmp_path / "fake_run.py"
    script.write_text(f"print({waiting!r}, flush=True)\n")
    run = ("cmim, seed 0", [str(script)], tmp_path / "run.log")
    _run_pool([run], 1, [], dict(os.environ), program=[sys.executable])
    assert f"cmim, seed 0: {waiting}" in [line.strip() for line in capsys.readouterr().out.splitlines()]


def test_the_pool_says_each_epoch_a_run_finishes(tmp_path, capsys):
    """A day-long quality run says how each run is getting on: one line per finished epoch, with its val mIoU
    and the time left, read from the run's log as it grows (what an earlier attempt wrote is not repeated)."""
    from pipeline.commands.quality import _run_pool

    script = tmp_path / "fake_run.py"
    script.write_text(
        "import sys, time\n"
        "for epoch in (3, 4, 5):\n"
        "    print(f'  [train] epoch {epoch}/6: 10/10  loss 0.5  (1 s)', flush=True)\n"
        "    print(f'[train] epoch {epoch}/6  loss 0.5  miou {40 + epoch}.0  (9 s)', flush=True)\n"
        "    time.sleep(2.5)\n"
    )
    log = tmp_path / "run.log"
    log.write_text("[train] epoch 2/6  loss 0.6  miou 41.0  (9 s)\n")  # a first attempt, stopped after epoch 2
    _run_pool([("unimatch, seed 0", [str(script)], log)], 1, [], dict(os.environ), program=[sys.executable])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "epoch" in line]
    assert lines[0] == "unimatch, seed 0: train epoch 3/6, val mIoU 43.0", lines
    assert re.fullmatch(r"unimatch, seed 0: train epoch 4/6, val mIoU 44\.0 \(about \d+ min left\)", lines[1])
    assert len(lines) == 3 and lines[2].startswith("unimatch, seed 0: train epoch 5/6, val mIoU 45.0")
