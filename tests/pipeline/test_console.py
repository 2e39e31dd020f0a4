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
