"""Cross-process locks on files: a stage being run, a dataset being generated.

Each lock is an ``flock`` on a lock file, so the kernel releases it when its holder dies, however it
dies: a lock file left behind by a killed process never blocks the next one. The file names its
holder (pid, host and start time) for the message a second process prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.console import say
from pipeline.errors import UsageError

WAITING = "waiting for it to finish"  # ends the line a waiting process prints (``quality`` relays it)


def waiting_line(what: str, holder: str, folder: Path) -> str:
    """The line a process prints when it waits for ``holder``, which runs ``what`` into ``folder``."""
    return f"{what} is running in another s4mim ({holder}), into {folder}; {WAITING}"


def lock_holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its holder wrote it: ``pid 12 on host, since …``."""
    try:
        return Path(path).read_text().strip() or "another process"
    except FileNotFoundError:
        return "another process"


@contextmanager
def file_lock(path: Path, what: str, folder: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock at ``path`` for the block; ``what`` (``"the train stage"``) runs into ``folder``.

    When another process holds it: a ``UsageError`` naming the holder, or with ``wait`` a line saying
    whom this process waits for, and the wait. The lock file is removed when the block ends.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - held until the block ends
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                handle.close()
                raise UsageError(
                    f"{what} is already running in another s4mim ({holder}), into {folder}; wait for it to finish "
                    "(this command then finds it done), or stop that process"
                ) from None
            if not told:
                say(waiting_line(what, holder, folder))
                told = True
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)  # a signal's handler that raises ends the wait
            except BaseException:
                handle.close()
                raise
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the previous holder removed the file between our open and our lock: take the new one
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()
