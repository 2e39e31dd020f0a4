"""Run ``s4mim`` the way a user does: in this process for speed, or the installed entry point as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

S4MIM = Path(sys.executable).parent / "s4mim"  # the console script `pip install` made for this environment


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    argv = sys.argv
    sys.argv = ["s4mim", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
            raise SystemExit(0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else int(code)), out.out, out.err


def run_s4mim(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """The installed ``s4mim`` command as a subprocess; ``env`` is added to this process's environment."""
    assert S4MIM.is_file(), f"{S4MIM} is missing: install the project (make install)"
    return subprocess.run(
        [str(S4MIM), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        timeout=timeout,
        cwd=cwd,
    )


def one_line_error(err: str) -> str:
    """The only line on stderr: an ``error:`` line, with no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under ``root`` with its size, mtime and mode: equal before and after means untouched."""
    root = Path(root)
    if root.is_file():
        stat = root.stat()
        return {".": (stat.st_size, stat.st_mtime_ns, stat.st_mode)}
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, stat.st_mode)
    return out
