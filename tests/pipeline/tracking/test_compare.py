"""runs compare / runs plot on a real MLflow store holding runs of two splits, and the UI server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from torchvision.io import decode_png, read_file

from pipeline.config.presets import load_preset
from pipeline.tracking.runs import PipelineTracking
from pipeline.training.prepare import Prepared
from tests.pipeline.cli_helpers import one_line_error, run_main, run_s4mim


def _prepared(labeled: int, unlabeled: int) -> Prepared:
    return Prepared(None, None, "c0ffee", f"s{labeled}", labeled, unlabeled, 256, True)


@pytest.fixture(scope="module")
def logged_store(tmp_path_factory) -> Path:
    """Pipeline runs of shapes-1/8 and shapes-1/4 (s4mim and unimatch), logged as the pipeline logs them,
    once per module: each test gets a copy (``store``), which it may change."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    for preset, labeled, variant, miou in (
        ("shapes-1/8", 128, "s4mim", 61.0),
        ("shapes-1/8", 128, "unimatch", 58.5),
        ("shapes-1/4", 256, "s4mim", 66.0),
        ("shapes-1/4", 256, "unimatch", 64.0),
    ):
        config = load_preset(preset, [f"variant={variant}"])
        tracking = PipelineTracking(f"sqlite:///{db}", config, _prepared(labeled, 1024 - labeled))
        tracking.tracker.log_metrics(tracking.parent_id, {"val/miou": miou}, 0)
        tracking.finish(tracking.parent_id)
    return db


@pytest.fixture
def store(runs, logged_store):
    """A copy of ``logged_store`` as the runs folder's tracking store; its URI."""
    runs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(logged_store, runs / "mlflow.db")
    return f"sqlite:///{runs / 'mlflow.db'}"


def test_compare_groups_by_split_and_shows_differing_params(capsys, store):
    code, out, err = run_main(capsys, "runs", "compare")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["split", "variant", "val/miou"]
    assert "variant" in lines[0] and "data.crop" not in lines[0]  # only parameters that differ
    assert "preset" not in lines[0].split()  # the split column says it
    body = [line for line in lines[1:] if line.strip()]
    assert [line.split()[0] for line in body] == ["shapes-1/8", "shapes-1/8", "shapes-1/4", "shapes-1/4"]
    assert "" in lines  # a blank line between split groups

    code, out, _ = run_main(capsys, "runs", "compare", "--format", "json", "--tag", "split=shapes-1/4")
    rows = json.loads(out)
    assert code == 0 and {r["variant"]: r["val/miou"] for r in rows} == {"s4mim": 66.0, "unimatch": 64.0}

    code, out, _ = run_main(capsys, "runs", "compare", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("split,variant,val/miou,model,run")


def test_every_config_key_but_paths_is_a_param(runs):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{runs / 'mlflow.db'}"
    config = load_preset("shapes-1/8", ["train.lr=0.02", "mim.head=decoder", "data.labeled_ids=ids.txt"])
    tracking = PipelineTracking(uri, config, _prepared(128, 896))
    params = MlflowClient(uri).get_run(tracking.parent_id).data.params
    assert params["train.lr"] == "0.02" and params["mim.head"] == "decoder" and params["smim.count"] == "add"
    assert params["model.dilations"] == "[2, 4, 6]"
    assert not {"data.root", "data.labeled_ids", "tracking.uri"} & params.keys()


def test_a_reused_parent_run_gets_the_params_it_lacks(runs):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import Tracker

    uri = f"sqlite:///{runs / 'mlflow.db'}"
    config = load_preset("shapes-1/8", ["train.lr=0.02"])
    tracker = Tracker(uri)
    older = tracker.create(tracker.experiment(config.tracking.experiment), "k", "from an older s4mim", {})
    tracker.log_params(older, {"variant": "s4mim"})  # an older s4mim logged a handful of keys
    tracking = PipelineTracking(uri, config, _prepared(128, 896), key="k")
    params = MlflowClient(uri).get_run(older).data.params
    assert tracking.parent_id == older and params["train.lr"] == "0.02" and params["variant"] == "s4mim"


def test_a_key_that_older_runs_lack_is_not_a_difference():
    from pipeline.tracking.compare import RunRow, differing_params

    def row(**params):
        return RunRow("id", "run", "shapes-1/8", "s4mim", "pipeline", 50.0, 0.125, params, {})

    older = row(**{"mim.ratio": "0.5", "data.split": "1/8"})
    newer = row(**{"mim.ratio": "0.6", "data.split": "1/4", "mim.head": "encoder", "preset": "shapes-1/4"})
    assert differing_params([older, newer]) == ["mim.ratio"]


def test_compare_errors(capsys, store):
    code, _, err = run_main(capsys, "runs", "compare", "--experiment", "nope")
    assert code == 2 and "no MLflow experiment 'nope'" in err and "s4mim" in err
    code, _, err = run_main(capsys, "runs", "compare", "--format", "xml")
    assert code == 2 and "choose table, csv or json" in err


def test_tag_values_with_quotes_are_searched_as_they_are(capsys, store):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    (experiment,) = [e.experiment_id for e in client.search_experiments() if e.name == "s4mim"]
    first, second = client.search_runs([experiment], "tags.split = 'shapes-1/4'")
    client.set_tag(first.info.run_id, "note", "it's the baseline")
    client.set_tag(second.info.run_id, "note", 'the "best" one')
    for value, run in (("it's the baseline", first), ('the "best" one', second)):
        code, out, err = run_main(capsys, "runs", "compare", "--format", "json", "--tag", f"note={value}")
        assert code == 0, err[-2000:]
        assert [row["run_id"] for row in json.loads(out)] == [run.info.run_id]
    code, _, err = run_main(capsys, "runs", "compare", "--tag", """note=it's "both\"""")
    assert code == 2
    assert "cannot search a value holding both ' and \"" in one_line_error(err)
    # An apostrophe once reached MLflow's filter parser unquoted: what the user's shell shows is one line.
    done = run_s4mim("runs", "compare", "--tag", "split=it's")
    assert done.returncode == 2
    assert "no pipeline runs match" in one_line_error(done.stderr)


@pytest.mark.parametrize(
    "args, expected",
    [(["compare", "--tag", "stage=train"], "--tag stage=train and --stage both choose the stage; use --stage train"),
     (["compare", "--stage", "train", "--tag", "stage=train"], "use --stage train alone"),
     (["plot", "--tag", "stage=evaluate"], "runs plot reads the pipeline runs")],
)  # fmt: skip
def test_a_stage_tag_is_refused_where_the_command_chooses_the_stage(capsys, store, args, expected):
    code, _, err = run_main(capsys, "runs", *args)
    assert code == 2
    assert expected in one_line_error(err)


def test_plot_writes_a_png_that_decodes(capsys, store, tmp_path):
    out = tmp_path / "plots" / "miou.png"
    code, text, err = run_main(capsys, "runs", "plot", "--out", str(out))
    assert code == 0, err
    image = decode_png(read_file(str(out)))
    assert image.shape[0] in (3, 4) and image.shape[1] > 100 and image.shape[2] > 100
    assert image.float().std() > 0  # not a blank canvas


def test_ui_server_shows_both_splits_over_rest(store, runs):
    from pipeline.tracking.ui import free_port, server_command, server_env, stop_server

    port = free_port()
    server = subprocess.Popen(server_command(store, port), env=server_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=s4mim", method="GET"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            found = json.load(response)["runs"]
        splits = {tag["value"] for run in found for tag in run["data"]["tags"] if tag["key"] == "split"}
        assert splits == {"shapes-1/8", "shapes-1/4"}
    finally:
        stop_server(server)  # the whole group, killed if it does not stop: no server outlives the test
    assert server.returncode is not None
