"""The ``s4mim`` command line.

    s4mim pipeline run shapes-1/8            # the whole chain on the embedded dataset
    s4mim pipeline run voc-1/8 --data-root /data/VOC2012
    s4mim warmup shapes-1/8 --set warmup.epochs=10
    torchrun --nproc_per_node 2 -m pipeline train shapes-1/8     # DDP, gloo on CPU

A usage, config or data error prints one line and exits with code 2 (``--debug`` shows the
traceback). Rerunning an interrupted command resumes it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands.quality import DEFAULT_REGIME
from pipeline.console import set_verbose
from pipeline.errors import UsageError, find_user_error
from pipeline.paths import rank, world_size
from pipeline.paths import ray_address as resolve_address
from pipeline.signals import signals_as_interrupt

app = typer.Typer(
    help="s4mim: semi-supervised semantic segmentation with masked image modeling (S4MIM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate the embedded dataset and prepare manifests.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Run the whole chain of stages.", no_args_is_help=True)
runs_app = typer.Typer(
    help="Compare tracked runs across labeled splits; carry finished stages between runs folders.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(runs_app, name="runs")

PresetArg = Annotated[str, typer.Argument(help="Preset name (s4mim presets lists them) or a preset JSON file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable).", show_default=False),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Dataset folder (default: $S4MIM_DATA/<dataset>).", show_default=False),
]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False) -> None:
    """s4mim: semi-supervised semantic segmentation with masked image modeling (S4MIM)."""


def _config(preset: str, overrides: list[str] | None, data_root: Path | None = None):
    from pipeline.config.presets import load_preset

    extra = list(overrides or [])
    if data_root is not None:
        extra.append(f"data.root={json.dumps(str(data_root))}")
    return load_preset(preset, extra)


def _runs() -> Path:
    from pipeline.paths import runs_dir

    return runs_dir()


# -- presets -------------------------------------------------------------------------------------


@app.command()
def presets(
    show: Annotated[str | None, typer.Option("--show", help="Print one preset's full config as JSON.")] = None,
    set_: SetOpt = None,
) -> None:
    """List every preset (or show one in full, with any --set overrides applied)."""
    from pipeline.config.presets import BUILTIN, load_preset, preset_names

    if set_ and not show:
        raise UsageError("--set applies to one preset: s4mim presets --show PRESET --set section.key=value")
    if show:
        typer.echo(json.dumps(load_preset(show, set_).model_dump(mode="json"), indent=2))
        return
    typer.echo(f"{'preset':<18} {'dataset':<11} {'split':<6} {'backbone':<14} {'crop':>5} {'workers':>7}")
    for name in preset_names():
        cfg = load_preset(name)
        d = cfg.data
        split = f"{d.split}" + (" (classic)" if d.dataset == "voc" and d.voc_set == "classic" else "")
        shown = name if name in BUILTIN else Path(name).name
        typer.echo(
            f"{shown:<18} {d.dataset:<11} {split:<6} {cfg.model.backbone:<14} {d.crop:>5} {cfg.scaling.workers:>7}"
        )


# -- data ----------------------------------------------------------------------------------------


@data_app.command("synth")
def data_synth(
    root: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: $S4MIM_DATA/shapes, or $S4MIM_DATA/shapes-seedN for --seed N)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Dataset seed: the same seed gives the same images.")] = 0,
) -> None:
    """Generate the embedded ``shapes`` dataset in VOC layout."""
    from data_prep import shapes
    from pipeline.console import progress
    from pipeline.training.prepare import shapes_dir, shapes_lock

    root = (root or shapes_dir(seed)).absolute()
    if shapes.is_complete(root, seed):
        typer.echo(f"{root} already holds shapes seed {seed}")
        return
    if root.exists() and any(root.iterdir()) and not (root / "shapes.json").exists():
        raise UsageError(f"{root} exists and is not a shapes dataset; choose another --root or empty it")
    with shapes_lock(root, seed):
        if shapes.is_complete(root, seed):  # another command generated it while this one waited
            typer.echo(f"{root} already holds shapes seed {seed}")
            return
        if (root / "shapes.json").exists():
            typer.echo(f"replacing the shapes dataset in {root} (other seed or settings)")
        shapes.synthesize(root, seed, progress=progress("images"))
    s = shapes.ShapesSettings()
    typer.echo(f"wrote {s.train} train and {s.val} val images to {root}")


@data_app.command("prepare")
def data_prepare(
    dataset: Annotated[str, typer.Argument(help="voc, cityscapes, shapes or custom.")],
    root: Annotated[Path, typer.Option(help="Dataset folder.")],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out bad samples instead of failing.")] = False,
    split: Annotated[str | None, typer.Option(help="Also write a labeled/unlabeled split: 1/8 or a count.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the class-aware labeled draw.")] = 0,
    labeled_ids: Annotated[Path | None, typer.Option(help="File of labeled ids instead of a draw.")] = None,
    classic: Annotated[
        bool, typer.Option("--classic", help="VOC: draw labeled ids from the 1,464 fine images.")
    ] = False,
) -> None:
    """Validate every image/mask pair and write the Parquet manifest (and split files)."""
    from data_prep.manifest import prepare
    from data_prep.splits import make_split, read_labeled_ids, write_split
    from pipeline.console import progress
    from pipeline.paths import require_writable, slug

    runs = _runs()
    require_writable(runs)
    manifest, bad, reused = prepare(
        dataset, root, runs / "manifests", skip_bad=skip_bad, progress=progress("validated")
    )
    for sample in bad:
        typer.echo(f"skipped {sample.id}: {sample.reason}")
    n_train, n_val = len(manifest.rows("train")), len(manifest.rows("val"))
    state = "unchanged, reused" if reused else "written"
    typer.echo(f"{dataset}: {n_train} train, {n_val} val, {manifest.num_classes} classes, {len(bad)} skipped")
    typer.echo(f"manifest {manifest.path} ({state}), content hash {manifest.content_hash}")
    if split or labeled_ids:
        ids = read_labeled_ids(labeled_ids) if labeled_ids else None
        result = make_split(manifest, split or "1/8", split_seed, fine_only=classic, labeled_ids=ids)
        name = f"ids-{labeled_ids.stem}" if labeled_ids else f"{slug(split)}-seed{split_seed}"
        folder = runs / "splits" / manifest.path.stem / name
        write_split(result, folder)
        typer.echo(f"split: {len(result.labeled)} labeled, {len(result.unlabeled)} unlabeled -> {folder}")


# -- stages --------------------------------------------------------------------------------------

RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray).", show_default=False
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db).",
        show_default=False,
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Also show Ray's and MLflow's own output (always kept in the stage folder's stage.log).",
    ),
]
LocalOpt = Annotated[
    bool, typer.Option("--local", help="Run in this process, without Ray or MLflow (implied under torchrun).")
]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def _backend(config, runs: Path, ray_address: str | None, tracking: str | None, local: bool, evaluates: bool = True):
    """The backend for this command, after checking everything it needs, before any training: the cheap
    checks first, the backbone's weights last (loading them may mean a download)."""
    from model.backbones import check_init
    from pipeline.paths import require_writable
    from pipeline.training.pictures import has_matplotlib
    from pipeline.training.standin import resolved_init

    if evaluates and config.eval.grid_images and not has_matplotlib():
        raise UsageError(
            f"matplotlib is not installed, and evaluate draws its picture grid (eval.grid_images="
            f"{config.eval.grid_images}) with it; pip install matplotlib, or pass --set eval.grid_images=0"
        )
    require_writable(runs)
    _check_dataset_tree(config)
    if local or _under_torchrun():
        from pipeline.backends.local import LocalBackend

        backend = LocalBackend()
    else:
        from pipeline.backends.ray_train import RayBackend, check_reachable, check_storage, storage_path
        from pipeline.tracking.runs import check_tracking_uri, tracking_uri

        uri = tracking_uri(config, tracking)
        check_tracking_uri(uri)
        check_storage(storage_path(runs))
        check_reachable(ray_address)
        backend = RayBackend(runs, uri, ray_address)  # joins Ray in begin(), once the data is prepared
    check_init(config.model.backbone, resolved_init(config.model))
    return backend


def _check_dataset_tree(config) -> None:
    """A dataset read from disk is there and has the layout of its kind (the prepare stage validates its
    samples later); shapes is generated when missing."""
    if config.data.dataset == "shapes":
        return
    from data_prep.readers import read_dataset
    from pipeline.training.prepare import dataset_root

    read_dataset(config.data.dataset, dataset_root(config))


def _finished(runs, config, stage: str, prepared, needed_by: str) -> str:
    from pipeline.orchestration.orchestrate import finished_stage

    folder, result = finished_stage(runs, config, stage, prepared.inputs_hash)
    if result is None:
        raise UsageError(
            f"no finished {stage} stage for this config ({folder}); run 's4mim {stage} {config.preset}' with the "
            f"same --set options before '{needed_by}', or use 's4mim pipeline run'"
        )
    return result["checkpoint"]


def _run_stage_command(stage, preset, overrides, data_root, ray_address, tracking, local, force=False,
                       checkpoint=None, wait=False) -> dict:  # fmt: skip
    from pipeline.orchestration.orchestrate import claimed, prepare_inputs, run_claimed, stage_folder, tracked

    config = _config(preset, overrides, data_root)
    runs = _runs()
    backend = _backend(config, runs, ray_address, tracking, local, evaluates=stage == "evaluate")
    prepared = prepare_inputs(config, runs)
    if stage == "train":
        from pipeline.training.prepare import check_unlabeled

        check_unlabeled(config, prepared)
        init = _finished(runs, config, "warmup", prepared, "s4mim train")
    elif stage == "evaluate":
        init = str(checkpoint) if checkpoint else _finished(runs, config, "train", prepared, "s4mim evaluate")
    else:
        init = None
    own = None
    if checkpoint is not None:  # scoring another checkpoint: a folder of its own, never the pipeline's cache
        import hashlib

        digest = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:8]
        cache = stage_folder(runs, config, stage, prepared.inputs_hash)
        own = cache.with_name(f"{cache.name}-ckpt{digest}")
    with claimed(runs, config, stage, prepared, force=force, folder=own, wait=wait) as claim:
        if claim.result is not None:
            typer.echo(f"[{stage}] already finished for this config: {claim.folder} (--force reruns it)")
            return claim.result
        with tracked(backend, config, prepared) as run:
            result = run_claimed(backend, config, prepared, claim, init)
    if run.parent_run_id:
        typer.echo(f"MLflow parent run {run.parent_run_id}")
    return result


ForceOpt = Annotated[bool, typer.Option("--force", help="Run the stage again even if it is cached.")]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="When another s4mim holds a stage this command runs, wait until that process lets it go (a pipeline "
        "run holds its stages to its end), then use the finished stage (default: stop with exit code 2).",
    ),
]


@app.command()
def warmup(
    preset: PresetArg,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
    local: LocalOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Teacher warmup: supervised training on the labeled split (a Ray Train job)."""
    set_verbose(verbose)
    result = _run_stage_command("warmup", preset, set_, data_root, ray_address, tracking_uri, local, force, wait=wait)
    if result and rank() == 0:
        typer.echo(f"[warmup] best val mIoU {result['best_miou']:.2f}; checkpoint {result['checkpoint']}")


@app.command()
def train(
    preset: PresetArg,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
    local: LocalOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Semi-supervised training (the preset's variant) from the warmup teacher (a Ray Train job)."""
    set_verbose(verbose)
    result = _run_stage_command("train", preset, set_, data_root, ray_address, tracking_uri, local, force, wait=wait)
    if result and rank() == 0:
        typer.echo(f"[train] best val mIoU {result['best_miou']:.2f}; checkpoint {result['checkpoint']}")


@app.command()
def evaluate(
    preset: PresetArg,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
    local: LocalOpt = False,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint to score (default: the best of the train stage).")
    ] = None,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """mIoU, per-class IoU table and a picture grid on the val set (a Ray Train job)."""
    set_verbose(verbose)
    if checkpoint is not None and not checkpoint.exists():
        raise UsageError(f"--checkpoint {checkpoint}: no such file")
    result = _run_stage_command(
        "evaluate", preset, set_, data_root, ray_address, tracking_uri, local, force, checkpoint, wait
    )
    if result and result.get("iou"):
        for name, value in result["iou"].items():
            typer.echo(f"  {name:<24} {value:6.2f}")
        typer.echo(f"mIoU {result['miou']:.2f}")


@app.command()
def pretrain(
    preset: PresetArg,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Build it again even where a current one exists.")] = False,
) -> None:
    """The ImageNet stand-in for the preset's backbone (model.init=standin): pretrained on a synthetic corpus."""
    from pipeline.paths import require_writable
    from pipeline.training.standin import pretrain as build

    config = _config(preset, set_)
    runs = _runs()
    require_writable(runs)
    result = build(config.model.backbone, config.model.width, runs, force=force, log=typer.echo)
    accuracies = ", ".join(f"{k} {v:.1f}%" for k, v in result["val_accuracy"].items())
    typer.echo(f"[pretrain] stand-in {result['folder']} (val accuracy {accuracies}); use --set model.init=standin")


@pipeline_app.command("run")
def pipeline_run(
    preset: PresetArg,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    force: Annotated[
        list[str] | None, typer.Option(help="Rerun this stage (and the ones after it) even if cached.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and what is cached; run nothing.")] = False,
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
    local: LocalOpt = False,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """prepare -> warmup -> train -> evaluate as Ray Train jobs, skipping stages whose outputs exist."""
    set_verbose(verbose)
    from pipeline.orchestration.orchestrate import plan, run_pipeline, summary_table

    config = _config(preset, set_, data_root)
    runs = _runs()
    planned = plan(config, runs, force or [])
    if dry_run:
        if any(s.status != "cached" for s in planned):  # the run would refuse to start, with this line
            from pipeline.paths import require_writable

            require_writable(runs, write=False)
        typer.echo(f"plan for {config.preset} (variant {config.variant}), outputs under {runs}")
        typer.echo(summary_table(planned))
        return
    if all(s.status == "cached" for s in planned):  # nothing to run: start nothing, write nothing
        typer.echo(f"summary for {config.preset} (variant {config.variant}): every stage is cached")
        typer.echo(summary_table(planned))
        typer.echo("--force STAGE reruns a stage and the ones after it")
        return
    backend = _backend(config, runs, ray_address, tracking_uri, local)
    result = run_pipeline(config, runs, backend, force=force or [], wait=wait)
    if rank() != 0:  # under torchrun the summary is rank 0's to print
        return
    typer.echo("")
    typer.echo(f"summary for {config.preset} (variant {config.variant})")
    typer.echo(summary_table(result.statuses))
    if result.parent_run_id:
        from pipeline.tracking.runs import tracking_uri as resolve_uri

        typer.echo(f"MLflow parent run: {result.parent_run_id}")
        typer.echo(f"open the UI with: make ui   (or: s4mim ui --tracking-uri {resolve_uri(config, tracking_uri)})")


@app.command()
def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="A stage folder or checkpoint file, a preset (its latest train stage), or an MLflow model URI "
            "(models:/s4mim-shapes/1, models:/s4mim-shapes@champion, runs:/RUN_ID/model)."
        ),
    ],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the masks, overlays and predictions.csv.")],
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write a colour overlay (overlay/).")] = False,
    confidence: Annotated[
        bool, typer.Option("--confidence", help="Also write the max-probability map (confidence/).")
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave out unreadable images (listed) instead of failing.")
    ] = False,
    mode: Annotated[
        str | None, typer.Option(help="original or sliding_window (default: the model's evaluation mode).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images of one size predicted together.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[bool, typer.Option("--amp", help="bf16 autocast.")] = False,
    workers: Annotated[int, typer.Option(help="On a Ray cluster: actors predicting side by side.")] = 1,
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Apply a trained model to images: palette masks, overlays, confidence maps and predictions.csv."""
    from pipeline.commands.predict import Options, run_predict

    if batch_size < 1 or workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    options = Options(out.absolute(), overlay, confidence, skip_bad, batch_size)
    address = resolve_address(ray_address)
    outcome = run_predict(model, inputs, options, runs=_runs(), device=device, amp=amp, mode=mode,
                          ray_address=address, workers=workers, tracking_uri=tracking_uri)  # fmt: skip
    for row in outcome.skipped:
        typer.echo(f"skipped {row['item'].path}: {row['error']}")
    rate = outcome.written / max(outcome.seconds, 1e-9)
    typer.echo(f"wrote {outcome.written} mask(s) to {out} ({rate:.1f} img/s); class shares in {outcome.table}")


@app.command()
def sweep(
    spec: Annotated[str, typer.Argument(help="Sweep spec: a name in sweeps/specs (e.g. default) or a JSON file.")],
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Discard an earlier run of this sweep and start over.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ray Tune over a spec's search space, ASHA on val/miou; writes the best config as a preset."""
    set_verbose(verbose)
    from sweeps.runner import run_sweep, trial_table
    from sweeps.spec import load_spec

    sweep_spec = load_spec(spec)
    base = sweep_spec.base_config()
    runs = _runs()
    backend = _backend(base, runs, ray_address, tracking_uri, local=False)
    outcome = run_sweep(sweep_spec, runs, backend, fresh=fresh)
    typer.echo("")
    typer.echo(trial_table(outcome.rows, sweep_spec))
    stopped = sum(r.status == "stopped" for r in outcome.rows)
    if outcome.interrupted:
        done = sum(r.status != "unfinished" for r in outcome.rows)
        typer.echo(f"sweep interrupted: {done} of {len(outcome.rows)} trials ended; run the same command to resume")
        raise typer.Exit(130)
    typer.echo(f"{len(outcome.rows)} trials, {stopped} stopped early by ASHA")
    if outcome.best is not None:
        typer.echo(f"best: trial {outcome.best.trial_id}, {sweep_spec.metric} {outcome.best.metric:.2f}")
        typer.echo(
            f"best config written to {outcome.preset_file}; train it with: s4mim pipeline run {outcome.preset_file}"
        )
    if outcome.parent_run_id:
        typer.echo(f"MLflow sweep run: {outcome.parent_run_id}; open the UI with: make ui")


ExperimentOpt = Annotated[str, typer.Option(help="MLflow experiment.")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="Keep runs with this tag: key=value (repeatable).")]


@runs_app.command("compare")
def runs_compare(
    experiment: ExperimentOpt = "s4mim",
    tag: TagOpt = None,
    stage: Annotated[
        str, typer.Option(help="Which runs: pipeline (parents), sweep, warmup, train or evaluate.")
    ] = "pipeline",
    format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    tracking_uri: TrackingOpt = None,
) -> None:
    """A table of runs grouped by split: mIoU, variant and the parameters that differ."""
    from pipeline.tracking.compare import fetch_runs, parse_tag_filters, render
    from pipeline.tracking.runs import check_tracking_uri
    from pipeline.tracking.runs import tracking_uri as resolve

    if format not in ("table", "csv", "json"):
        raise UsageError(f"--format {format!r}: choose table, csv or json")
    filters = parse_tag_filters(tag or [])
    if "stage" in filters:
        raise UsageError(
            f"--tag stage={filters['stage']} and --stage both choose the stage; use --stage {filters['stage']} alone"
        )
    uri = resolve(None, tracking_uri)
    check_tracking_uri(uri)
    rows = fetch_runs(uri, experiment, filters, stage)
    if not rows:
        raise UsageError(f"no {stage} runs match in experiment {experiment!r}; run 's4mim pipeline run PRESET' first")
    typer.echo(render(rows, format))


@runs_app.command("plot")
def runs_plot(
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("runs/plots/miou.png"),
    sweep: Annotated[str | None, typer.Option(help="Plot a sweep's trials against each swept knob.")] = None,
    experiment: ExperimentOpt = "s4mim",
    tag: TagOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """PNG of mIoU against labeled fraction (a line per variant), or against a sweep's knobs."""
    from pipeline.tracking.compare import fetch_runs, parse_tag_filters, plot_splits, plot_sweep
    from pipeline.tracking.runs import check_tracking_uri
    from pipeline.tracking.runs import tracking_uri as resolve

    filters = parse_tag_filters(tag or [])
    if "stage" in filters:
        raise UsageError(
            f"--tag stage={filters['stage']}: runs plot reads the pipeline runs (a sweep's train runs with "
            "--sweep); leave --tag stage out"
        )
    uri = resolve(None, tracking_uri)
    check_tracking_uri(uri)
    if sweep:
        path = plot_sweep(fetch_runs(uri, experiment, {**filters, "sweep_id": sweep}, "train"), sweep, out)
    else:
        path = plot_splits(fetch_runs(uri, experiment, filters, "pipeline"), out)
    typer.echo(f"wrote {path}")


@runs_app.command("export")
def runs_export(
    dest: Annotated[Path, typer.Argument(help="Folder to write (created; an earlier export there is updated).")],
) -> None:
    """Copy the runs folder's finished stages into DEST, for 'runs import' to find them cached elsewhere.

    DEST gets each finished stage's result and hash, the prepared splits, the warmup teachers and any train
    checkpoint not evaluated yet; the other train checkpoints stay behind. An interrupted warmup or train
    goes with the checkpoints it resumes from, so that the same command resumes it after an import."""
    from pipeline.orchestration.transfer import export_runs

    done = export_runs(_runs(), dest)
    for why in done.left_out:
        typer.echo(f"  left out {why}")
    for stage in done.interrupted:
        typer.echo(f"  interrupted, to resume: {stage}")
    typer.echo(f"exported {len(done.stages)} stage(s) new or changed and {len(done.interrupted)} interrupted, "
               f"{done.files} file(s), {done.bytes / 2**20:.1f} MiB -> {dest}")  # fmt: skip


@runs_app.command("import")
def runs_import(
    source: Annotated[Path, typer.Argument(help="A folder written by 's4mim runs export'.")],
) -> None:
    """Copy into the runs folder ($S4MIM_RUNS) the finished stages of an export that it lacks.

    Interrupted stages come too, and the same command resumes them. Files the runs folder already holds
    are kept, and a stage it holds other files for (an interrupted run of its own) is left out."""
    from pipeline.orchestration.transfer import import_runs

    done = import_runs(source, _runs())
    for why in done.left_out:
        typer.echo(f"  left out {why}")
    for stage in done.interrupted:
        typer.echo(f"  interrupted, resumes with the command that started it: {stage}")
    typer.echo(f"imported {len(done.stages)} finished stage(s) and {len(done.interrupted)} interrupted, "
               f"{done.files} file(s), {done.bytes / 2**20:.1f} MiB -> {_runs()}")  # fmt: skip


@app.command()
def bench(
    device: Annotated[
        str, typer.Option(help="cpu (shapes-1/8 model) or cuda (DeepLabV3+ ResNet-101, crop 321).")
    ] = "cpu",
    steps: Annotated[int, typer.Option(help="Measured steps per row (after the warm-up steps).")] = 20,
    warmup: Annotated[int, typer.Option(help="Unmeasured steps first.")] = 3,
    out: Annotated[Path, typer.Option(help="JSON file the figures are kept in (one entry per device).")] = Path(
        "bench/results.json"
    ),
    compile: Annotated[bool, typer.Option("--compile", help="GPU: also time torch.compile.")] = False,
    ray_epoch: Annotated[
        bool, typer.Option("--ray-epoch/--no-ray-epoch", help="CPU: also time a Ray Train epoch against a plain one.")
    ] = True,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="A tiny model and batch: a smoke test of the benchmark.")
    ] = False,
) -> None:
    """Median step time of supervised, UniMatch and S4MIM steps (and each S4MIM term alone); JSON last line."""
    from pipeline.commands.bench import print_report, run_bench

    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: choose cpu or cuda")
    if steps < 1 or warmup < 0:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    report = run_bench(device, steps, warmup, out, compile_model=compile, with_ray=ray_epoch, tiny=tiny)
    print_report(report)


@app.command()
def quality(
    seeds: Annotated[
        list[int] | None, typer.Option("--seeds", help="Training seeds (repeatable; default 0 1 2).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Train-stage epochs, the same for every variant (default: the preset's).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Steps per train epoch (default: the preset's).")] = None,
    synth_seed: Annotated[
        list[int] | None,
        typer.Option(
            "--synth-seed",
            help="Generator seed of the shapes dataset: 0 (the default) is the development data every choice is "
            "made on; others are held out for confirming them (3 and 4 on the testbed: 1 and 2 were looked at in "
            "the short regime's diagnosis). Repeat it to pool held-out datasets in one table, each (generator "
            "seed, training seed) pair a column.",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Labeled split: 1/32, 1/16 or 1/8 on the testbed (default 1/32); 1/16, 1/8, 1/4 or 1/2 in the "
            "short regime (default 1/8)."
        ),
    ] = None,
    regime: Annotated[
        str,
        typer.Option(
            help="testbed: the shapes48-* presets, cheap enough to train every run to convergence (20,000 steps; "
            "docs/shapes.md); short: the shapes-* presets of the first tables (a few hundred steps)."
        ),
    ] = DEFAULT_REGIME,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines", help="Only the baselines (both supervised protocols and unimatch): for choosing a regime."
        ),
    ] = False,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="Only this row (repeatable), with unimatch, the reference: supervised-steps, supervised-epochs, "
            "unimatch, mim, cmim, cmim-fa or s4mim. For a knob trial that needs only the rows that read the knob.",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            help="Runs trained side by side, each with cpu_count / jobs threads (make quality uses 2: on a 2-core "
            "CPU two one-thread runs beat one two-thread run)."
        ),
    ] = 1,
    docs: Annotated[Path, typer.Option(help="Folder for the results table and chart.")] = Path("docs"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List each run of the table, cached or to train; run nothing.")
    ] = False,
    trial: Annotated[
        list[str] | None,
        typer.Option(
            "--trial",
            help="A knob under trial, key=value as --set (repeatable): the table also sets each row it changes "
            "against the same row without it, where the stage cache holds that run.",
        ),
    ] = None,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    ray_address: RayAddressOpt = None,
    tracking_uri: TrackingOpt = None,
    local: LocalOpt = False,
) -> None:
    """The S4MIM ablation on shapes (7 variants x seeds, one fixed budget); writes docs/results-<regime>-….md."""
    from pipeline.commands.quality import check_overrides, chosen_variants, preset_for, run_command

    seeds = seeds or [0, 1, 2]
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise UsageError("--epochs and --steps must be at least 1")
    synth_seeds = sorted(set(synth_seed or [0]))
    if synth_seeds[0] < 0:
        raise UsageError("--synth-seed must be 0 or more")
    if len(synth_seeds) > 1 and 0 in synth_seeds:
        raise UsageError("--synth-seed 0 is the development data: pool only held-out seeds (e.g. --synth-seed 3 "
                         "--synth-seed 4), and run seed 0 in a table of its own")  # fmt: skip
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    check_overrides(set_ or [])
    check_overrides(trial or [], "--trial")
    variants = chosen_variants(variant or [], baselines)
    runs = _runs()
    context = [*(set_ or []), f"data.synth_seed={synth_seeds[0]}"]
    preset = preset_for(split, regime)
    base = _config(preset, [*context, *(trial or [])], data_root)
    without = _config(preset, context, data_root) if trial else None
    if len(synth_seeds) > 1 and base.data.root:
        raise UsageError(f"data.root {base.data.root} holds one generated dataset: pool several --synth-seed values "
                         "in their default folders ($S4MIM_DATA/shapes-seed<N>), without --data-root")  # fmt: skip
    if dry_run:
        from pipeline.commands.quality import dry_run_lines

        lines = dry_run_lines(base, seeds, epochs, steps, runs, variants=variants, synth_seeds=synth_seeds)
        typer.echo("\n".join(lines))
        return
    backend = _backend(base, runs, ray_address, tracking_uri, local)
    cells, path, charts = run_command(
        base, seeds, epochs, steps, runs, backend, jobs=jobs, local=local, ray_address=ray_address,
        tracking_uri=tracking_uri, variants=variants, docs=docs, synth_seeds=synth_seeds, trial=trial or [],
        without=without,
    )  # fmt: skip
    for cell in cells:
        typer.echo(f"{cell.variant:<28} {cell.mean:6.2f} ± {cell.std:.2f}")
    typer.echo(f"wrote {path}" + "".join(f", {chart.name}" for chart in charts))


@app.command()
def doctor(ray_address: RayAddressOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """What this machine and cluster offer: torch and CUDA, Ray, storage, MLflow, datasets."""
    from pipeline.commands.doctor import run_doctor

    raise typer.Exit(run_doctor(ray_address, tracking_uri))


@app.command()
def ui(
    tracking_uri: TrackingOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 5000,
    experiment: ExperimentOpt = "s4mim",
) -> None:
    """Serve the MLflow UI for the project's store on 127.0.0.1, and print the URL of its runs table."""
    from pipeline.tracking.ui import serve

    raise typer.Exit(serve(tracking_uri, port, experiment))


INTERRUPTED_HINT = "interrupted; run the same command again to resume"


def main() -> None:
    """Entry point: usage and user errors become one line on stderr and exit code 2."""
    debug = "--debug" in sys.argv[1:]
    try:
        try:
            with signals_as_interrupt():  # SIGTERM and SIGHUP end the command as Ctrl-C does
                code = app(prog_name="s4mim", standalone_mode=False)  # typer.Exit's code, or 130 for Ctrl-C
        except typer.Abort as exc:
            # click turns an EOFError into Abort as it does Ctrl-C; no command here reads a prompt, so an
            # EOFError (an empty or truncated pickle, a connection closed) is a fault, not a stop: report it as one.
            if isinstance(exc.__cause__, EOFError):
                raise exc.__cause__ from None
            raise
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # typer turns Ctrl-C into one or the other, by release
        code = 130
    except Exception as exc:
        if _is_command_line_error(exc):
            _report_command_line_error(exc)
        user_error = find_user_error(exc)
        if debug or user_error is None:
            raise
        typer.echo(f"error: {_one_line(user_error)}", err=True)
        sys.exit(2)
    if code == 130:
        typer.echo(INTERRUPTED_HINT, err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


def _is_command_line_error(exc: Exception) -> bool:
    """A parse error of the command line. Typer raises those of the click it carries (its own copy in
    newer releases, click itself in older ones), which share no base class; what they share is click's
    interface: an ``exit_code`` and a ``format_message()``."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _report_command_line_error(exc: Exception) -> None:
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer
        typer.echo(exc.format_message())
        sys.exit(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    typer.echo(f"error: {_one_line(exc.format_message())}{where}", err=True)
    sys.exit(exc.exit_code)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    main()
