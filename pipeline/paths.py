"""Default locations: run outputs under ``runs/`` ($S4MIM_RUNS), datasets under ``data/`` ($S4MIM_DATA)."""

from __future__ import annotations

import os
from pathlib import Path


def runs_dir() -> Path:
    return Path(os.environ.get("S4MIM_RUNS", "runs")).expanduser().absolute()


def data_dir() -> Path:
    return Path(os.environ.get("S4MIM_DATA", "data")).expanduser().absolute()


def slug(name: str) -> str:
    """A preset name as a path component: ``voc-1/8`` -> ``voc-1_8``."""
    return name.replace("/", "_").replace(os.sep, "_").replace(" ", "_")
