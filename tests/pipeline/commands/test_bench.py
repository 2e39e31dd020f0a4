"""Smoke test of the benchmark on tiny settings: it runs, prints JSON last and keeps its figures.

No test here asserts a time: timings on shared machines are noise.
"""

import json

from tests.pipeline.cli_helpers import run_main


def test_bench_smoke_prints_json_last_and_writes_results(capsys, runs, tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("S4MIM_DATA", str(tiny_shapes.parent))
    out = tmp_path / "bench" / "results.json"
    args = ["bench", "--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--no-ray-epoch", "--out", str(out)]
    code, stdout, err = run_main(capsys, *args)
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    rows = report["rows"]
    assert {
        "supervised",
        "unimatch",
        "s4mim",
        "s4mim_cmim_only",
        "s4mim_fa_only",
        "s4mim_smim_only",
        "s4mim_decoder_head",
    } <= set(rows)
    assert all(row["median_s"] > 0 and row["img_per_s"] > 0 for row in rows.values())
    assert report["s4mim_over_unimatch"] > 0 and report["unimatch_over_supervised"] > 0
    assert report["s4mim_decoder_head_over_unimatch"] > 0
    from pipeline.commands.bench import PHASES

    phases = report["s4mim_phases_ms"]
    assert all(phases[p] > 0 for p in PHASES) and phases["step_wall"] > 0
    testbed = report["testbed"]
    assert set(testbed) == {
        "shapes48-1/8 supervised, 2 lanes of 1 thread",
        "shapes48-1/8 unimatch, 2 lanes of 1 thread",
    }
    assert all(row["effective_s"] == row["median_s"] / 2 > 0 for row in testbed.values())
    unimatch = testbed["shapes48-1/8 unimatch, 2 lanes of 1 thread"]  # against the blocks of the reference between
    assert report["testbed_unimatch_over_unimatch"] == unimatch["effective_s"] / unimatch["reference_s"] > 0
    assert report["peak_rss_gb"] > 0 and report["git_sha"] and report["machine"]["cpus"]
    assert json.loads(out.read_text())["cpu"] == report


def test_bench_rejects_a_missing_gpu_or_bad_device(capsys, runs):
    import torch

    code, _, err = run_main(capsys, "bench", "--device", "tpu")
    assert code == 2 and "choose cpu or cuda" in err
    if not torch.cuda.is_available():
        code, _, err = run_main(capsys, "bench", "--device", "cuda")
        assert code == 2 and "no CUDA device here" in err
