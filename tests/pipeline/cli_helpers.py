"""Run the real ``s4mim`` entry point in this process and capture what a user would see."""

from __future__ import annotations

import sys

import pytest


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
