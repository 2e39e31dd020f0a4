"""What the environment says about where things are: run outputs under ``runs/`` ($S4MIM_RUNS),
datasets under ``data/`` ($S4MIM_DATA), the Ray cluster ($RAY_ADDRESS) and this process's rank
under torchrun ($RANK)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UsageError


def runs_dir() -> Path:
    return Path(os.environ.get("S4MIM_RUNS", "runs")).expanduser().absolute()


def data_dir() -> Path:
    return Path(os.environ.get("S4MIM_DATA", "data")).expanduser().absolute()


def ray_address(given: str | None = None) -> str | None:
    """The Ray cluster a command joins: ``--ray-address``, else $RAY_ADDRESS, else None (a private local Ray)."""
    return given or os.environ.get("RAY_ADDRESS") or None


def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes torchrun started (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_uri(path: str) -> bool:
    """A storage location given as a URI (s3://, gs://, file://), read through pyarrow's filesystems;
    anything else is a local path."""
    return "://" in path


def slug(name: str) -> str:
    """A preset name as a path component: ``voc-1/8`` -> ``voc-1_8``."""
    return name.replace("/", "_").replace(os.sep, "_").replace(" ", "_")


def unwritable_reason(folder: Path, *, write: bool = True) -> str | None:
    """Why files cannot be created in ``folder`` (made if missing), or None when they can.

    ``write=False`` answers without creating anything (for ``--dry-run``), from the folder's nearest
    existing ancestor: its kind, its file system and its permissions.
    """
    if not write:
        return _unwritable_without_writing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return "it is a file" if folder.is_file() else exc.strerror or type(exc).__name__
    return None


def _unwritable_without_writing(folder: Path) -> str | None:
    import errno

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return "it is a file" if existing == folder else os.strerror(errno.ENOTDIR)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if not os.access(existing, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


def require_writable(runs: Path, *, write: bool = True) -> None:
    """Fail with the fix when the runs folder cannot hold this command's outputs (before any work).

    Everything a command writes (manifests, splits, stages, Ray storage, the default MLflow store)
    lives under it, so this is the one check that names the root cause and its fix.
    """
    reason = unwritable_reason(runs, write=write)
    if reason:
        raise UsageError(f"runs folder {runs} cannot be written ({reason}); set S4MIM_RUNS to a writable folder")
