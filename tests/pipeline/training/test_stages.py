"""A stage resumes from its last checkpoint exactly; the pipeline caches finished stages."""

import json

import torch

from pipeline.backends.local import LocalContext
from pipeline.training.distributed import init_distributed
from pipeline.training.prepare import prepare_stage
from pipeline.training.stages import StageInputs, fit
from tests.pipeline.cli_helpers import run_main


class Crash(RuntimeError):
    pass


class CrashAfterFirstEpoch(LocalContext):
    def report(self, metrics, state, *, epoch, best):
        super().report(metrics, state, epoch=epoch, best=best)
        if epoch == 0:
            raise Crash("killed after epoch 1")


def _fit(config, folder, prepared, context=LocalContext, stage="train", init=None):
    rank, world, device = init_distributed()
    schedule = config.warmup if stage == "warmup" else config.train
    ctx = context(stage, folder, rank, world, device, schedule.epochs)
    return fit(config, stage, StageInputs(prepared.manifest, prepared.split_dir, init), ctx)


def test_interrupted_stage_resumes_to_the_same_weights(tiny_config, runs, tmp_path):
    config = tiny_config("train.epochs=2", "train.steps_per_epoch=2", "unimatch.threshold=0.5")
    prepared = prepare_stage(config, runs)
    _fit(config, tmp_path / "warm", prepared, stage="warmup")
    teacher = tmp_path / "warm" / "last.pt"

    straight = _fit(config, tmp_path / "a", prepared, init=teacher)
    try:
        _fit(config, tmp_path / "b", prepared, CrashAfterFirstEpoch, init=teacher)
        raise AssertionError("the crash did not happen")
    except Crash:
        pass
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["epoch"] == 0
    resumed = _fit(config, tmp_path / "b", prepared, init=teacher)

    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["engine"]["step"] == b["engine"]["step"] == 2 * straight["steps_per_epoch"]
    for name, tensor in a["engine"]["model"].items():
        assert torch.equal(tensor, b["engine"]["model"][name]), name
    assert resumed["metrics"]["val/miou"] == straight["metrics"]["val/miou"]
    assert resumed["curve"] == straight["curve"] and len(straight["curve"]) == 2  # the resumed run keeps epoch 1's
    assert resumed["history"] == straight["history"] and [h["epoch"] for h in straight["history"]] == [1, 2]
    # Each epoch's diagnostics: the pseudo labels' and each term's gradient norm on the encoder (measured
    # once an epoch here: grad_norm_every is 1 in the tiny config, or the last step's window otherwise).
    first = straight["history"][0]
    assert {"train/mask_ratio", "train/pseudo_acc", "train/grad_norm/x", "train/grad_norm/s1"} <= set(first)
    assert 0 <= first["train/mask_ratio"] <= 1 and first["train/grad_norm/x"] > 0


def test_pipeline_run_then_cached_then_forced(capsys, tiny_config, runs, tiny_shapes):
    from tests.conftest import tiny_args

    args = ["pipeline", "run", "shapes-1/8", "--local", *tiny_args(tiny_shapes)]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    summary = out[out.index("summary for") :]
    for stage in ("prepare", "warmup", "train", "evaluate"):
        assert f"\n{stage:<10} ran" in summary
    evaluate_dir = next((runs / "stages" / "shapes-1_8").glob("evaluate-*"))
    assert (evaluate_dir / "iou.csv").read_text().startswith("class,iou,pixels")
    assert (evaluate_dir / "grid.png").read_bytes()[:4] == b"\x89PNG"

    code, out, _ = run_main(capsys, *args)
    summary = out[out.index("summary for") :]
    assert code == 0 and "[train] running" not in out
    for stage in ("prepare", "warmup", "train", "evaluate"):
        assert f"\n{stage:<10} cached" in summary

    code, out, _ = run_main(capsys, *args, "--dry-run")
    assert code == 0 and out.count(" cached ") == 4

    code, out, _ = run_main(capsys, *args, "--force", "train")
    summary = out[out.index("summary for") :]
    assert "\nwarmup     cached" in summary and "\ntrain      ran" in summary and "\nevaluate   ran" in summary

    # a preset derived from this one (as a sweep writes) that changes only the train stage
    # reuses the finished warmup instead of training the same teacher again
    derived = runs / "derived.json"
    derived.write_text(json.dumps({"base": "shapes-1/8", "preset": "derived", "set": {"mim.ratio": 0.6}}))
    code, out, err = run_main(capsys, *[str(derived) if a == "shapes-1/8" else a for a in args])
    summary = out[out.index("summary for") :]
    assert code == 0, err
    assert "\nwarmup     cached" in summary and "shapes-1_8/warmup-" in summary and "\ntrain      ran" in summary
    assert "derived/train-" in summary


def test_epoch_matched_supervised_covers_the_labeled_set_as_often_as_unimatch_the_unlabeled(
    tiny_config, runs, tmp_path
):
    from data_prep.splits import read_split
    from pipeline.training.stages import epoch_matched_steps

    config = tiny_config("train.epochs=2", "train.steps_per_epoch=6", "variant=supervised", "train.match=epochs")
    prepared = prepare_stage(config, runs)
    split = read_split(prepared.split_dir)
    labeled_pass, unlabeled_pass = len(split.labeled) // 4, len(split.unlabeled) // 4  # batch 4
    assert labeled_pass < unlabeled_pass
    expected = round(6 * labeled_pass / unlabeled_pass)
    assert epoch_matched_steps(6, split, 4) == expected
    result = _fit(config, tmp_path / "sup", prepared)
    assert result["steps_per_epoch"] == expected
    # The curve: val mIoU after each epoch, at the step it came after.
    assert [(p["epoch"], p["step"]) for p in result["curve"]] == [(1, expected), (2, 2 * expected)]
    assert result["curve"][-1]["val/miou"] == result["metrics"]["val/miou"]
    step_matched = _fit(tiny_config("train.epochs=1", "train.steps_per_epoch=6", "variant=supervised"),
                        tmp_path / "steps", prepared)  # fmt: skip
    assert step_matched["steps_per_epoch"] == 6
