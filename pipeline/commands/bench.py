"""``s4mim bench`` / ``make bench``: what an S4MIM training step costs.

    make bench                                  # CPU: shapes-1/8 model and batch, the shapes48 testbed's
                                                # steps, and the Ray Train epoch
    s4mim bench --device cuda                   # GPU: DeepLabV3+ ResNet-101, crop 321, batch 8; torch only

Each row is the median wall time of one training step after warm-up steps, on the same model
and batches. The s4mim row takes 2 classes per image on labeled and unlabeled images and CutMix
partners from a second batch, whatever the preset's defaults, so it measures the implementation
rather than a cheaper setting; cheaper settings are extra rows. The last line printed is one JSON
object; the figures also go to bench/results.json (one entry per device), with the git sha and
the machine. Nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_prep.atomic import write_text
from pipeline.config.presets import load_preset
from pipeline.config.schema import Config, apply_overrides
from pipeline.console import say
from pipeline.training.engine import Engine, build_model

MEASURED = {"mim.max_classes": 2, "mim.on": "both", "unimatch.cutmix_source": "batch"}
ROWS = {
    "supervised": ("supervised", {}),
    "unimatch": ("unimatch", {}),
    "s4mim": ("s4mim", {}),
    "s4mim_cmim_only": ("s4mim", {"fa.weight": 0, "smim.weight": 0}),
    "s4mim_fa_only": ("s4mim", {"mim.weight": 0, "smim.weight": 0}),
    "s4mim_smim_only": ("s4mim", {"mim.weight": 0, "fa.weight": 0}),
    # The design before the encoder head: reconstruction and feature aggregation on the stride-4 decoder
    # features, so the masked forward runs ASPP and decoder too. Same classes, images and batch.
    "s4mim_decoder_head": ("s4mim", {"mim.head": "decoder", "fa.feature": "decoder"}),
    # Cheaper settings, for reference.
    "s4mim_1_class": ("s4mim", {"mim.max_classes": 1}),
    "s4mim_roll": ("s4mim", {"unimatch.cutmix_source": "roll"}),
}
GPU_ROWS = ("unimatch", "s4mim", "s4mim_decoder_head")
TINY = {
    "data.crop": 32, "data.batch_size": 2, "model.aspp_channels": 16, "model.decoder_channels": 16,
    "model.low_level_channels": 8, "mim.patch": 8, "mim.min_pixels": 4,
}  # fmt: skip


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def random_batches(n: int, batch: int, crop: int, classes: int, device: torch.device, seed: int = 0) -> list:
    """Synthetic batches with blocky labels: for timing where no dataset is at hand (GPU machines)."""
    gen = torch.Generator().manual_seed(seed)
    cell = max(8, crop // 8)

    def labels():
        grid = torch.randint(0, classes, (batch, -(-crop // cell), -(-crop // cell)), generator=gen)
        return grid.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :crop, :crop]

    def unlabeled():
        return {
            "weak": torch.randn(batch, 3, crop, crop, generator=gen),
            "strong1": torch.randn(batch, 3, crop, crop, generator=gen),
            "strong2": torch.randn(batch, 3, crop, crop, generator=gen),
            "padding": torch.zeros(batch, crop, crop, dtype=torch.bool),
            "box1": torch.rand(batch, crop, crop, generator=gen) > 0.6,
            "box2": torch.rand(batch, crop, crop, generator=gen) > 0.6,
        }

    out = []
    for _ in range(n):
        labeled = {"image": torch.randn(batch, 3, crop, crop, generator=gen), "label": labels(),
                   "padding": torch.zeros(batch, crop, crop, dtype=torch.bool)}  # fmt: skip
        out.append(tuple({k: v.to(device) for k, v in part.items()} for part in (labeled, unlabeled(), unlabeled())))
    return out


def dataset_batches(config: Config, runs: Path, n: int) -> tuple[list, int]:
    """Real batches of the preset's dataset (prepared on demand), and its class count."""
    from data_prep.manifest import Manifest
    from data_prep.splits import read_split
    from pipeline.training.prepare import prepare_stage
    from pipeline.training.stages import build_data

    prepared = prepare_stage(config, runs)
    manifest = Manifest.read(prepared.manifest)
    data = build_data(config, manifest, read_split(prepared.split_dir), "s4mim", 0, 1)
    data.set_epoch(0)
    batches = []
    for item in data.batches():
        batches.append(item)
        if len(batches) == n:
            break
    return batches, manifest.num_classes


def seeded_engine(config: Config, variant: str, classes: int, device) -> Engine:
    """A fresh engine of ``variant`` whose model starts from seed 0, as every timed row's does."""
    torch.manual_seed(0)
    model = build_model(config, classes, reconstruction="cmim" in config.terms(variant))
    return Engine(model, config, classes, device, variant=variant, total_steps=10_000)


def train_step(engine: Engine, variant: str, batch: tuple) -> None:
    """One timed step on a (labeled, unlabeled, partner) batch; the supervised row reads the labeled part."""
    labeled, unlabeled, partner = batch
    if variant == "supervised":
        engine.train_step(labeled)
    else:
        engine.train_step(labeled, unlabeled, partner)


def time_row(config: Config, variant: str, batches: list, classes: int, device, steps: int, warmup: int,
             compile_model: bool = False) -> dict:  # fmt: skip
    engine = seeded_engine(config, variant, classes, device)
    if compile_model:
        engine.net = torch.compile(engine.model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        started = time.perf_counter()
        train_step(engine, variant, batches[i % len(batches)])
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    images = batches[0][0]["image"].shape[0] * (1 if variant == "supervised" else 2)
    row = {"median_s": median, "img_per_s": images / median, "steps": steps}
    if device.type == "cuda":
        row["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


PHASES = ("partner_forward", "weak_forward", "strong_forward", "masked_inputs", "masked_forward", "backward",
          "optimizer")  # fmt: skip


def profile_phases(config: Config, batches: list, classes: int, device, steps: int = 6) -> dict[str, float]:
    """Where an s4mim step's time goes: milliseconds per step in each labelled phase (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(config, classes, reconstruction=True)
    engine = Engine(model, config, classes, device, variant="s4mim", total_steps=10_000)
    for batch in batches[:2]:
        engine.train_step(*batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            engine.train_step(*batches[i % len(batches)])
    wall = (time.perf_counter() - started) / steps
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    out = {phase: totals.get(f"s4mim.{phase}", 0.0) / 1000 / steps for phase in PHASES}
    out["step_wall"] = wall * 1000
    out["other"] = out["step_wall"] - sum(out[p] for p in PHASES)
    return out


def time_rows_interleaved(rows: dict[str, tuple[Config, str]], batches: list, classes: int, device, steps: int,
                          warmup: int) -> dict:  # fmt: skip
    """Median step time of several rows measured in rounds, one step of each row per round.

    On a shared machine the speed drifts over minutes; interleaving lets every row see the same
    drift, so their ratios hold even when absolute times wander.
    """
    engines = {
        name: (seeded_engine(config, variant, classes, device), variant) for name, (config, variant) in rows.items()
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for round_ in range(warmup + steps):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]  # no row always goes first
        for name in order:
            engine, variant = engines[name]
            started = time.perf_counter()
            train_step(engine, variant, batches[round_ % len(batches)])
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    images = batches[0][0]["image"].shape[0]
    out = {}
    for name, (_, variant) in rows.items():
        median = statistics.median(times[name])
        out[name] = {"median_s": median, "img_per_s": images * (1 if variant == "supervised" else 2) / median,
                     "steps": steps}  # fmt: skip
    return out


TESTBED = "shapes48-1/8"


_LANE: dict = {}  # a lane process's engine and batches (_start_lane)


def _start_lane(config: Config, variant: str, runs: Path, barrier) -> None:
    """A side-by-side lane: one thread, its own engine on the preset's real batches."""
    torch.set_num_threads(1)
    batches, classes = dataset_batches(config, runs, 4)
    engine = seeded_engine(config, variant, classes, torch.device("cpu"))
    _LANE.update(engine=engine, batches=batches, variant=variant, done=0, barrier=barrier)


def _lane_block(steps: int) -> list[float]:
    """Time ``steps`` steps in this lane, starting when every lane is ready (so that no lane runs two blocks)."""
    _LANE["barrier"].wait()
    return _timed_steps(_LANE, steps)


def _timed_steps(state: dict, steps: int) -> list[float]:
    engine, batches, times = state["engine"], state["batches"], []
    for _ in range(steps):
        batch = batches[state["done"] % len(batches)]
        state["done"] += 1
        started = time.perf_counter()
        train_step(engine, state["variant"], batch)
        times.append(time.perf_counter() - started)
    return times


def testbed_rows(runs: Path, steps: int, warmup: int, reference: tuple, lanes: int = 2, blocks: int = 4,
                 overrides: dict | None = None) -> dict:  # fmt: skip
    """The cheap testbed's steps as its runs train: one thread each, ``lanes`` processes side by side.

    The lanes step at the same moment, so their median holds the slowdown they cause each other;
    ``effective_s`` is the machine's time per step, the lanes' median divided by their number. The lanes
    cannot share the interleaved rounds of the other rows, and a shared machine's speed moves by a
    quarter within minutes, so ``blocks`` blocks of lane steps alternate with blocks of the ``reference``
    row's steps in this process ((config, variant, batches, classes), at this process's threads), and
    ``reference_s`` is that row's median over the same minutes.
    """
    import multiprocessing

    config, variant, batches, classes = reference
    ref = {"engine": seeded_engine(config, variant, classes, torch.device("cpu")), "batches": batches,
           "variant": variant, "done": 0}  # fmt: skip
    per_block = max(1, steps // blocks)
    out = {}
    context = multiprocessing.get_context("spawn")
    for lane_variant in ("supervised", "unimatch"):
        # loader_workers 0: a pool's processes may not start their own, and the timed steps read batches in memory
        extra = {**MEASURED, **(overrides or {}), "variant": lane_variant, "data.loader_workers": 0}
        lane_config = apply_overrides(load_preset(TESTBED), extra)
        dataset_batches(lane_config, runs, 1)  # prepare the data once, before the lanes read it
        barrier = context.Barrier(lanes)
        with context.Pool(lanes, initializer=_start_lane, initargs=(lane_config, lane_variant, runs, barrier)) as pool:
            pool.map(_lane_block, [warmup] * lanes, chunksize=1)
            _timed_steps(ref, warmup)
            lane_times, ref_times = [], []
            for _ in range(blocks):
                ref_times += _timed_steps(ref, per_block)
                for times in pool.map(_lane_block, [per_block] * lanes, chunksize=1):
                    lane_times += times
        lane = statistics.median(lane_times)
        images = lane_config.data.batch_size * (1 if lane_variant == "supervised" else 2)
        out[f"{TESTBED} {lane_variant}, {lanes} lanes of 1 thread"] = {
            "median_s": lane, "effective_s": lane / lanes, "img_per_s": images * lanes / lane,
            "steps": blocks * per_block, "reference_s": statistics.median(ref_times),
        }  # fmt: skip
    return out


def ray_epoch_ratio(config: Config, runs: Path, steps: int, repeats: int = 2) -> dict:
    """One train epoch as a 1-worker TorchTrainer against the same epoch in this process.

    Both time the epoch from its first step to its report (checkpoint included), on the same data
    and seed; Ray's start and the worker's set-up are outside the measured span.
    """
    import ray

    from pipeline.backends.local import LocalContext
    from pipeline.backends.ray_train import connect, run_job
    from pipeline.training.prepare import prepare_stage
    from pipeline.training.stages import StageInputs, fit

    config = apply_overrides(config, {"train.epochs": 1, "train.steps_per_epoch": steps, "scaling.workers": 1})
    prepared = prepare_stage(config, runs)
    connect(None)
    plain, remote = [], []  # alternated, so that drift hits both alike
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            ctx = LocalContext("train", Path(tmp) / f"plain{i}", 0, 1, torch.device("cpu"), 1)
            plain += fit(config, "train", StageInputs(prepared.manifest, prepared.split_dir), ctx)["epoch_seconds"]
            result = run_job(config, "train", prepared, storage=str(Path(tmp) / "ray"), name=f"bench-{i}",
                             init_checkpoint=None)  # fmt: skip
            remote += result.return_value["epoch_seconds"]
    ray.shutdown()
    return {"plain_epoch_s": statistics.median(plain), "ray_epoch_s": statistics.median(remote),
            "ray_epoch_ratio": statistics.median(remote) / statistics.median(plain), "epoch_steps": steps}  # fmt: skip


def run_bench(device: str, steps: int, warmup: int, out: Path, *, compile_model: bool = False, with_ray: bool = True,
              tiny: bool = False, runs: Path | None = None) -> dict:  # fmt: skip
    from pipeline.paths import runs_dir
    from pipeline.tracking.runs import git_sha

    runs = runs or runs_dir()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import UsageError

        raise UsageError("--device cuda: no CUDA device here; run with --device cpu")
    report: dict = {"device": device, "git_sha": git_sha(), "machine": machine(), "steps": steps, "warmup": warmup}
    if dev.type == "cuda":
        config = load_preset("voc-1/8", ["model.init=none", "data.batch_size=8", "data.crop=321"])
        batches = random_batches(4, 8, 321, 21, dev)
        classes = 21
        report |= {"model": "DeepLabV3+ resnet101", "crop": 321, "batch": 8}
        modes = {"fp32_eager": {}, "bf16_channels_last": {"optim.amp": "bf16", "optim.channels_last": True}}
        rows = {}
        for mode, extra in modes.items():
            for name in GPU_ROWS:
                variant, overrides = ROWS[name]
                cfg = apply_overrides(config, {**MEASURED, **overrides, **extra})
                say(f"  {mode} {name} ...")
                rows[f"{name}/{mode}"] = time_row(cfg, variant, batches, classes, dev, steps, warmup)
                torch.cuda.empty_cache()
            if compile_model:
                for name in GPU_ROWS:
                    variant, overrides = ROWS[name]
                    cfg = apply_overrides(config, {**MEASURED, **overrides, **modes["bf16_channels_last"]})
                    rows[f"{name}/bf16_channels_last_compiled"] = time_row(
                        cfg, variant, batches, classes, dev, steps, warmup, compile_model=True
                    )
        report["rows"] = rows
        report["bf16_cl_over_fp32"] = {
            name: rows[f"{name}/bf16_channels_last"]["img_per_s"] / rows[f"{name}/fp32_eager"]["img_per_s"]
            for name in GPU_ROWS
        }
    else:
        config = load_preset("shapes-1/8", [f"{k}={json.dumps(v)}" for k, v in TINY.items()] if tiny else [])
        report |= {"preset": "shapes-1/8", "model": f"DeepLabV3+ {config.model.backbone}", "crop": config.data.crop,
                   "batch": config.data.batch_size, "threads": torch.get_num_threads()}  # fmt: skip
        batches, classes = dataset_batches(config, runs, 4)
        say(f"  {len(ROWS)} rows, {steps} measured rounds after {warmup}, interleaved ...")
        specs = {
            name: (apply_overrides(config, {**MEASURED, **overrides, "variant": variant}), variant)
            for name, (variant, overrides) in ROWS.items()
        }
        rows = time_rows_interleaved(specs, batches, classes, dev, steps, warmup)
        report["rows"] = rows
        report["s4mim_over_unimatch"] = rows["s4mim"]["median_s"] / rows["unimatch"]["median_s"]
        report["s4mim_decoder_head_over_unimatch"] = (
            rows["s4mim_decoder_head"]["median_s"] / rows["unimatch"]["median_s"]
        )
        report["unimatch_over_supervised"] = rows["unimatch"]["median_s"] / rows["supervised"]["median_s"]
        say(f"  {TESTBED}: supervised and unimatch steps, 2 runs side by side at 1 thread, in blocks that "
            "alternate with blocks of the shapes-1/8 unimatch step ...")  # fmt: skip
        reference = (*specs["unimatch"], batches, classes)
        report["testbed"] = testbed_rows(runs, steps, warmup, reference, overrides=TINY if tiny else None)
        testbed = report["testbed"][f"{TESTBED} unimatch, 2 lanes of 1 thread"]
        report["testbed_unimatch_over_unimatch"] = testbed["effective_s"] / testbed["reference_s"]
        say("  profile of the s4mim step ...")
        report["s4mim_phases_ms"] = profile_phases(apply_overrides(config, MEASURED), batches, classes, dev)
        if with_ray:
            say("  Ray Train epoch against the plain engine epoch ...")
            report |= ray_epoch_ratio(config, runs, steps=2 if tiny else 45, repeats=1 if tiny else 3)
    report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    _store(out, device, report)
    return report


def _store(out: Path, device: str, report: dict) -> None:
    """bench/results.json keeps the latest report per device kind (cpu, cuda)."""
    out = Path(out)
    existing = {}
    if out.is_file():
        try:
            existing = json.loads(out.read_text())
        except json.JSONDecodeError:
            existing = {}
    existing[torch.device(device).type] = report
    write_text(out, json.dumps(existing, indent=2) + "\n")


def print_report(report: dict) -> None:
    say(f"{'row':<40} {'median ms':>10} {'img/s':>8}")
    for name, row in report["rows"].items():
        say(f"{name:<40} {row['median_s'] * 1000:>10.1f} {row['img_per_s']:>8.1f}")
    for name, row in report.get("testbed", {}).items():
        machine_ms = row["effective_s"] * 1000
        say(
            f"{name:<40} {row['median_s'] * 1000:>10.1f} {row['img_per_s']:>8.1f}  ({machine_ms:.1f} ms of the machine)"
        )
    for name, row in report.get("testbed", {}).items():
        say(f"{name}: the shapes-1/8 unimatch step in the blocks between: {row['reference_s'] * 1000:.1f} ms")
    if "s4mim_phases_ms" in report:
        say("s4mim step, ms per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in report["s4mim_phases_ms"].items()))
    ratios = ("s4mim_over_unimatch", "s4mim_decoder_head_over_unimatch", "unimatch_over_supervised",
              "testbed_unimatch_over_unimatch", "ray_epoch_ratio")  # fmt: skip
    for key in (*ratios, "peak_rss_gb"):
        if key in report:
            say(f"{key}: {report[key]:.3f}")
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
