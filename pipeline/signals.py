"""SIGTERM and SIGHUP taken as Ctrl-C is, so that every way of stopping a command ends it cleanly.

``kill``, ``timeout``, a batch scheduler and a closed terminal send SIGTERM or SIGHUP. Left to
Python's default they end the process at once: an MLflow run stays RUNNING for ever, and the runs a
command started in processes of their own (``s4mim quality --jobs 2``) go on without it. Raised as
a ``KeyboardInterrupt`` instead, they take Ctrl-C's path: runs marked KILLED, children stopped, and
the "run the same command again to resume" hint with exit code 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C's KeyboardInterrupt is."""


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGHUP, unless ignored as under nohup) raise ``Stop``."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, frame):
        raise Stop(signal.Signals(signum).name)

    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup the command outlives the terminal
        wanted.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
