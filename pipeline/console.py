"""Progress output: short lines on stdout from rank 0, so long work is never silent."""

from __future__ import annotations

import os
import sys
import time


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Progress:
    """Prints ``label done/total`` at most every ``interval`` seconds, and at the end."""

    def __init__(self, label: str, interval: float = 5.0):
        self.label, self.interval = label, interval
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.interval:
            self.last = now
            say(f"  {self.label}: {done}/{total}")


def format_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key.split('/')[-1]} {value:.1f}" if "miou" in key else f"{key.split('/')[-1]} {value:.3f}")
    return "  ".join(parts)
