"""Worker processes and Ctrl-C.

Ctrl-C sends SIGINT to every process of the terminal's group. Worker processes (DataLoader workers, the
pools that draw ``shapes``) leave it to the main process, which stops them. Two moments need care:

- a worker forked but not yet ignoring SIGINT would die of it, with a traceback of its own;
- a KeyboardInterrupt raised in the main process while it forks can land inside fork's Python hooks
  (``logging`` releases its lock there), which swallow it: the run then goes on as if no key was pressed,
  or fails later with another error.

So DataLoader workers start with Ctrl-C held (:func:`interrupts_held`), and every worker ignores it from
its first step (:func:`ignore_interrupts`). The pools that draw ``shapes`` and the stand-in's corpus do
not hold it yet: their code is in the shipped stand-in's fingerprint, and changing it means building and
shipping the stand-in again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def ignore_interrupts(*_worker_id: int) -> None:
    """A worker process's first step (DataLoader ``worker_init_fn``, a pool's ``initializer``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C for the block, then deliver it: start worker processes inside.

    A SIGINT that arrives in the block is recorded, and raised again once the block ends, under the
    handler that was in place before (a KeyboardInterrupt, as a rule). Forked workers inherit the
    recording handler, so one pressed while they start is recorded there, until they ignore SIGINT.
    Python takes signals in the main thread only: elsewhere (a Ray Train worker) the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            signal.raise_signal(signal.SIGINT)
