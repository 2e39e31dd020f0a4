"""After Ctrl-C, Tune's in-memory trials all read terminated; ``ended_trials`` reads the saved state.

A real Tune run with a trivial trainable in a subprocess, interrupted while its second trial runs.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import ray
    from ray import tune

    flags = Path(sys.argv[2])

    def trainable(config):
        (flags / f"{config['sleep']}.started").touch()
        for epoch in range(1, 4):
            time.sleep(config["sleep"])
            tune.report({"epoch": epoch})
        (flags / f"{config['sleep']}.done").touch()

    ray.init(num_cpus=1, include_dashboard=False)
    tuner = tune.Tuner(
        trainable,
        param_space={"sleep": tune.grid_search([0.2, 3.0])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="chk", storage_path=sys.argv[1], verbose=0),
    )
    grid = tuner.fit()
    from sweeps.runner import _rows, ended_trials
    from sweeps.spec import SweepSpec

    spec = SweepSpec.model_validate({
        "name": "chk", "preset": "shapes-1/8", "metric": "val/miou", "num_samples": 1,
        "space": {"mim.ratio": {"grid": [0.2, 3.0]}},
    })

    print(json.dumps({
        "in_memory_terminated": grid.num_terminated,
        "trials": len(grid),
        "first": [r.metrics["trial_id"] for r in grid if (r.config or {}).get("sleep") == 0.2],
        "rows": [[row.trial_id, row.status] for row in _rows(grid, spec, 3, ended_trials(f"{sys.argv[1]}/chk"))],
        "ended": sorted(ended_trials(f"{sys.argv[1]}/chk")),
    }))
    """
)


def test_interrupted_trial_is_not_counted_as_ended(tmp_path):
    script, flags = tmp_path / "tune_run.py", tmp_path / "flags"
    script.write_text(SCRIPT)
    flags.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "store"), str(flags)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (flags / "3.0.started").exists():  # the first trial ended; the second runs its first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        assert (flags / "0.2.done").exists()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out[-2000:] + err[-3000:]
    report = json.loads(lines[-1])
    assert report["trials"] == 2, err[-3000:]
    assert report["ended"] == report["first"] and len(report["first"]) == 1
    (first, first_status), (second, second_status) = report["rows"]
    assert [first, first_status] == [report["first"][0], "completed"]
    assert second_status == "unfinished" and second.endswith("_00001")  # an id, not a folder name
    assert report["in_memory_terminated"] == 2  # why the saved state is read instead
