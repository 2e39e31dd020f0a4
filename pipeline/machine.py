"""Which machine trained a stage: the same code and data train differently on another CPU."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path


@cache
def machine() -> str:
    """This machine's CPU model, core count and torch build (with the CPU kernels torch picked)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels)")  # fmt: skip


def with_earlier(machines: list[str], state: dict) -> list[str]:
    """``machines`` and those that trained the epochs of the checkpoint ``state`` a stage resumes from
    (a checkpoint written before checkpoints named them says which of its epochs are unaccounted for)."""
    earlier = state.get("machines") or [f"not recorded (epochs 1-{state['epoch'] + 1})"]
    return sorted({*machines, *earlier})
