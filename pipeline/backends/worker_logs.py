"""Where Ray workers' output goes on the driver: the project's lines to the console, the rest to a file.

Ray forwards every line its workers and actors print to the driver, and by default prints it there
with a ``(RayTrainWorker pid=…)`` prefix in colour, even into a file. ``route_worker_output()``
replaces that printer (the handler Ray registers on its stream dispatcher when ``log_to_driver`` is
on) with ``WorkerOutput``:

- a line marked by ``console.event`` is the project's: a console line, or a progress update that
  drives a progress bar;
- a Python warning raised in the project's sources is shown as a warning;
- anything else (Ray Train's and Ray core's messages, such as the ``core_worker.cc`` line about the
  ``PreemptionWatcher`` actor, MLflow's in the workers) goes, with its plain prefix, to the log file
  of the stage that runs (``into(path)``), and to the console as well with ``--verbose``.

On a failure ``tail(path)`` gives the log's last lines, for the message that reports it.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import console

RAY_PRINTER = "ray_print_logs"  # the name Ray gives its handler in ray._private.worker.connect
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WARNING_LINE = re.compile(r"^(?P<where>/\S+\.py):\d+: \w*Warning: ")


class WorkerOutput:
    """The driver's handler of forwarded worker output (one batch of lines of one process per call)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log = None  # the open log file of the running stage, or None between stages
        self.bars: dict[str, console.LoopProgress] = {}

    def __call__(self, data: dict) -> None:
        who = _prefix(data)
        lines = data.get("lines", [])
        autoscaler = data.get("pid") == "autoscaler"
        if autoscaler:  # the monitor's whole status report comes too: keep its events, as Ray does
            lines = _autoscaler_events(lines)
        with self.lock:
            for line in lines:
                line = ANSI.sub("", line)
                if autoscaler and ("Warning:" in line or "Error:" in line):  # e.g. workers that cannot be placed
                    console.warn(f"Ray autoscaler: {line}")
                self._line(who, line)

    def _line(self, who: str, line: str) -> None:
        found = console.parse_event(line)
        if found is not None:
            self._event(found)
            return
        if self.log is not None:
            self.log.write(f"{who} {line}\n")
            self.log.flush()
        if console.verbose():
            print(f"{who} {line}", file=sys.stderr, flush=True)
        elif WARNING_LINE.match(line) and console.is_project_warning(line):
            console.warn(line)

    def _event(self, found: dict) -> None:
        if found.get("kind") == "line":
            self._close_bars()
            console.say(found.get("text", ""))
        elif found.get("kind") == "progress":
            label = found.get("label", "")
            if label not in self.bars:
                self._close_bars()
                self.bars[label] = console.progress(label, final=False)
            bar = self.bars[label]
            bar(int(found.get("done", 0)), int(found.get("total", 1)), found.get("detail", ""))
            if int(found.get("done", 0)) >= int(found.get("total", 1)):
                self.bars.pop(label, None)

    def _close_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    @contextmanager
    def into(self, path: Path) -> Iterator[None]:
        """Worker output that is not the project's goes to ``path`` (appended) for the block."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            with self.lock:
                previous, self.log = self.log, log
            try:
                yield
            finally:
                with self.lock:
                    self._close_bars()
                    self.log = previous


def _prefix(data: dict) -> str:
    """Ray's own prefix, without its colours: ``(RayTrainWorker pid=123)``."""
    pid = data.get("pid")
    name = data.get("actor_name") or data.get("task_name")
    ip = data.get("ip")
    where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
    return f"({name + ' ' if name else ''}pid={pid}{where})"


def _autoscaler_events(lines: list[str]) -> list[str]:
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return lines
    return list(filter_autoscaler_events(lines))


_output: WorkerOutput | None = None


def route_worker_output() -> WorkerOutput | None:
    """Swap Ray's printer of worker output for ``WorkerOutput`` (once ``ray.init`` has run). Returns it,
    or None where this Ray has no such printer (its output is then left as Ray prints it)."""
    global _output
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return _output
    names = [name for name, _ in dispatcher.handlers]
    if RAY_PRINTER not in names:  # this Ray prints worker output some other way (or not at all)
        return _output
    dispatcher.remove_handler(RAY_PRINTER)  # ray.init adds it again after a ray.shutdown
    if _output is None:
        _output = WorkerOutput()
    if "s4mim" not in names:
        dispatcher.add_handler("s4mim", _output)
    return _output


@contextmanager
def stage_log(path: Path) -> Iterator[Path]:
    """For a stage: its workers' chatter and the driver's Ray and MLflow loggers, all into ``path``."""
    output = _output
    with console.chatter_into(path):
        if output is None:
            yield path
        else:
            with output.into(path):
                yield path


def tail(path: Path, lines: int = 20) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return [line.rstrip("\n") for line in deque(log, maxlen=lines)]
    except OSError:
        return []
