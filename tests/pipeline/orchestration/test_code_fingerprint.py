"""The stage cache knows the code: a change to what a stage computes invalidates it, nothing else does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.fingerprint import code_fingerprint, source_digest
from pipeline.orchestration.hashing import stage_hash
from tests.conftest import copy_runs, tiny_args

ROOT = Path(__file__).resolve().parents[3]


def test_source_digest_sees_code_not_comments_docstrings_or_layout(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f(x):\n    """Add one."""\n    return x + 1\n')
    base = source_digest(path)
    source_digest.cache_clear()
    path.write_text('def f(x):  # a comment\n    """Add one, reworded."""\n\n    return (x + 1)\n')
    assert source_digest(path) == base
    source_digest.cache_clear()
    path.write_text('def f(x):\n    """Add one."""\n    return x + 2\n')
    assert source_digest(path) != base
    source_digest.cache_clear()


def _copy_project(target: Path) -> Path:
    for package in ("pipeline", "model", "data_prep", "sweeps"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _dry_run(project: Path, data_root: Path, runs: Path, *extra: str) -> str:
    args = [sys.executable, "-m", "pipeline", "pipeline", "run", "shapes-1/8", "--local", *tiny_args(data_root)]
    done = subprocess.run(
        [*args, *extra],
        capture_output=True,
        text=True,
        cwd=project,  # `python -m pipeline` imports the copy, not the installed package
        env={**os.environ, "S4MIM_RUNS": str(runs), "PYTHONPATH": str(project)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _status(out: str, stage: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith(f"{stage:<10} "))
    return line.split()[1]


def test_a_loss_change_invalidates_training_but_not_prepare(tiny_pipeline, tiny_shapes, tmp_path):
    project = _copy_project(tmp_path / "project")
    runs = copy_runs(tiny_pipeline, tmp_path / "runs")  # trained by the installed code, which the copy's is
    cached = _dry_run(project, tiny_shapes, runs, "--dry-run")
    assert all(_status(cached, s) == "cached" for s in ("prepare", "warmup", "train", "evaluate")), cached

    # What does not change a stage's output invalidates nothing: the CLI, comments, docstrings.
    cli = project / "pipeline" / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _unused_helper():\n    return 1\n")
    losses = project / "model" / "losses.py"
    original = losses.read_text()
    losses.write_text("# a new comment at the top\n" + original)
    unchanged = _dry_run(project, tiny_shapes, runs, "--dry-run")
    assert all(_status(unchanged, s) == "cached" for s in ("prepare", "warmup", "train", "evaluate")), unchanged

    # A change to a loss's code does.
    changed = original.replace("import torch\n", "import torch\n\nLOSS_CODE_VERSION = 2\n", 1)
    assert changed != original
    losses.write_text(changed)
    after = _dry_run(project, tiny_shapes, runs, "--dry-run")
    assert _status(after, "prepare") == "cached", after
    for stage in ("warmup", "train", "evaluate"):
        assert _status(after, stage) == "planned", after
    warmup_line = next(line for line in after.splitlines() if line.startswith("warmup "))
    assert "code changed since warmup-" in warmup_line and "config" not in warmup_line


def test_fingerprints_cover_the_stage_code_only():
    assert code_fingerprint("warmup") == code_fingerprint("train")
    assert code_fingerprint("evaluate") != code_fingerprint("train")  # it also draws the picture grid
    assert code_fingerprint("pretrain") != code_fingerprint("train")


def _copy_code(target: Path) -> Path:
    for package in ("pipeline", "model", "data_prep"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "standin"))
    return target


def test_the_config_code_that_picks_the_losses_is_in_the_training_fingerprints(tmp_path):
    project = _copy_code(tmp_path / "project")
    before = {stage: code_fingerprint(stage, project) for stage in ("warmup", "train", "evaluate")}
    config = project / "pipeline" / "config" / "schema.py"
    source = config.read_text()
    assert "def terms(self" in source
    config.write_text(source + "\n\nCONFIG_CODE_VERSION = 2\n")
    source_digest.cache_clear()
    after = {stage: code_fingerprint(stage, project) for stage in before}
    assert all(after[stage] != before[stage] for stage in before), (before, after)


def test_moving_a_source_alone_changes_no_fingerprint(tmp_path):
    project = _copy_code(tmp_path / "project")
    before = {stage: code_fingerprint(stage, project) for stage in ("warmup", "train", "evaluate", "pretrain")}
    (project / "model" / "losses.py").rename(project / "model" / "loss_terms.py")  # still under model/*.py
    assert {stage: code_fingerprint(stage, project) for stage in before} == before


def test_eval_settings_are_hashed_by_every_stage_whose_best_checkpoint_they_pick():
    from pipeline.config.presets import load_preset
    from pipeline.config.schema import apply_overrides

    base = load_preset("shapes-1/8")
    window = apply_overrides(base, {"eval.mode": "sliding_window", "eval.crop": 48})
    for stage in ("warmup", "train", "evaluate"):
        assert stage_hash(window, stage, "inputs") != stage_hash(base, stage, "inputs"), stage
    fewer_pictures = apply_overrides(base, {"eval.grid_images": 2})  # the grid is drawn by evaluate alone
    for stage in ("warmup", "train"):
        assert stage_hash(fewer_pictures, stage, "inputs") == stage_hash(base, stage, "inputs"), stage
    assert stage_hash(fewer_pictures, "evaluate", "inputs") != stage_hash(base, "evaluate", "inputs")


# Modules a stage imports that do not decide what it computes, each with the reason it may stay outside.
OUTSIDE_THE_FINGERPRINT = {
    "pipeline/console.py": "console output only",
    "pipeline/paths.py": "where files are, not what is in them",
    "pipeline/errors.py": "error types",
    "pipeline/fingerprint.py": "this module",
    # the weights it resolves are hashed by their bytes, and its own code by the pretrain fingerprint
    "pipeline/training/standin.py": "hashed through the weights it resolves",
}


def _project_imports(path: Path) -> set[Path]:
    """The project's source files that ``path`` imports, at the top or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("pipeline", "model", "data_prep"):
                module = ROOT.joinpath(*name.split("."))
                for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                    if candidate.is_file():
                        found.add(candidate)
    return found


def test_every_module_the_stages_import_is_fingerprinted_or_named_as_outside():
    """A new file the stages import (the loss terms, say) must join STAGE_CODE, or it changes results
    without rerunning a cached stage."""
    from pipeline.fingerprint import STAGE_CODE

    seen, todo = set(), [ROOT / "pipeline" / "training" / "stages.py"]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _project_imports(path)
    covered = {path for pattern in STAGE_CODE["evaluate"] for path in ROOT.glob(pattern)}
    reachable = {str(path.relative_to(ROOT)) for path in seen if path.name != "__init__.py"}
    assert {"pipeline/training/terms.py", "pipeline/training/optimization.py"} <= reachable
    missing = reachable - {str(path.relative_to(ROOT)) for path in covered} - set(OUTSIDE_THE_FINGERPRINT)
    assert not missing, f"imported by the stages but in no fingerprint: {sorted(missing)}"
