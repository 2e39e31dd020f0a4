"""A finished stage's checkpoint found again after its runs folder moved."""

from pipeline.orchestration.results import read_result, relocated, write_result


def test_a_checkpoint_under_a_moved_runs_folder_is_found_by_its_tail(tmp_path):
    folder = tmp_path / "new" / "runs" / "stages" / "shapes-1_8" / "train-abc"
    ray_checkpoint = tmp_path / "new" / "runs" / "ray" / "train-abc" / "checkpoint_000001"
    ray_checkpoint.mkdir(parents=True)
    folder.mkdir(parents=True)
    (folder / "best.pt").write_bytes(b"")
    old = "/old/place/runs"
    assert relocated(f"{old}/stages/shapes-1_8/train-abc/best.pt", folder) == str(folder / "best.pt")
    assert relocated(f"{old}/ray/train-abc/checkpoint_000001", folder) == str(ray_checkpoint)

    write_result(folder, {"checkpoint": f"{old}/stages/shapes-1_8/train-abc/best.pt", "best_miou": 1.0})
    assert read_result(folder) == {"checkpoint": str(folder / "best.pt"), "best_miou": 1.0}


def test_what_is_not_found_again_is_left_as_it_is(tmp_path):
    folder = tmp_path / "runs" / "stages" / "shapes-1_8" / "train-abc"
    folder.mkdir(parents=True)
    for named in ("/old/runs/stages/shapes-1_8/train-abc/best.pt", "s3://bucket/ray/checkpoint_000001", "best.pt"):
        assert relocated(named, folder) == named
    here = tmp_path / "elsewhere.pt"
    here.write_bytes(b"")
    assert relocated(str(here), folder) == str(here)  # a path that exists is never replaced
