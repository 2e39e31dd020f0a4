"""Bad addresses and paths fail before training, with exit code 2 and the fix; nothing hangs."""

import socket

from tests.pipeline.cli_helpers import one_line_error as _error
from tests.pipeline.cli_helpers import run_main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address(capsys, runs):
    port = _closed_port()
    code, _, err = run_main(capsys, "pipeline", "run", "shapes-1/8", "--ray-address", f"127.0.0.1:{port}")
    assert code == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in _error(err) and "ray start --head" in err


def test_unreachable_tracking_uri(capsys, runs):
    port = _closed_port()
    code, _, err = run_main(capsys, "warmup", "shapes-1/8", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert code == 2
    assert f"http://127.0.0.1:{port} does not answer" in _error(err)


def test_storage_path_that_cannot_be_written(capsys, runs, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("S4MIM_STORAGE", str(blocker / "ray"))
    code, _, err = run_main(capsys, "train", "shapes-1/8")
    assert code == 2
    assert f"storage path {blocker / 'ray'} is not writable" in _error(err)


def test_imagenet_init_offline_fails_before_training(capsys, runs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no cached weights

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    code, _, err = run_main(
        capsys, "train", "shapes-1/8", "--set", "model.init=imagenet", "--set", "model.backbone=resnet18"
    )
    assert code == 2
    line = _error(err)
    assert "cannot load ImageNet weights for resnet18" in line and "--set model.init=none" in line


def test_a_missing_dataset_is_named_before_any_weights_are_fetched(capsys, runs, tmp_path, monkeypatch):
    """The cheap checks come first: a mistyped --data-root costs no download of the backbone's weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no cached weights
    fetched = []
    monkeypatch.setattr("torch.hub.download_url_to_file", lambda *args, **kwargs: fetched.append(args))
    missing = tmp_path / "VOCdevkit"
    code, _, err = run_main(capsys, "pipeline", "run", "voc-1/8", "--data-root", str(missing))
    assert code == 2
    assert f"dataset root {missing} does not exist" in _error(err)
    assert not fetched


def test_doctor_reports_each_check(capsys, runs, tiny_shapes, monkeypatch):
    monkeypatch.setenv("S4MIM_DATA", str(tiny_shapes.parent))
    code, out, _ = run_main(capsys, "doctor")
    assert code == 0, out
    assert "torch" in out and f"ok    storage {runs / 'ray'}: writable" in out
    assert "MLflow sqlite:///" in out and "answers" in out
    assert "ok    dataset shapes" in out and "40 train, 12 val images, 9 classes" in out
    port = _closed_port()
    code, out, _ = run_main(capsys, "doctor", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert code == 1 and f"FAIL  MLflow http://127.0.0.1:{port}" in out
