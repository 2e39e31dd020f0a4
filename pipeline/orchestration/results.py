"""A finished stage's ``result.json`` (and evaluate's table and grid), written through a temporary file.

The stage cache counts a stage as finished when its folder holds a readable ``result.json``: a half
written one is never seen, and an unreadable one reads as unfinished.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.atomic import atomic_path


def write_result(folder: Path, result: dict) -> None:
    with atomic_path(Path(folder) / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")


def read_result(folder: Path) -> dict | None:
    path = Path(folder) / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
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
