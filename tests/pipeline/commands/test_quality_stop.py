"""``kill`` (SIGTERM to the command alone) stops ``s4mim quality --jobs 2`` and the runs it started."""

import os
import signal
import subprocess
from pathlib import Path

from tests.pipeline.cli_helpers import S4MIM
from tests.pipeline.commands.test_quality import TINY_WITHOUT_BUDGET

HINT = "interrupted; run the same command again to resume"


def _session(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def test_sigterm_stops_quality_and_its_runs_which_resume(runs, tiny_shapes, tmp_path):
    sets = [arg for o in [*TINY_WITHOUT_BUDGET, f'data.root="{tiny_shapes}"', "warmup.epochs=40"]
            for arg in ("--set", o)]  # fmt: skip
    args = ["quality", "--local", "--jobs", "2", "--seeds", "0", "--epochs", "1", "--steps", "2", "--baselines",
            "--docs", str(tmp_path / "docs"), *sets]  # fmt: skip
    quality = subprocess.Popen(
        [str(S4MIM), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "S4MIM_RUNS": str(runs)},
        start_new_session=True,
        # Started from a script in the background: SIGINT ignored, so only SIGTERM can stop it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        for line in quality.stdout:
            if ": warmup epoch 1/40" in line:  # the warmup's own process trains
                quality.send_signal(signal.SIGTERM)  # to the command alone, as `kill PID` sends it
                break
        _, err = quality.communicate(timeout=300)
    finally:
        left = _session(quality.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert quality.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == HINT
    assert not left, f"processes left running after quality ended: {left}"
    (log,) = (runs / "quality" / "logs").glob("warmup-*.log")
    assert log.read_text().strip().splitlines()[-1] == HINT  # the run stopped cleanly, not killed
    assert (next((runs / "stages" / "shapes48-1_32").glob("warmup-*")) / "last.pt").is_file()  # to resume from
