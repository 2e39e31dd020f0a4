"""``s4mim runs compare`` and ``s4mim runs plot``: read the MLflow store, compare labeled splits.

s4mim runs compare                              # pipeline runs, grouped by split
s4mim runs compare --tag dataset=shapes --format csv
s4mim runs plot --out miou.png                  # mIoU against labeled fraction, a line per variant
s4mim runs plot --sweep shapes-1_8-knobs        # mIoU against each swept knob
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from data_prep.atomic import atomic_path
from pipeline.errors import UsageError


@dataclass
class RunRow:
    run_id: str
    name: str
    split: str
    variant: str
    stage: str
    miou: float | None
    labeled_fraction: float | None
    params: dict[str, str]
    tags: dict[str, str]


def _client(uri: str):
    from mlflow import MlflowClient

    from pipeline.tracking.runs import Tracker

    Tracker(uri)  # quiets mlflow's logging
    return MlflowClient(tracking_uri=uri)


def parse_tag_filters(filters: list[str]) -> dict[str, str]:
    out = {}
    for item in filters:
        if "=" not in item:
            raise UsageError(f"--tag {item!r}: expected key=value, e.g. --tag split=shapes-1/8")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _tag_clause(key: str, value: str) -> str:
    """One ``tags.`key` = 'value'`` clause of an MLflow filter string. MLflow has no escapes: a value is
    quoted with whichever quote it does not hold, and a key with backticks."""
    if "`" in key:
        raise UsageError(f"--tag {key}={value}: a tag key with a backtick (`) cannot be searched in MLflow")
    if "'" not in value:
        return f"tags.`{key}` = '{value}'"
    if '"' not in value:
        return f'tags.`{key}` = "{value}"'
    raise UsageError(f"--tag {key}={value}: MLflow cannot search a value holding both ' and \"; filter on another tag")


def fetch_runs(uri: str, experiment: str, tags: dict[str, str], stage: str | None = "pipeline") -> list[RunRow]:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise UsageError(
            f"no MLflow experiment {experiment!r} at {uri}; experiments there: {', '.join(names) or 'none'}"
        )
    clauses = [_tag_clause(k, v) for k, v in ({"stage": stage} if stage else {}).items() | tags.items()]
    runs = client.search_runs([found.experiment_id], " and ".join(clauses), max_results=5000)
    rows = []
    for run in runs:
        t, m = run.data.tags, run.data.metrics
        miou = m.get("val/miou", m.get("best/val/miou"))
        fraction = t.get("labeled_fraction")
        rows.append(
            RunRow(
                run_id=run.info.run_id,
                name=run.info.run_name or "",
                split=t.get("split", "?"),
                variant=t.get("variant", "?"),
                stage=t.get("stage", "?"),
                miou=miou,
                labeled_fraction=float(fraction) if fraction else _fraction_of(t.get("split", "")),
                params=dict(run.data.params),
                tags=dict(t),
            )
        )
    return sorted(rows, key=lambda r: (r.split.split("-")[0], r.labeled_fraction or 0, r.split, r.variant, r.name))


def _fraction_of(split: str) -> float | None:
    tail = split.rsplit("-", 1)[-1]
    try:
        return float(Fraction(tail)) if "/" in tail else None
    except (ValueError, ZeroDivisionError):
        return None


def differing_params(rows: list[RunRow]) -> list[str]:
    """Params whose value differs between the runs that have them (runs logged by an older s4mim lack
    some keys; a missing key is not a difference)."""
    keys = sorted({k for r in rows for k in r.params} - {"data.split", "preset"})
    return [k for k in keys if len({r.params[k] for r in rows if k in r.params}) > 1]


def render(rows: list[RunRow], fmt: str) -> str:
    params = differing_params(rows)
    header = ["split", "variant", "val/miou", "model", "run", *params]
    records = [
        [r.split, r.variant, f"{r.miou:.2f}" if r.miou is not None else "-", r.tags.get("registered_model", "-"),
         f"{r.name} ({r.run_id[:8]})", *[r.params.get(k, "-") for k in params]]
        for r in rows
    ]  # fmt: skip
    if fmt == "json":
        out = [
            {"split": r.split, "variant": r.variant, "val/miou": r.miou, "model": r.tags.get("registered_model"),
             "run_id": r.run_id, "name": r.name, "stage": r.stage, "labeled_fraction": r.labeled_fraction,
             "params": {k: r.params.get(k) for k in params}}
            for r in rows
        ]  # fmt: skip
        return json.dumps(out, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(records)
        return buffer.getvalue()
    widths = [max(len(str(x)) for x in col) for col in zip(header, *records)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    previous = None
    for record in records:
        if previous is not None and record[0] != previous:
            lines.append("")
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(record, widths)))
        previous = record[0]
    return "\n".join(lines)


def plot_splits(rows: list[RunRow], out: Path) -> Path:
    """mIoU against labeled fraction, one line per variant (and dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.miou is not None and r.labeled_fraction]
    if not points:
        raise UsageError("no runs with both val/miou and a labeled fraction to plot; run 's4mim pipeline run' first")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key in sorted({(r.split.split("-")[0], r.variant) for r in points}):
        series = sorted((r.labeled_fraction, r.miou) for r in points if (r.split.split("-")[0], r.variant) == key)
        xs, ys = zip(*series)
        ax.plot(xs, ys, marker="o", label=f"{key[0]} {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labeled fraction of the train set")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def plot_sweep(rows: list[RunRow], sweep: str, out: Path) -> Path:
    """mIoU against each swept knob, one panel per knob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise UsageError(f"no trials of sweep {sweep!r} in the store; run 's4mim sweep' first")
    knobs = [k for k in differing_params(rows) if _numeric(rows, k)]
    if not knobs:
        raise UsageError(f"the trials of sweep {sweep!r} differ in no numeric parameter")
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.2 * len(knobs), 3.2), dpi=120, squeeze=False)
    for ax, knob in zip(axes[0], knobs):
        pts = [(float(r.params[knob]), r.miou) for r in rows if r.miou is not None and knob in r.params]
        stopped = [(float(r.params[knob]), r.miou) for r in rows
                   if r.tags.get("stopped_by") and r.miou is not None and knob in r.params]  # fmt: skip
        ax.scatter(*zip(*pts), label="trials") if pts else None
        ax.scatter(*zip(*stopped), marker="x", color="grey", label="stopped by ASHA") if stopped else None
        ax.set_xlabel(knob)
        ax.set_ylabel("val mIoU (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep {sweep}")
    fig.tight_layout()
    return _save(fig, out)


def _numeric(rows: list[RunRow], key: str) -> bool:
    try:
        [float(r.params[key]) for r in rows if key in r.params]
        return True
    except ValueError:
        return False


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(Path(out)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)
