"""Bad input through the installed ``s4mim``: exit code 2, one line on stderr, nothing written before damaged.

These run the real entry point as a subprocess, since what a user sees depends on it (which click
the installed typer carries, how the console script handles exceptions).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_runs, tiny_args
from tests.data_prep.trees import custom_tree
from tests.pipeline.cli_helpers import S4MIM, one_line_error, run_s4mim, tree_state


@pytest.fixture
def user_env(tmp_path) -> dict:
    """A runs folder holding an earlier output, as a user's would."""
    runs = tmp_path / "runs"
    (runs / "notes").mkdir(parents=True)
    (runs / "notes" / "earlier.txt").write_text("written before")
    return {"S4MIM_RUNS": str(runs), "S4MIM_DATA": str(tmp_path / "data")}


# -- 1. mistakes on the command line itself -------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["pipeline", "run"], "Missing argument 'preset'"),
        (["nosuchcmd"], "No such command 'nosuchcmd'"),
        (["pipeline", "run", "shapes-1/8", "--bogus"], "No such option: --bogus"),
        (["pipeline", "run", "shapes-1/8", "--set"], "'--set' requires an argument"),
        (["data", "prepare", "custom"], "Missing option '--root'"),
        (["data", "prepare", "custom", "--root", "x", "--split-seed", "abc"], "'--split-seed'"),
        (["--debug", "nosuchcmd"], "No such command 'nosuchcmd'"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(user_env, args, expected):
    before = tree_state(Path(user_env["S4MIM_RUNS"]))
    done = run_s4mim(*args, env=user_env)
    assert done.returncode == 2, done.stderr
    assert expected in one_line_error(done.stderr)
    assert tree_state(Path(user_env["S4MIM_RUNS"])) == before


def test_a_command_line_mistake_names_the_help_to_read(user_env):
    done = run_s4mim("pipeline", "run", "shapes-1/8", "--bogus", env=user_env)
    assert "s4mim pipeline run --help" in one_line_error(done.stderr)


def test_bare_s4mim_prints_the_help_without_a_traceback(user_env):
    done = run_s4mim(env=user_env)
    assert "Traceback" not in done.stdout + done.stderr
    assert "pipeline" in done.stdout and "Usage" in done.stdout
    assert done.returncode in (0, 2)  # click releases differ; either way no traceback and the help


# -- 2. a runs folder that cannot be written ---------------------------------------------------------


def _blocked_runs(tmp_path: Path, kind: str) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker if kind == "file" else blocker / "runs"


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
@pytest.mark.parametrize("command", ["local-warmup", "data-prepare", "ray-pipeline", "dry-run"])
def test_runs_folder_that_cannot_be_written(tiny_shapes, tmp_path, kind, command):
    runs = _blocked_runs(tmp_path, kind)
    args = {
        "local-warmup": ["warmup", "shapes-1/8", "--local", *tiny_args(tiny_shapes)],
        "data-prepare": ["data", "prepare", "shapes", "--root", str(tiny_shapes)],
        "ray-pipeline": ["pipeline", "run", "shapes-1/8", *tiny_args(tiny_shapes)],
        "dry-run": ["pipeline", "run", "shapes-1/8", "--dry-run", *tiny_args(tiny_shapes)],  # what the run would refuse
    }[command]
    done = run_s4mim(*args, env={"S4MIM_RUNS": str(runs)})
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done.stderr)
    assert f"runs folder {runs} cannot be written" in line and "S4MIM_RUNS" in line
    assert (tmp_path / "a-file").read_text() == "not a folder"
    assert "Ray" not in done.stdout  # failed before starting anything


def _bind_read_only(source: Path, target: Path) -> bool:
    target.mkdir()
    for command in (["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,ro,bind", str(target)]):
        if subprocess.run(command, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            return False
    return True


def test_a_cached_pipeline_writes_nothing_and_runs_from_a_read_only_folder(tiny_pipeline, tiny_shapes, tmp_path):
    runs = copy_runs(tiny_pipeline, tmp_path / "runs")
    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes)]
    before = tree_state(runs)
    again = run_s4mim(*args, env={"S4MIM_RUNS": str(runs)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(" cached ") == 4
    assert tree_state(runs) == before  # a cached stage writes nothing, prepare included

    read_only = tmp_path / "ro"
    if not _bind_read_only(runs, read_only):
        pytest.skip("cannot make a read-only bind mount here")
    try:
        cached = run_s4mim(*args, env={"S4MIM_RUNS": str(read_only)})
        assert cached.returncode == 0, cached.stderr[-2000:]
        assert cached.stdout.count(" cached ") == 4
        refusal = f"runs folder {read_only} cannot be written (Read-only file system)"
        forced = run_s4mim(*args, "--force", "evaluate", env={"S4MIM_RUNS": str(read_only)})
        assert forced.returncode == 2
        assert refusal in one_line_error(forced.stderr)
        dry = run_s4mim(*args, "--force", "evaluate", "--dry-run", env={"S4MIM_RUNS": str(read_only)})
        assert dry.returncode == 2 and refusal in one_line_error(dry.stderr)  # the dry run tells what the run does
        cached_dry = run_s4mim(*args, "--dry-run", env={"S4MIM_RUNS": str(read_only)})
        assert cached_dry.returncode == 0 and cached_dry.stdout.count(" cached ") == 4
    finally:
        subprocess.run(["umount", str(read_only)], capture_output=True)
    assert tree_state(runs) == before


# -- 3. Ctrl-C (--local here; under Ray in test_ray_interrupts.py) --------------------------------------


def interrupt_after(args: list[str], env: dict, marker: str, timeout: float = 300,
                    signum: int = signal.SIGINT) -> tuple[int, str, str]:  # fmt: skip
    """Start ``s4mim ARGS``, press Ctrl-C (SIGINT to its process group) once ``marker`` is printed; another
    ``signum`` goes to the s4mim process alone, as ``kill`` sends it."""
    process = subprocess.Popen(
        [str(S4MIM), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        start_new_session=True,  # a process group of its own, as a terminal gives
        # A terminal's default Ctrl-C: a shell that runs the tests in the background ignores SIGINT, and a
        # child that starts with it ignored never sees it (Python then installs no KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out = []
    try:
        for line in process.stdout:
            out.append(line)
            if marker in line:
                if signum == signal.SIGINT:
                    os.killpg(process.pid, signal.SIGINT)
                else:
                    process.send_signal(signum)
                break
        try:
            rest, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = stacks_of_group(process.pid)
            raise AssertionError(f"s4mim still runs {timeout:.0f} s after Ctrl-C; its processes:\n{stacks}") from None
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, "".join(out) + rest, err


def stacks_of_group(pgid: int) -> str:
    """The Python stacks of every process in group ``pgid``, by py-spy (which Ray's default extra installs)."""
    spy = Path(sys.executable).with_name("py-spy")
    reports = []
    for pid in sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if os.getpgid(pid) != pgid:
                continue
        except ProcessLookupError:
            continue
        dump = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        reports.append(f"--- pid {pid}\n{dump.stdout or dump.stderr}")
    return "\n".join(reports)


def epoch_line(stage: str, epoch: int, epochs: int) -> str:
    """The start of the line a finished epoch prints. The plain progress lines of an epoch still running
    read ``  [warmup] epoch 2/6: 10/40 ...``, so the two spaces after the count tell them apart."""
    return f"[{stage}] epoch {epoch}/{epochs}  "


def last_epoch_seen(out: str, stage: str) -> int:
    """The last epoch ``out`` says was finished (its checkpoint is written before its line)."""
    epochs = [int(line.split(f"[{stage}] epoch ", 1)[1].split("/")[0]) for line in out.splitlines() if
              line.startswith(f"[{stage}] epoch ") and line.split("/", 1)[1].split(" ", 1)[0].isdigit()]  # fmt: skip
    return max(epochs, default=0)


def test_ctrl_c_in_a_local_stage_exits_130_quietly_and_resumes(tiny_shapes, tmp_path):
    env = {"S4MIM_RUNS": str(tmp_path / "runs")}
    # Epochs of a few seconds: Ctrl-C lands long before the last one, even on a loaded machine.
    args = ["warmup", "shapes-1/8", "--local", *tiny_args(tiny_shapes, "warmup.epochs=6", "data.loader_workers=2",
            "warmup.steps_per_epoch=40")]  # fmt: skip
    code, out, err = interrupt_after(args, env, epoch_line("warmup", 2, 6))
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    seen = last_epoch_seen(out, "warmup")

    done = run_s4mim(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = int(done.stdout.split("[warmup] resuming after epoch ", 1)[1].split()[0])
    assert resumed >= seen  # no finished epoch is trained again
    assert epoch_line("warmup", resumed + 1, 6) in done.stdout and epoch_line("warmup", 6, 6) in done.stdout


# -- 4. a split with no unlabeled images ----------------------------------------------------------------


def test_a_split_with_no_unlabeled_images_fails_before_training(tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes, "data.split=1/1")]
    done = run_s4mim(*args, env={"S4MIM_RUNS": str(runs)})
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "leaving no unlabeled ones for the s4mim variant" in line and "variant=supervised" in line
    assert not (runs / "stages").exists()  # nothing trained

    supervised = run_s4mim(*args, "--set", "variant=supervised", env={"S4MIM_RUNS": str(runs)})
    assert supervised.returncode == 0, supervised.stderr[-2000:]
    assert "\ntrain      ran" in supervised.stdout


# -- 6. smaller ones -----------------------------------------------------------------------------------


def test_without_matplotlib_a_pipeline_stops_before_training_and_names_both_fixes(tiny_shapes, tmp_path):
    hidden = tmp_path / "site"  # an install without matplotlib, such as one made with pip --no-deps
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = {"S4MIM_RUNS": str(tmp_path / "runs"), "PYTHONPATH": str(hidden)}
    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes)]
    done = run_s4mim(*args, env=env)
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "matplotlib is not installed" in line and "--set eval.grid_images=0" in line
    assert not (tmp_path / "runs" / "stages").exists()  # nothing trained
    warmup = run_s4mim("warmup", "shapes-1/8", "--local", *tiny_args(tiny_shapes), env=env)  # draws no grid
    assert warmup.returncode == 0, warmup.stderr[-2000:]
    again = run_s4mim(*args, "--set", "eval.grid_images=0", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "\nevaluate   ran" in again.stdout and not list((tmp_path / "runs").rglob("grid.png"))


def test_bad_sample_in_a_pipeline_names_a_fix_the_pipeline_has(tmp_path):
    root = custom_tree(tmp_path / "custom")
    (root / "masks" / "img002.png").write_bytes(b"not a png")
    args = ["pipeline", "run", "shapes-1/8", "--local", "--set", "data.dataset=custom", "--data-root", str(root)]
    done = run_s4mim(*args, env={"S4MIM_RUNS": str(tmp_path / "runs")})
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "bad sample img002" in line and f"s4mim data prepare custom --root {root} --skip-bad" in line
    assert "(--skip-bad leaves" not in line


def test_labeled_ids_errors_name_the_option_they_came_from(tiny_shapes, tmp_path):
    missing = tmp_path / "nope.txt"
    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes, f"data.labeled_ids={missing}")]
    done = run_s4mim(*args, env={"S4MIM_RUNS": str(tmp_path / "runs")})
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert f"--set data.labeled_ids={missing}: no such file" in line and "--labeled-ids" not in line


def test_relative_custom_root_is_stored_as_absolute_paths(tmp_path):
    import pyarrow.parquet as pq

    custom_tree(tmp_path / "c3")
    runs = tmp_path / "runs"
    done = run_s4mim("data", "prepare", "custom", "--root", "c3", env={"S4MIM_RUNS": str(runs)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (manifest,) = (runs / "manifests").glob("*.parquet")
    table = pq.read_table(manifest).to_pylist()
    assert table and all(Path(row["image"]).is_absolute() for row in table)
    assert all(row["mask"] is None or Path(row["mask"]).is_absolute() for row in table)


def test_custom_set_without_masks_says_so(tmp_path):
    root = custom_tree(tmp_path / "custom")
    for mask in (root / "masks").iterdir():
        mask.unlink()
    (root / "masks").rmdir()
    (root / "val.txt").unlink()
    done = run_s4mim("data", "prepare", "custom", "--root", str(root), env={"S4MIM_RUNS": str(tmp_path / "runs")})
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "no masks found" in line and str(root / "masks") in line


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_outputs_follow_the_umask(tiny_shapes, tmp_path):
    runs = tmp_path / "runs"
    args = ["warmup", "shapes-1/8", "--local", *tiny_args(tiny_shapes)]
    done = subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$0" "$@"', str(S4MIM), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "S4MIM_RUNS": str(runs)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = [p for p in runs.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {p.name for p in files} >= {"last.pt", "best.pt", "result.json", "labeled.txt"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert not [p for p in runs.rglob(".*") if p.is_file()]  # no temporary leftovers


def test_ctrl_c_while_generating_shapes_leaves_nothing_half_written(tmp_path):
    root = tmp_path / "shapes"
    code, _, err = interrupt_after(["data", "synth", "--root", str(root)], {}, "images: ")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert not root.exists() and not list(tmp_path.glob(".shapes.*"))  # atomic: all or nothing
