"""``s4mim quality`` / ``make quality``: the S4MIM ablation on ``shapes``.

    make quality                         # 7 variants x 3 seeds on the testbed at 1/32 labels; resumable
    s4mim quality --seeds 0 --epochs 2   # a shorter look
    s4mim quality --synth-seed 3         # on held-out data: shapes generated with seed 3
    s4mim quality --synth-seed 3 --synth-seed 4   # both held-out datasets, pooled in one table
    s4mim quality --baselines --split 1/16   # the baselines alone at 1/16 labels
    s4mim quality --trial smim.view=weak --variant s4mim   # a knob trial: its rows (and unimatch) only
    s4mim quality --regime short         # the short regime (shapes-* presets) of the first tables

Two regimes: ``testbed`` (the default), the ``shapes48-*`` presets trained to convergence, 20,000
steps a run, at 1/32 labels unless ``--split`` says otherwise, the cell the screening chose
(docs/shapes.md); and ``short``, the ``shapes-*`` presets at 1/8 labels, a few hundred steps a run,
kept so that the tables made with it can be made again.

Generator seed 0 is the development data on which every setting is chosen; other seeds generate
held-out datasets of the same design, for confirming those choices. Each writes its own table:
``results-testbed-1_32.md`` for seed 0, ``results-testbed-1_32-synth<N>.md`` for the others
(``results-short.md`` and ``results-short-synth<N>.md`` in the short regime; docs/results.md is the
written report that draws on them). Several held-out generator seeds
given at once pool into one table (``-synth3_4``) whose columns are the (generator seed, training
seed) pairs: the means, the paired differences and the pairs won count every pair once.

Every variant trains the same number of steps from the same warmup teacher of its seed (one fixed
budget); only the loss terms differ. Each (variant, seed) is a normal pipeline run, so finished
ones are cached and a rerun picks up where it stopped, and every run lands in one MLflow
experiment. At the end the table gives mean ± std val mIoU with per-seed values, the exact
command, the git sha and the wall time, beside a bar chart and the learning curves.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_path, write_text
from pipeline.console import say, warn
from pipeline.locks import WAITING

VARIANTS = {
    # The bar: the supervised continuation of the same teacher for the same number of steps.
    "supervised (step-matched)": {"variant": "supervised"},
    # The published SupBaseline's protocol: as many passes over the labeled set as the others make over the
    # unlabeled set, which is far fewer steps at few labels.
    "supervised (epoch-matched)": {"variant": "supervised", "train.match": "epochs"},
    "unimatch": {"variant": "unimatch"},
    "unimatch + plain MIM": {"variant": "s4mim", "mim.mode": "plain", "fa.weight": 0, "smim.weight": 0},
    "unimatch + CMIM": {"variant": "s4mim", "mim.mode": "classwise", "fa.weight": 0, "smim.weight": 0},
    "unimatch + CMIM + FA": {"variant": "s4mim", "mim.mode": "classwise", "smim.weight": 0},
    "s4mim (CMIM + FA + SMIM)": {"variant": "s4mim"},
}
BASELINES = ("supervised (step-matched)", "supervised (epoch-matched)", "unimatch")
# The names --variant takes, in the table's order.
VARIANT_KEYS = dict(zip(("supervised-steps", "supervised-epochs", "unimatch", "mim", "cmim", "cmim-fa", "s4mim"),
                        VARIANTS, strict=True))  # fmt: skip
# The regimes quality runs: the presets (by labeled split) of each, and the split each runs by default. The
# testbed's is the cell its screening chose: the largest UniMatch - step-matched supervised gap (docs/shapes.md).
REGIMES = {"short": "shapes", "testbed": "shapes48"}
DEFAULT_SPLITS = {"short": "1/8", "testbed": "1/32"}
DEFAULT_REGIME = "testbed"
EXPERIMENT = "s4mim-quality"
# Keys each (variant, seed) run sets itself; --set may not change them.
CONTROLLED = {"seed", "variant", "train.epochs", "train.steps_per_epoch", "train.match", "tracking.experiment",
              "mim.mode", "data.synth_seed"}  # fmt: skip
# Weights --set may change, for the variants that train the term (the others keep it off).
TERM_WEIGHTS = {"fa.weight": "FA", "smim.weight": "SMIM"}


def preset_for(split: str | None = None, regime: str = DEFAULT_REGIME) -> str:
    """The preset of a regime at a labeled split (the regime's default split if none): shapes-1/8 (short),
    shapes48-1/32 (testbed)."""
    from pipeline.config.presets import FRACTIONS, TESTBED_FRACTIONS
    from pipeline.errors import UsageError

    if regime not in REGIMES:
        raise UsageError(f"--regime {regime}: choose one of {', '.join(REGIMES)}")
    split = split or DEFAULT_SPLITS[regime]
    fractions = TESTBED_FRACTIONS if regime == "testbed" else FRACTIONS
    if split not in fractions:
        raise UsageError(f"--split {split}: the {regime} regime has {', '.join(fractions)}")
    return f"{REGIMES[regime]}-{split}"


def regime_of(preset: str) -> str | None:
    """The regime whose presets ``preset`` is one of (shapes-1/8: short, shapes48-1/32: testbed), else None."""
    return next((regime for regime, prefix in REGIMES.items() if preset.startswith(prefix + "-")), None)


# A column of a table: a training seed on one dataset, or a (generator seed, training seed) pair in a table
# that pools several held-out datasets.
Sample = int | tuple[int, int]


def samples(synth_seeds: Sequence[int], seeds: Sequence[int]) -> list[Sample]:
    """The columns of a table: the training seeds on one dataset; every (generator seed, training seed)
    pair on several."""
    if len(synth_seeds) == 1:
        return list(seeds)
    return [(synth, seed) for synth in synth_seeds for seed in seeds]


def column(sample: Sample) -> str:
    return f"seed {sample}" if isinstance(sample, int) else f"data {sample[0]} seed {sample[1]}"


def pooled_synth_seeds(samples: Sequence[Sample]) -> list[int]:
    """The generator seeds a pooled table's columns span; none for a table of one dataset."""
    return sorted({sample[0] for sample in samples if isinstance(sample, tuple)})


def _unit(samples: Sequence[Sample]) -> str:
    return "pair" if any(isinstance(sample, tuple) for sample in samples) else "seed"


@dataclass
class Cell:
    variant: str
    miou: dict[Sample, float] = field(default_factory=dict)  # val mIoU of the best checkpoint (evaluate)
    seconds: dict[Sample, float] = field(default_factory=dict)
    final: dict[Sample, float] = field(default_factory=dict)  # val mIoU after the last epoch
    iou: dict[Sample, dict[str, float]] = field(default_factory=dict)  # per-class IoU of the best checkpoint
    curve: dict[Sample, list[dict]] = field(default_factory=dict)  # the train stage's val mIoU at each eval
    history: dict[Sample, list[dict]] = field(default_factory=dict)  # the train stage's epoch diagnostics
    machines: dict[Sample, list[str]] = field(default_factory=dict)  # what trained the train stage

    @property
    def mean(self) -> float:
        return statistics.mean(self.miou.values())

    @property
    def std(self) -> float:
        return _std(self.miou.values())

    def class_mean(self, name: str) -> float:
        return statistics.mean(per_class[name] for per_class in self.iou.values())

    def record(self, sample: Sample, stages: dict) -> None:
        """Take a finished run's figures from its stage statuses (by stage name): the best checkpoint's val
        mIoU and per-class IoU, and the train stage's last val mIoU, learning curve and diagnostics."""
        evaluate, train = stages["evaluate"], stages["train"]
        self.miou[sample] = evaluate.miou
        final = train.result.get("metrics", {}).get("val/miou")
        if final is not None:
            self.final[sample] = final
        if evaluate.result.get("iou"):
            self.iou[sample] = evaluate.result["iou"]
        if train.result.get("curve"):
            self.curve[sample] = train.result["curve"]
        if train.result.get("history"):
            self.history[sample] = train.result["history"]
        if train.result.get("machines"):
            self.machines[sample] = train.result["machines"]


def _std(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def budget_overrides(epochs: int, steps: int) -> dict:
    return {"train.epochs": epochs, "train.steps_per_epoch": steps, "tracking.experiment": EXPERIMENT}


def cell_configs(base, samples: Sequence[Sample], epochs: int, steps: int,
                 variants=None) -> list[tuple[str, Sample, object]]:  # fmt: skip
    """(variant name, sample, config) of every run of the ablation (or of ``variants``), sample by sample: a
    sample is a training seed on ``base``'s data, or a (generator seed, training seed) pair."""
    from pipeline.config.schema import apply_overrides

    def sample_overrides(sample: Sample) -> dict:
        synth, seed = sample if isinstance(sample, tuple) else (base.data.synth_seed, sample)
        return {"data.synth_seed": synth, "seed": seed}

    runs = []
    for sample in samples:
        for name in variants or VARIANTS:
            overrides = {**budget_overrides(epochs, steps), **VARIANTS[name], **sample_overrides(sample)}
            runs.append((name, sample, apply_overrides(base, overrides)))
    return runs


def run_side_by_side(cells: list[tuple[str, Sample, object]], runs: Path, jobs: int, target: list[str],
                     trial: Sequence[str] = ()) -> None:  # fmt: skip
    """Train the runs that are not cached yet ``jobs`` at a time, each an ``s4mim`` process with
    cpu_count // jobs threads (on a 2-core CPU two one-thread runs side by side get through 1.16-1.27x
    more steps than one two-thread run after another; docs/shapes.md). ``target`` names where they
    run (``--local``, or the Ray cluster and the tracking URI). Each seed's warmup runs first, in a
    process of its own, so that no two processes ever train the same stage; a stage that another
    command (another quality table sharing a row) is running is waited for (``--wait``), not failed
    on. The processes' output goes to runs/quality/logs. Each run's progress lines name the knobs under ``trial``.
    """
    import os

    from data_prep.atomic import write_text
    from pipeline.orchestration.orchestrate import plan
    from pipeline.training.prepare import prepare_stage

    threads = max(1, (os.cpu_count() or 1) // jobs)
    for config in {c.data.model_dump_json(): c for _, _, c in cells}.values():
        prepare_stage(config, runs)  # data, manifest and split once, here, before any process could race for them
    folder = runs / "quality"
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    warmups, trains, queued = {}, [], set()
    for name, _, config in cells:
        statuses = {s.name: s for s in plan(config, runs, [])}
        # Two rows whose runs read the same settings (plain MIM and CMIM with mim.weight=0) share their stages.
        if statuses["evaluate"].status == "cached" or statuses["train"].folder in queued:
            continue
        queued.add(statuses["train"].folder)
        config = config.model_copy(update={"scaling": config.scaling.model_copy(update={"cpus_per_worker": threads})})
        words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # "unimatch + CMIM" -> unimatch-cmim
        init = "" if config.model.init == "none" else f"-init-{re.sub(r'[^a-z0-9]+', '-', config.model.init.lower())}"
        seed, synth = config.seed, config.data.synth_seed
        # The train stage's folder name ends the stem: two commands training the same row under other
        # settings (a knob trial beside the defaults) never share a config file or a log.
        train = statuses["train"].folder.name
        stem = f"{words}-seed{seed}-synth{synth}-{re.sub(r'[^a-z0-9]+', '_', config.preset)}{init}-{train}"
        which = f"seed {seed}" + (f", data {synth}" if synth else "")  # held-out data says which generator seed
        path = folder / f"{stem}.json"
        write_text(path, config.model_dump_json(indent=2) + "\n")
        if statuses["warmup"].status != "cached":  # one process per warmup stage, however many runs share it
            warmups.setdefault(
                statuses["warmup"].folder,
                (f"warmup of {config.preset}, {which}", ["warmup", str(path), "--wait"], logs / f"warmup-{stem}.log"),
            )
        run = ["pipeline", "run", str(path), "--wait"]
        trains.append((f"{name}{_knobs(trial)}, {which}", run, logs / f"{stem}.log"))
    if not trains:
        return
    say(f"{len(trains)} runs to train, {jobs} side by side with {threads} thread(s) each; logs in {logs}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for batch in (list(warmups.values()), trains):
        _run_pool(batch, jobs, target, env)


def _knobs(trial: Sequence[str]) -> str:
    """What a run's label adds for the knobs under trial: " (smim.ratio=0.25)", or nothing."""
    return f" ({', '.join(trial)})" if trial else ""


EPOCH_LINE = re.compile(r"^\[(\w+)\] epoch (\d+)/(\d+)\s.*?(?:miou ([\d.]+))?\s+\(\d+ s\)$")


class EpochFollower:
    """Follows a run's log as it grows, for the epochs it finishes: one line a finished epoch, with the
    val mIoU where the epoch was evaluated and, from the second epoch this process saw, the time left;
    and the line saying that the run waits for another command running one of its stages."""

    def __init__(self, label: str, log: Path):
        self.label, self.log = label, log
        self.offset = log.stat().st_size if log.is_file() else 0  # what earlier attempts wrote is not news
        self.first = None  # (epoch, time) of the first epoch this follower saw finish

    def news(self) -> list[str]:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        out = []
        for line in complete.decode(errors="replace").splitlines():
            if line.rstrip().endswith(WAITING):  # another command is running one of this run's stages
                out.append(f"   {self.label}: {line.strip()}")
                continue
            match = EPOCH_LINE.match(line.strip("\r"))
            if match is None:
                continue
            stage, epoch, total, miou = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
            now = time.perf_counter()
            if self.first is None:
                self.first = (epoch, now)
            text = f"   {self.label}: {stage} epoch {epoch}/{total}" + (f", val mIoU {miou}" if miou else "")
            done, since = epoch - self.first[0], now - self.first[1]
            if done > 0 and epoch < total:
                text += f" (about {since / done * (total - epoch) / 60:.0f} min left)"
            out.append(text)
        return out


def _run_pool(commands: list[tuple[str, list[str], Path]], jobs: int, target: list[str], env: dict,
              program: list[str] | None = None) -> None:  # fmt: skip
    """Run ``s4mim`` commands (``program``: ``python -m pipeline``) ``jobs`` at a time, saying when each starts,
    finishes each epoch and ends; stop starting new ones after a failure and raise it."""
    import subprocess

    from pipeline.errors import UsageError
    from pipeline.signals import Stop

    program = program or [sys.executable, "-m", "pipeline"]
    pending, running, failed = list(commands), [], []
    try:
        while pending or running:
            while pending and len(running) < jobs and not failed:
                label, args, log = pending.pop(0)
                say(f"   started: {label}")
                follower = EpochFollower(label, log)
                with open(log, "a") as out:  # a resumed run's log keeps what the interrupted one wrote
                    out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: s4mim {' '.join(args)}\n")
                    out.flush()
                    proc = subprocess.Popen([*program, *args, *target], stdout=out, stderr=subprocess.STDOUT, env=env)
                running.append((label, log, proc, time.perf_counter(), follower))
            if failed and not running:
                break
            time.sleep(2)
            for item in list(running):
                label, log, proc, t0, follower = item
                for line in follower.news():
                    say(line)
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode == 0:
                    say(f"   finished: {label} ({(time.perf_counter() - t0) / 60:.1f} min)")
                else:
                    failed.append((label, log, proc.returncode))
    except KeyboardInterrupt as stop:
        for _, _, proc, _, _ in running:
            if isinstance(stop, Stop):  # SIGTERM or SIGHUP came to this process alone: pass it on
                proc.terminate()
            try:  # a Ctrl-C at the terminal reached them too; give them time to stop cleanly
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    if failed:
        label, log, code = failed[0]
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or [""]
        raise UsageError(f"{label} failed (exit {code}): {tail[0].strip()} (whole log: {log})")


def run_quality(base, samples: Sequence[Sample], epochs: int, steps: int, runs: Path, backend, *, jobs: int = 1,
                target: list[str] | None = None, variants=None, trial: Sequence[str] = ()):  # fmt: skip
    """Run (or find cached) every (variant, sample) pipeline of ``base`` under the fixed budget.

    With ``jobs`` > 1 the runs train side by side first (``run_side_by_side``); the pass over the
    pipelines then finds them cached. Returns the cells, the warmup teacher's val mIoU per sample, and
    the wall time in seconds."""
    from pipeline.orchestration.orchestrate import run_pipeline

    started = time.perf_counter()
    planned = cell_configs(base, samples, epochs, steps, variants)
    if jobs > 1:
        run_side_by_side(planned, runs, jobs, target or [], trial)
    cells = {name: Cell(name) for name in variants or VARIANTS}
    warmup: dict[Sample, float] = {}
    for name, seed, config in planned:
        say(f"== {name}{_knobs(trial)}, {column(seed)}")
        t0 = time.perf_counter()
        stages = {s.name: s for s in run_pipeline(config, runs, backend, wait=True).statuses}
        if stages["warmup"].miou is not None:
            warmup[seed] = stages["warmup"].miou
        cells[name].record(seed, stages)
        cells[name].seconds[seed] = time.perf_counter() - t0
        say(f"   val mIoU {stages['evaluate'].miou:.2f}")
    return list(cells.values()), warmup, time.perf_counter() - started


def check_overrides(overrides: list[str], option: str = "--set") -> None:
    """``--set`` (or ``--trial``: ``option``) may not change what quality sets for each run; a term's weight
    it may, for the variants that train the term."""
    from pipeline.config.schema import parse_override
    from pipeline.errors import UsageError

    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        # A whole section (--set 'fa={"weight": 0}') sets each of its keys.
        items = {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
        for key, value in items.items():
            if key in TERM_WEIGHTS and not _positive(value):
                term = TERM_WEIGHTS[key]
                raise UsageError(
                    f"{option} {key}={value}: the variants without {term} already run with it off; "
                    f"give a positive weight for the variants that train {term}"
                )
            if key in CONTROLLED:
                raise UsageError(
                    f"{option} {key}: quality sets it for each run; use --seeds, --epochs, --steps or --synth-seed"
                )


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")


def runs_target(base, jobs: int, local: bool, ray_address: str | None, tracking_uri: str | None) -> list[str]:
    """The options of each side-by-side run: ``--local``, or with ``jobs > 1`` this command's Ray and
    MLflow, so that the runs join the cluster it joined and log where it logs."""
    if local:
        return ["--local"]
    if jobs == 1:
        return []
    import ray

    from pipeline.backends.ray_train import connect
    from pipeline.paths import ray_address as resolve_address
    from pipeline.tracking.runs import Tracker
    from pipeline.tracking.runs import tracking_uri as resolve_uri

    say(connect(ray_address))
    uri = resolve_uri(base, tracking_uri)
    Tracker(uri).experiment(EXPERIMENT)  # the store and experiment exist before the runs race to make them
    joined = resolve_address(ray_address)
    address = joined if joined not in (None, "local") else ray.get_runtime_context().gcs_address
    return ["--ray-address", address, "--tracking-uri", uri]


def chosen_variants(keys: list[str], baselines: bool) -> tuple[str, ...] | None:
    """The rows of the table: every variant (None), the baselines, or those ``--variant`` names (by
    ``VARIANT_KEYS``) with unimatch, the reference of every paired difference, always among them."""
    from pipeline.errors import UsageError

    if baselines and keys:
        raise UsageError("--baselines and --variant choose the rows two ways: give one of them")
    if baselines:
        return BASELINES
    if not keys:
        return None
    unknown = [key for key in keys if key not in VARIANT_KEYS]
    if unknown:
        raise UsageError(f"unknown --variant {unknown[0]!r}: choose among {', '.join(VARIANT_KEYS)}")
    chosen = {VARIANT_KEYS[key] for key in [*keys, "unimatch"]}
    return tuple(name for name in VARIANTS if name in chosen)


def rows_suffix(variants) -> str:
    """What a table of some of the variants adds to its name: -baselines for the baselines, else -only_
    and the keys of its rows other than unimatch (results-testbed-1_32-only_cmim_s4mim.md)."""
    names = tuple(variants or VARIANTS)
    if names == tuple(VARIANTS):
        return ""
    if names == BASELINES:
        return "-baselines"
    keys = [key for key, name in VARIANT_KEYS.items() if name in names and name != "unimatch"]
    return "-only_" + "_".join(key.replace("-", "") for key in keys)


def _table_plan(base, seeds: list[int], epochs: int | None, steps: int | None, synth_seeds: Sequence[int]):
    """The base config, the columns and the budget (the preset's unless given) of a table."""
    epochs = epochs or base.train.epochs
    steps = steps or base.train.steps_per_epoch or 90
    if len(synth_seeds) == 1:  # one dataset: the columns are training seeds on it
        base = base.model_copy(update={"data": base.data.model_copy(update={"synth_seed": synth_seeds[0]})})
    return base, samples(synth_seeds or [base.data.synth_seed], seeds), epochs, steps


def dry_run_lines(base, seeds: list[int], epochs: int | None, steps: int | None, runs: Path, *,
                  variants: tuple[str, ...] | None, synth_seeds: Sequence[int] = ()) -> list[str]:  # fmt: skip
    """``s4mim quality --dry-run``: each run of the table, cached (with its val mIoU) or to train (the stages
    left, and whether an interrupted one resumes), then a count. Reads the stage cache; writes nothing."""
    from pipeline.orchestration.orchestrate import plan

    base, columns, epochs, steps = _table_plan(base, seeds, epochs, steps, synth_seeds)
    lines, left, warmups, unprepared = [], 0, set(), set()
    planned = cell_configs(base, columns, epochs, steps, variants)
    for name, sample, config in planned:
        statuses = plan(config, runs, [])
        if statuses[0].status != "cached":
            unprepared.add(config.data.synth_seed)
        todo = [s for s in statuses if s.status != "cached" and s.name != "prepare"]
        if not todo:
            miou = next(s.miou for s in statuses if s.name == "evaluate")
            lines.append(f"   cached:   {name}, {column(sample)} (val mIoU {miou:.2f})")
            continue
        left += 1
        warmups.update(str(s.folder or (config.data.synth_seed, config.seed)) for s in todo if s.name == "warmup")
        stages = ", ".join(s.name + (f" ({s.detail})" if s.detail.startswith("resumes") else "") for s in todo)
        lines.append(f"   to train: {name}, {column(sample)}: {stages}")
    head = (f"{len(planned)} runs of {epochs} epochs of {steps} steps: {len(planned) - left} cached, {left} to train"
            + (f" ({len(warmups)} warmup(s) first)" if warmups else ""))  # fmt: skip
    if unprepared:  # a stage's key holds its inputs' hash, known once the dataset is there
        lines.append(f"   (the dataset of generator seed {_listed(sorted(unprepared))} is not generated or prepared "
                     "yet: stages cached for it are found only once it is; the same command without --dry-run "
                     "generates it first)")  # fmt: skip
    return [head, *lines]


def run_command(base, seeds: list[int], epochs: int | None, steps: int | None, runs: Path, backend, *, jobs: int,
                local: bool, ray_address: str | None, tracking_uri: str | None, variants: tuple[str, ...] | None,
                docs: Path, synth_seeds: Sequence[int] = (), trial: Sequence[str] = (),
                without=None) -> tuple[list[Cell], Path, list[Path]]:  # fmt: skip
    """``s4mim quality``: every cell (of ``variants``, else all) trained at one budget (the preset's unless
    given) on ``base``'s data, or pooled over the datasets of several ``synth_seeds``, then the results table
    and charts written into ``docs``. For a knob trial (``trial``, the ``--trial`` overrides) ``without`` is
    the config without them, whose runs of the same rows the table sets the trial's against. Returns the
    cells, the table's path and the charts'."""
    from pipeline.tracking.runs import git_sha

    base, columns, epochs, steps = _table_plan(base, seeds, epochs, steps, synth_seeds)
    target = runs_target(base, jobs, local, ray_address, tracking_uri)
    sha = git_sha()  # the code the runs train with, before this command writes its tables into the tree
    cells, warmup, wall = run_quality(base, columns, epochs, steps, runs, backend, jobs=jobs, target=target,
                                      variants=variants, trial=trial)  # fmt: skip
    reference = []
    if without is not None:  # a knob trial: the same rows without its knobs, from the cache
        without, _, _, _ = _table_plan(without, seeds, epochs, steps, synth_seeds)
        reference = reference_cells(base, without, columns, epochs, steps, runs, variants)
    return cells, *write_results(base, cells, columns, epochs, steps, wall, warmup, docs, sha, reference, trial)


def results_markdown(base, cells: list[Cell], seeds: Sequence[Sample], epochs: int, steps: int, wall: float,
                     command: str, sha: str, warmup_miou: dict[Sample, float],
                     charts: Sequence[Path] = (), reference: Sequence[Cell] = (),
                     trial: Sequence[str] = ()) -> str:  # fmt: skip
    """The table's text, one column per sample (``seeds``: training seeds, or (generator seed, training seed)
    pairs pooled over held-out datasets); ``charts`` (the bar chart, then the learning curves where there
    are any) are linked by name, beside the table."""
    unit = _unit(seeds)
    synths = pooled_synth_seeds(seeds)
    if synths:
        data = f"`{base.data.dataset}` generated with seeds {_listed(synths)} (held out, pooled)"
        varies = (
            "Each column is one (generator seed, training seed) pair: the generator seed makes the dataset, "
            "the training seed the model initialisation, sampling and augmentation; the labeled split"
        )
        fixed = "is drawn from each dataset the same way"
    else:
        data = f"`{base.data.dataset}`" + (
            f" generated with seed {base.data.synth_seed} (held out)" if base.data.synth_seed else ""
        )
        varies = "Seeds change model initialisation, sampling and augmentation; the labeled split"
        fixed = "and the data are fixed"
    what = "the baselines" if {cell.variant for cell in cells} <= set(BASELINES) else "the S4MIM ablation"
    lines = [
        f"# Results: {what} on {data} at {base.data.split} labels",
        "",
        f"Written by `{command}` at git sha `{sha}`, in {wall / 60:.0f} min of wall time on {_machine()} "
        "(stages found in the stage cache take none of it).",
        "",
        *_trained_on(cells),
        f"Every row trains the `{base.preset}` model for the same budget: {epochs} epochs of {steps} steps "
        f"(batch {base.data.batch_size} labeled + {base.data.batch_size} unlabeled images a step) from the same "
        f"warmup teacher of its {unit}, with the preset's recipe; only the loss terms differ. `supervised "
        "(step-matched)` spends the same steps on the labeled images alone; `supervised (epoch-matched)` makes as "
        "many passes over the labeled images as the others make over the unlabeled ones, as the published "
        "supervised baselines do (fewer steps). "
        f"{varies} ({base.data.split} of the train images, class-aware draw, split seed "
        f"{base.data.split_seed}) {fixed}. Scores are val mIoU (evaluation mode "
        f"`{base.eval.mode}`) of each run's best checkpoint.",
        "",
        "| variant | mean ± std | " + " | ".join(column(s) for s in seeds) + " |",
        "|---|---:|" + "---:|" * len(seeds),
    ]
    for cell in cells:
        per_seed = " | ".join(f"{cell.miou[s]:.2f}" if s in cell.miou else "-" for s in seeds)
        lines.append(f"| {cell.variant} | {cell.mean:.2f} ± {cell.std:.2f} | {per_seed} |")
    if warmup_miou:
        per_seed = " | ".join(f"{warmup_miou[s]:.2f}" if s in warmup_miou else "-" for s in seeds)
        values = list(warmup_miou.values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| *(warmup teacher, the starting point)* | {statistics.mean(values):.2f} ± {spread:.2f} | {per_seed} |"
        )
    lines += _paired_table(cells, seeds)
    lines += _against_reference(cells, reference, seeds, trial)
    if any(cell.final for cell in cells):
        header = "| variant | mean ± std | " + " | ".join(column(s) for s in seeds) + " |"
        lines += ["", "The same runs after their last epoch (the table above scores each run's best epoch, which can "
                  "favour an early peak):", "", header, "|---|---:|" + "---:|" * len(seeds)]  # fmt: skip
        for cell in cells:
            per_seed = " | ".join(f"{cell.final[s]:.2f}" if s in cell.final else "-" for s in seeds)
            spread = (
                f"{statistics.mean(cell.final.values()):.2f} ± {_std(cell.final.values()):.2f}" if cell.final else "-"
            )
            lines.append(f"| {cell.variant} | {spread} | {per_seed} |")
    with_iou = [cell for cell in cells if cell.iou]
    if with_iou:
        classes = list(next(iter(with_iou[0].iou.values())))
        lines += ["", f"Per-class IoU of the best checkpoints, mean over {unit}s:", "",
                  "| class | " + " | ".join(cell.variant for cell in with_iou) + " |",
                  "|---|" + "---:|" * len(with_iou)]  # fmt: skip
        for name in classes:
            lines.append(f"| {name} | " + " | ".join(f"{cell.class_mean(name):.1f}" for cell in with_iou) + " |")
    lines += _diagnostics_table(cells, unit)
    if charts:
        lines += ["", f"![val mIoU per variant]({charts[0].name})", ""]
    if len(charts) > 1:
        lines += [f"Val mIoU during the train stage, mean over {unit}s (shaded: min to max):", "",
                  f"![learning curves]({charts[1].name})", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def _trained_on(cells: Sequence[Cell]) -> list[str]:
    """Which machines trained the table's runs: the same code trains differently on another CPU."""
    unnamed = "a machine not recorded (trained before results named it)"
    counts = Counter(" + ".join(cell.machines.get(sample, [unnamed])) for cell in cells for sample in cell.miou)
    if set(counts) <= {unnamed}:
        return []
    return ["Train stages trained on: " + "; ".join(f"{name} ({n} runs)" for name, n in counts.most_common()) + ".",
            ""]  # fmt: skip


def _listed(values: Sequence) -> str:
    """1, 2 and 3."""
    words = [str(value) for value in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def last_quarter_diagnostics(history: list[dict]) -> dict[str, float]:
    """The mean of each diagnostic over the epochs of the last quarter of training (at least the last one)."""
    tail = history[-max(1, len(history) // 4) :]
    keys = sorted({key for epoch in tail for key in epoch if key.startswith("train/")})
    return {
        key: statistics.mean(epoch[key] for epoch in tail if key in epoch)
        for key in keys
    }  # fmt: skip


def _diagnostics_table(cells: list[Cell], unit: str = "seed") -> list[str]:
    """Mask ratio, pseudo-label accuracy and each term's weighted gradient norm on the encoder, over the last
    quarter of training, mean over seeds (or pairs): for the variants that log them (not the supervised ones)."""
    rows = {}
    for cell in cells:
        per_seed = [last_quarter_diagnostics(history) for history in cell.history.values() if history]
        keys = sorted({key for seed in per_seed for key in seed})
        if "train/mask_ratio" in keys:
            rows[cell.variant] = {key: statistics.mean(seed[key] for seed in per_seed if key in seed) for key in keys}
    if not rows:
        return []
    keys = sorted({key for row in rows.values() for key in row}, key=_diagnostic_order)
    names = [key.removeprefix("train/") for key in keys]
    lines = ["", f"Diagnostics over the last quarter of training, mean over {unit}s: the share of unlabeled pixels "
             "above the confidence threshold, how often the pseudo labels are right (all pixels, confident ones), and "
             "each loss term's weighted gradient norm on the encoder:", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(keys)]  # fmt: skip
    for variant, row in rows.items():
        lines.append(f"| {variant} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys) + " |")
    return lines


def _diagnostic_order(key: str) -> tuple[int, str]:
    first = ("train/mask_ratio", "train/pseudo_acc", "train/pseudo_acc_confident", "train/grad_norm/total")
    return (first.index(key), "") if key in first else (len(first), key)


# Each S4MIM addition against the row it adds to: what the term itself changes.
STEPS = (("unimatch + CMIM", "unimatch + plain MIM"), ("unimatch + CMIM + FA", "unimatch + CMIM"),
         ("s4mim (CMIM + FA + SMIM)", "unimatch + CMIM + FA"))  # fmt: skip


def paired_differences(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """The (variant, reference) pairs the report differences seed by seed: unimatch against each supervised
    protocol, each S4MIM variant against unimatch, then each addition against the row it adds to (``STEPS``:
    CMIM against plain MIM, FA against CMIM, SMIM against CMIM + FA)."""
    by_name = {cell.variant: cell for cell in cells}
    unimatch = by_name.get("unimatch")
    if unimatch is None:
        return []
    pairs = [(unimatch, by_name[name]) for name in BASELINES[:2] if name in by_name]
    pairs += [(cell, unimatch) for cell in cells if cell.variant not in BASELINES]
    return pairs + [(by_name[new], by_name[old]) for new, old in STEPS if new in by_name and old in by_name]


def _paired_table(cells: list[Cell], seeds: Sequence[Sample]) -> list[str]:
    pairs = paired_differences(cells)
    if not pairs:
        return []
    unit = _unit(seeds)
    lines = ["", f"Paired differences, {unit} by {unit} (the same {unit} shares its teacher, sampling and "
             "augmentation), of the best checkpoints and, in the last column, after the last epoch:", "",
             *_difference_header("difference", seeds)]  # fmt: skip
    rows = [
        _difference_row(f"{cell.variant} − {reference.variant}", cell, reference, seeds) for cell, reference in pairs
    ]
    return lines + [row for row in rows if row]


def _difference_header(first: str, seeds: Sequence[Sample]) -> list[str]:
    """The header of a table of ``_difference_row`` rows."""
    return [f"| {first} | mean ± std | " + " | ".join(column(s) for s in seeds) + f" | {_unit(seeds)}s above 0 | "
            "last epoch: mean ± std |", "|---|---:|" + "---:|" * len(seeds) + "---:|---:|"]  # fmt: skip


def _difference_row(label: str, cell: Cell, reference: Cell, seeds: Sequence[Sample]) -> str | None:
    """A row of paired differences: mean ± std, each sample, how many are above 0, and the last epoch's mean."""
    best = {s: cell.miou[s] - reference.miou[s] for s in seeds if s in cell.miou and s in reference.miou}
    last = [cell.final[s] - reference.final[s] for s in seeds if s in cell.final and s in reference.final]
    if not best:
        return None
    per_seed = " | ".join(f"{best[s]:+.2f}" if s in best else "-" for s in seeds)
    above = sum(value > 0 for value in best.values())
    tail = f"{statistics.mean(last):+.2f} ± {_std(last):.2f}" if last else "-"
    return (f"| {label} | {statistics.mean(best.values()):+.2f} ± {_std(best.values()):.2f} | {per_seed} | "
            f"{above} of {len(best)} | {tail} |")  # fmt: skip


def _against_reference(
    cells: list[Cell], reference: Sequence[Cell], seeds: Sequence[Sample], knobs: Sequence[str]
) -> list[str]:
    """A knob trial's rows against the same variants without its ``knobs`` (``reference``), sample by sample."""
    by_name = {cell.variant: cell for cell in reference}
    rows = [_difference_row(f"{cell.variant}: with − without", cell, by_name[cell.variant], seeds)
            for cell in cells if cell.variant in by_name]  # fmt: skip
    rows = [row for row in rows if row]
    if not rows:
        return []
    return ["", f"Against the same variant without {', '.join(f'`{k}`' for k in knobs)} (`--trial`; the rows that "
            "do not read it are the same runs, and left out), from the stage cache:", "",
            *_difference_header("variant", seeds), *rows]  # fmt: skip


def _machine() -> str:
    """The machine that wrote the table (``pipeline.machine.machine``), and its GPUs."""
    import torch

    from pipeline.machine import machine

    gpus = f"{torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available() else "no GPU"
    return f"{machine()}, {gpus}"


def bar_chart(cells: list[Cell], title: str, out: Path, unit: str = "seed") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    names = [c.variant for c in cells]
    ax.bar(range(len(cells)), [c.mean for c in cells], yerr=[c.std for c in cells], capsize=4, color="#4c72b0")
    for i, cell in enumerate(cells):
        ax.scatter([i] * len(cell.miou), list(cell.miou.values()), color="black", s=10, zorder=3)
    ax.set_xticks(range(len(cells)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    low = min(min(c.miou.values()) for c in cells)
    ax.set_ylim(max(0, low - 5), max(max(c.miou.values()) for c in cells) + 3)
    ax.set_title(f"{title}: mean ± std over {unit}s (dots: {unit}s)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def curves_chart(cells: list[Cell], title: str, out: Path) -> None:
    """Val mIoU against train step per variant: the mean over seeds, and their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    for cell in cells:
        if not cell.curve:
            continue
        length = min(len(curve) for curve in cell.curve.values())  # seeds still running have fewer points
        steps = [point["step"] for point in next(iter(cell.curve.values()))[:length]]
        values = [[curve[i]["val/miou"] for curve in cell.curve.values()] for i in range(length)]
        (line,) = ax.plot(steps, [statistics.mean(v) for v in values], label=cell.variant, lw=1.4)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("train step")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"{title}: val mIoU during training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# Keys a name spells out already, or whose change makes no other experiment (where the data is, how it runs);
# one ending in "." stands for its whole section.
UNNAMED = ("data.root", "data.split", "data.synth_seed", "data.loader_workers", "model.init", "tracking.",
           "scaling.gpus_per_worker", "scaling.cpus_per_worker")  # fmt: skip


def _unnamed(key: str) -> bool:
    return any(key == u or (u.endswith(".") and key.startswith(u)) for u in UNNAMED)


def reference_cells(base, reference, samples: Sequence[Sample], epochs: int, steps: int, runs: Path,
                    variants=None) -> list[Cell]:  # fmt: skip
    """For a knob trial (``base``), the same rows without the knobs (``reference``), as far as the stage cache
    has them (nothing is trained), but for the rows whose runs the knobs leave the same."""
    from pipeline.orchestration.orchestrate import plan

    cells = {name: Cell(name) for name in variants or VARIANTS}
    trial, plain = (
        cell_configs(base, samples, epochs, steps, variants),
        cell_configs(reference, samples, epochs, steps, variants),
    )
    for (name, sample, config), (_, _, without) in zip(trial, plain, strict=True):
        stages = {s.name: s for s in plan(without, runs, [])}
        same = stages["train"].folder == {s.name: s for s in plan(config, runs, [])}["train"].folder
        if not same and stages["evaluate"].status == "cached":
            cells[name].record(sample, stages)
    return [cell for cell in cells.values() if cell.miou]


def changed_knobs(base) -> list[str]:
    """``key=value`` of each setting of ``base`` that differs from its built-in preset's, but for ``UNNAMED``."""
    from pipeline.config.presets import BUILTIN, load_preset
    from pipeline.tracking.runs import flat_params

    if base.preset not in BUILTIN:
        return []
    ours, theirs = flat_params(base, frozenset()), flat_params(load_preset(base.preset), frozenset())
    return sorted(f"{key}={value}" for key, value in ours.items() if value != theirs[key] and not _unnamed(key))


def with_budget(base, epochs: int, steps: int):
    """``base`` with the train budget every run of the table had (a budget set by --epochs or --steps names it)."""
    return base.model_copy(update={"train": base.train.model_copy(update={"epochs": epochs, "steps_per_epoch": steps})})


def results_path(base, docs: Path, variants=None, synth_seeds: Sequence[int] = ()) -> Path:
    """docs/results-<regime>.md on the development data (generator seed 0), docs/results-<regime>-synth<N>.md
    on held-out data (-synth3_4 for the table that pools several ``synth_seeds``); a table of some of the
    variants adds its rows (``rows_suffix``: -baselines, -only_cmim_s4mim), a split other than 1/8 its fraction
    (results-testbed-1_16.md), an initialisation other than none its name (-standin), and each knob set
    away from the preset its key and value (results-testbed-1_32-smim_pixels_visible.md), so that a knob
    trial never overwrites the table of the defaults."""
    # Never plain results.md, the written report: a preset of no regime is named instead.
    regime = regime_of(base.preset) or re.sub(r"[^a-z0-9]+", "_", base.preset.lower())
    name = f"results-{regime}{rows_suffix(variants)}"
    if base.data.split != "1/8":
        name += "-" + base.data.split.replace("/", "_")
    if base.model.init != "none":  # a pretrained backbone is another cell: results-testbed-baselines-1_32-standin.md
        name += "-" + re.sub(r"[^a-z0-9]+", "_", base.model.init.lower()).strip("_")
    changed = changed_knobs(base)
    knobs = "-".join(knob.replace(".", "_").replace("=", "_") for knob in changed)
    # Spelled out where that is unambiguous (a lowercase word or a non-negative number per value, and short);
    # else a hash of the settings themselves. The table's header gives the command either way.
    if len(knobs) > 60 or not all(re.fullmatch(r"[a-z0-9_.]+=([a-z0-9]+|\d+\.\d+)", knob) for knob in changed):
        knobs = "set_" + hashlib.sha256("\n".join(changed).encode()).hexdigest()[:8]
    if knobs:
        name += "-" + knobs
    synth_seeds = list(synth_seeds) or [base.data.synth_seed]
    if synth_seeds != [0]:
        name += "-synth" + "_".join(str(seed) for seed in synth_seeds)
    return docs / f"{name}.md"


def reproducing_command(base, argv: list[str]) -> str:
    """The command that makes a table again: the one typed (``make quality`` otherwise), with the regime and
    the split spelled out, so that it still names the same runs after a default changes."""
    args = argv[1:] if argv[:1] == ["quality"] else ["--jobs", "2"]
    if not any(a == "--regime" or a.startswith("--regime=") for a in args):
        regime = regime_of(base.preset)
        args += ["--regime", regime] if regime else []
    if not any(a == "--split" or a.startswith(("--split=", "data.split=")) for a in args):
        args += ["--split", base.data.split]
    return " ".join(["s4mim quality", *args])


def write_results(base, cells, seeds, epochs, steps, wall, warmup_miou, docs: Path, sha: str,
                  reference: Sequence[Cell] = (), trial: Sequence[str] = ()) -> tuple[Path, list[Path]]:  # fmt: skip
    """Write the results table, and its bar chart and learning curves where matplotlib is installed; a knob
    trial's table sets its rows against ``reference``, the same rows without the ``trial`` knobs.
    Returns the table's path and the charts'."""
    from pipeline.training.pictures import has_matplotlib

    command = reproducing_command(base, sys.argv[1:])
    path = results_path(
        with_budget(base, epochs, steps), docs, [cell.variant for cell in cells], pooled_synth_seeds(seeds)
    )
    charts = []
    if has_matplotlib():
        charts.append(path.with_suffix(".png"))
        bar_chart(cells, base.preset, charts[-1], _unit(seeds))
        if any(cell.curve for cell in cells):
            charts.append(path.with_name(path.stem + "-curves.png"))
            curves_chart(cells, base.preset, charts[-1])
    else:
        warn("matplotlib is not installed: the table is written without its charts (pip install matplotlib, "
             "then run the same command again: every stage is cached)")  # fmt: skip
    text = results_markdown(base, cells, seeds, epochs, steps, wall, command, sha, warmup_miou, charts, reference,
                            trial)  # fmt: skip
    write_text(path, text + kept_notes(path))
    return path, charts


KEEP_MARKER = "<!-- s4mim quality keeps everything below this line -->"


def kept_notes(path: Path) -> str:
    """What follows ``KEEP_MARKER`` in an existing results file (hand-written analysis), marker included."""
    if not path.is_file():
        return ""
    text = path.read_text()
    return "\n" + text[text.index(KEEP_MARKER) :] if KEEP_MARKER in text else ""
