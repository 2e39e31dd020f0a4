"""The console shows the project's own lines; Ray's and MLflow's output lands in the stage folder's log."""

from __future__ import annotations

import json
import re
import warnings

from pipeline import console
from pipeline.backends.worker_logs import WorkerOutput, stage_log, tail

ANSI = re.compile(r"\x1b\[")


def _forwarded(*lines: str, actor: str = "RayTrainWorker") -> dict:
    """A batch of worker output as Ray's log monitor hands it to the driver."""
    return {"pid": 4242, "actor_name": actor, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": list(lines)}


def test_worker_output_goes_to_the_console_only_when_it_is_the_projects(tmp_path, capsys):
    output = WorkerOutput()
    log = tmp_path / "stage.log"
    chatter = "[2026-01-01 10:00:00,000 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' ..."
    project_warning = f"{console.PROJECT_ROOT}/pipeline/training/stages.py:12: UserWarning: the val set is empty"
    with output.into(log):
        output(_forwarded(console.EVENT_MARK + json.dumps({"kind": "line", "text": "[train] epoch 1/4  loss 1.0"})))
        output(_forwarded(f"\x1b[36m{chatter}\x1b[0m", actor="TrainController"))
        output(_forwarded(project_warning))
        output(_forwarded("/venv/lib/site-packages/torch/nn.py:3: UserWarning: deprecated, use X"))
    out, err = capsys.readouterr()
    assert out == "[train] epoch 1/4  loss 1.0\n"
    assert err == f"warning: {project_warning}\n"  # a library's warning about itself is not the user's to act on
    kept = log.read_text()
    assert f"(TrainController pid=4242) {chatter}\n" in kept and not ANSI.search(kept)
    assert "deprecated, use X" in kept and "epoch 1/4" not in kept

    console.set_verbose(True)
    try:
        output(_forwarded(chatter))
    finally:
        console.set_verbose(False)
    assert chatter in capsys.readouterr().err  # --verbose shows it


def test_progress_is_a_plain_line_every_few_seconds_off_a_terminal(capsys):
    bar = console.LoopProgress("[train] epoch 1/2", final=False, terminal=False, interval=0.0)
    for done in range(4):
        bar(done, 3, "loss 0.5")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  (")[0] for line in lines] == [f"  [train] epoch 1/2: {d}/3  loss 0.5" for d in range(3)]
    quiet = console.LoopProgress("validated", terminal=False, interval=3600)
    for done in range(11):
        quiet(done, 10)
    assert capsys.readouterr().out.splitlines()[0].startswith("  validated: 10/10")  # only the last


def test_library_loggers_and_warnings_go_to_the_stage_log(tmp_path, capsys):
    import logging

    log = tmp_path / "stage.log"
    with stage_log(log):
        logging.getLogger("mlflow.pytorch").warning("Saving pytorch model by Pickle requires caution")
        logging.getLogger("ray.train").error("something Ray says")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == ""
    text = log.read_text()
    assert "Saving pytorch model by Pickle" in text and "something Ray says" in text
    assert tail(log, 1) == [text.splitlines()[-1]]


def _run_on_a_terminal(args: list[str], env: dict, *, columns: int = 120, timeout: float = 300) -> tuple[int, str]:
    """The installed ``s4mim`` with stdin, stdout and stderr on a pseudo-terminal, as in a user's shell."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    from tests.pipeline.cli_helpers import S4MIM

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    child = subprocess.Popen([str(S4MIM), *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                             env={**os.environ, "TERM": "xterm-256color", **env})  # fmt: skip
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side
                    break
                if not data:
                    break
                chunks.append(data)
            elif child.poll() is not None:
                break
        else:
            child.kill()
            raise AssertionError("s4mim did not finish on the terminal in time")
    finally:
        os.close(master)
    return child.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_on_a_terminal_a_long_epoch_shows_a_progress_bar_that_makes_way_for_the_epoch_line(tiny_shapes, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    args = ["warmup", "shapes-1/8", "--local", "--data-root", str(tiny_shapes)]
    for item in (*TINY_OVERRIDES, "warmup.steps_per_epoch=30"):
        args += ["--set", item]
    code, screen = _run_on_a_terminal(args, {"S4MIM_RUNS": str(tmp_path / "runs")})
    assert code == 0, screen[-3000:]
    # rich draws the bar in place: its label, the bar, steps done of the epoch's 30, the running loss
    frames = [line for line in re.split(r"[\r\n]", ANSI.sub("", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)))
              if "━" in line]  # fmt: skip
    assert any("[warmup] epoch 1/1" in f and re.search(r"\b\d+/30\b", f) for f in frames), screen[-3000:]
    assert any("loss " in f for f in frames), screen[-3000:]
    assert re.search(r"\x1b\[\?25l", screen)  # the cursor is hidden while the bar draws ...
    assert re.search(r"\x1b\[\?25h", screen)  # ... and shown again once it is gone
    # the bar is transient: after its last frame comes the epoch's own line, once, with its metrics
    after = screen[screen.rindex("━") :]
    lines = re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", after))
    assert [line for line in lines if line.startswith("[warmup] epoch 1/1  loss ")], lines
    assert "━" not in screen[screen.index("[warmup] epoch 1/1  loss") :]
