"""What a person sees: the project's own lines, progress bars, and nothing of Ray's or MLflow's chatter.

- ``say`` and ``warn``: short lines on stdout / stderr, from rank 0 only.
- ``progress(label)``: a rich progress bar when stdout is a terminal, a plain line every few seconds
  when it is a file or a pipe (a CI log, ``make run > out``).
- ``event``: how a Ray worker hands a line or a progress update to the driver. Worker output reaches
  the driver through Ray's log forwarding; ``pipeline.backends.worker_logs`` sends what carries ``EVENT_MARK``
  to the console and everything else to the stage's log file.
- ``chatter_into(path)``: the Python loggers of Ray, MLflow and their libraries write into ``path``
  (the stage folder's ``stage.log``) instead of the console, for the block; ``--verbose`` shows them too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from pipeline.paths import rank

EVENT_MARK = "@s4mim-event "  # a worker's stdout line that is meant for the console, as JSON after the mark
PLAIN_INTERVAL = 10.0  # seconds between plain progress lines when stdout is not a terminal
CHATTY_LOGGERS = ("ray", "mlflow", "alembic", "huey", "sqlalchemy", "urllib3", "filelock", "py.warnings")
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
PACKAGES = ("pipeline", "model", "data_prep", "sweeps")
_verbose = False
_capturing = 0  # chatter_into blocks open (they nest: a command's log, then a stage's)


def is_main_process() -> bool:
    return rank() == 0


def set_verbose(on: bool) -> None:
    """``--verbose``: Ray's and MLflow's own output on the console as well as in the stage's log."""
    global _verbose
    _verbose = on


def verbose() -> bool:
    return _verbose


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def format_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key.split('/')[-1]} {value:.1f}" if "miou" in key else f"{key.split('/')[-1]} {value:.3f}")
    return "  ".join(parts)


# -- progress ------------------------------------------------------------------------------------


class LoopProgress:
    """``progress(done, total, detail="")`` for one loop: a rich bar on a terminal, else a plain line
    at most every ``PLAIN_INTERVAL`` seconds, and at the end unless ``final`` is off (for a loop whose
    caller sums it up in a line of its own, as an epoch's metrics do). ``close()`` takes the bar away."""

    def __init__(self, label: str, *, final: bool = True, terminal: bool | None = None,
                 interval: float = PLAIN_INTERVAL):  # fmt: skip
        self.label, self.interval, self.final = label, interval, final
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.started = time.monotonic()
        self.last = self.started
        self.bar = self.task = None

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        if not is_main_process():
            return
        if self.terminal:
            self._draw(done, total, detail)
        else:
            now = time.monotonic()
            if (done >= total and self.final) or (done < total and now - self.last >= self.interval):
                self.last = now
                extra = f"  {detail}" if detail else ""
                say(f"  {self.label}: {done}/{total}{extra}  ({now - self.started:.0f} s)")
        if done >= total:
            self.close()

    def _draw(self, done: int, total: int, detail: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.bar is None:
            # transient: the bar makes way for the line that sums the loop up (an epoch's metrics)
            # markup off: "[train]" is a label here, not a rich style tag
            self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[detail]}", markup=False),
                                transient=True)  # fmt: skip
            self.task = self.bar.add_task(self.label, total=total, detail=detail)
            self.bar.start()
        self.bar.update(self.task, completed=done, total=total, detail=detail)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def progress(label: str, *, final: bool = True) -> LoopProgress:
    return LoopProgress(label, final=final)


def counted(items, total: int, report) -> Iterator:
    """``items``, calling ``report(done, total)`` as each is taken and once the last is done."""
    done = 0
    for item in items:
        report(done, total)
        yield item
        done += 1
    report(done, total)


# -- from Ray workers to the driver --------------------------------------------------------------


def event(kind: str, **fields) -> None:
    """A line (``kind="line"``) or a progress update (``kind="progress"``) for the driver's console.

    Written to the real stdout (``sys.stdout.write``: Ray Train turns ``print`` into a log record,
    which would come out a second time), which Ray forwards to the driver.
    """
    sys.stdout.write(EVENT_MARK + json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def parse_event(line: str) -> dict | None:
    if not line.startswith(EVENT_MARK):
        return None
    try:
        return json.loads(line[len(EVENT_MARK) :])
    except json.JSONDecodeError:
        return None


# -- library chatter into a file -----------------------------------------------------------------


@contextmanager
def chatter_into(path: Path) -> Iterator[None]:
    """The block's records of Ray's, MLflow's and their libraries' loggers (and Python warnings) go to
    ``path``, and to stderr as well with ``--verbose``; the loggers are put back as they were after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [handler]
    if _verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    else:  # a warning the project's own code raises is meant for the user
        shown = logging.StreamHandler(sys.stderr)
        shown.addFilter(lambda record: record.name == "py.warnings" and is_project_warning(record.getMessage()))
        handlers.append(shown)
    global _capturing
    saved = {}
    _capturing += 1
    logging.captureWarnings(True)  # warnings.warn through the py.warnings logger, while any block is open
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers, logger.propagate)
        logger.handlers, logger.propagate = list(handlers), False
    try:
        yield
    finally:
        for name, (old, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = old, propagate
        _capturing -= 1
        if not _capturing:
            logging.captureWarnings(False)
        handler.close()


def is_project_warning(text: str) -> bool:
    """A Python warning (``path:line: Category: message``) raised in this project's packages."""
    location = text.split(":", 1)[0].strip()
    return "Warning" in text and any(location.startswith(f"{PROJECT_ROOT}/{package}/") for package in PACKAGES)


@contextmanager
def prints_into(path: Path) -> Iterator[None]:
    """A library call that prints its own progress (MLflow's model registration does, on stderr):
    its prints go to ``path`` (and stay on the console with ``--verbose``)."""
    if _verbose:
        yield
        return
    with open(path, "a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        yield
