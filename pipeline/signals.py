"""SIGTERM and SIGHUP taken as Ctrl-C is, so that every way of stopping a command ends it cleanly.

``kill``, ``timeout``, a batch scheduler and a closed terminal send SIGTERM or SIGHUP. Left to
Python's default they end the process at once: an MLflow run stays RUNNING for ever, and the runs a
command started in processes of their own (``s4mim quality --jobs 2``) go on without it. Raised as
a ``KeyboardInterrupt`` instead (or handed to a library's own Ctrl-C handler, as Ray Tune's), they
take Ctrl-C's path: runs marked KILLED, children stopped, and the "run the same command again to
resume" hint with exit code 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C's KeyboardInterrupt is."""


_taken = False  # whether a ``signals_as_interrupt`` block is open


def _stop(signum, frame) -> None:
    ctrl_c = signal.getsignal(signal.SIGINT)
    if callable(ctrl_c) and ctrl_c is not signal.default_int_handler:
        ctrl_c(signal.SIGINT, frame)  # a library's own Ctrl-C: Ray Tune ends its trials and saves its state
        return
    raise Stop(signal.Signals(signum).name)


def _wanted() -> list[signal.Signals]:
    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup the command outlives the terminal
        wanted.append(signal.SIGHUP)
    return wanted


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGHUP, unless ignored as under nohup) do what Ctrl-C does."""
    global _taken
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous, outer = {sig: signal.signal(sig, _stop) for sig in _wanted()}, _taken
    _taken = True
    try:
        yield
    finally:
        _taken = outer  # a block within another leaves the outer one open
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def retake_stop_signals() -> None:
    """Take SIGTERM and SIGHUP back from a library that set its own (``ray.init`` makes SIGTERM exit the
    process at once), within an open ``signals_as_interrupt`` block."""
    if _taken and threading.current_thread() is threading.main_thread():
        for sig in _wanted():
            signal.signal(sig, _stop)
