"""A finished stage's ``result.json`` (and evaluate's table and grid), written through a temporary file.

The stage cache counts a stage as finished when its folder holds a readable ``result.json``: a half
written one is never seen, and an unreadable one reads as unfinished.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.atomic import atomic_path
from pipeline.paths import is_uri


def write_result(folder: Path, result: dict) -> None:
    with atomic_path(Path(folder) / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")


def read_result(folder: Path) -> dict | None:
    """The result in ``folder``, its checkpoint found again if the runs folder has moved (:func:`relocated`)."""
    path = Path(folder) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if isinstance(result.get("checkpoint"), str):
        result["checkpoint"] = relocated(result["checkpoint"], Path(folder))
    return result


def relocated(checkpoint: str, folder: Path) -> str:
    """``checkpoint``, named by the stage in ``folder``, where it lies now.

    Results name checkpoints by absolute path: the stage folder's ``best.pt``, or a checkpoint under the
    Ray storage in the runs folder. A runs folder moved or copied (from a cluster to a laptop, to another
    disk) keeps its layout, so a path that is gone is looked for by its tail under the runs folder that
    holds ``folder`` (``<runs>/stages/<preset>/<stage>``), the longest tail first. URIs, paths that exist
    and paths not found again come back as they are.
    """
    path, folder = Path(checkpoint), folder.resolve()
    if is_uri(checkpoint) or not path.is_absolute() or path.exists() or len(folder.parents) < 3:
        return checkpoint
    found = found_under(folder.parents[2], path)
    return str(found) if found is not None else checkpoint


def found_under(root: Path, path: Path) -> Path | None:
    """Where ``path``, named under another root, lies under ``root``: its longest tail of two parts or more
    (``<folder>/<file>`` at least) that exists there, or None."""
    for start in range(1, len(path.parts) - 1):
        candidate = root.joinpath(*path.parts[start:])
        if candidate.exists():
            return candidate
    return None


def write_evaluation(folder: Path, evaluation, checkpoint: Path) -> dict:
    """Write the per-class IoU table, the picture grid and result.json; return the result."""
    folder = Path(folder)
    with atomic_path(folder / "iou.csv") as tmp:
        tmp.write_text(evaluation.table_csv)
    if evaluation.grid_png:
        with atomic_path(folder / "grid.png") as tmp:
            tmp.write_bytes(evaluation.grid_png)
    result = {"stage": "evaluate", "miou": evaluation.miou, "iou": evaluation.iou, "evaluated": str(checkpoint)}
    write_result(folder, result)
    return result
