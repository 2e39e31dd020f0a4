"""Ctrl-C while worker processes start: it stops the main process, and no worker dies of it.

Each case runs in a fresh interpreter, which presses Ctrl-C (SIGINT to itself) from inside fork itself,
through an ``os.register_at_fork`` hook: the moment a key pressed by a person can land in, made certain.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from data_prep.workers import interrupts_held

LOOP = """
import os, signal, sys
from pipeline.training.stages import Loader
from data_prep.workers import ignore_interrupts

os.register_at_fork({hook}=lambda: os.kill(os.getpid(), signal.SIGINT))
loader = Loader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=ignore_interrupts)
try:
    seen = sum(len(batch) for batch in loader)
except KeyboardInterrupt:
    print("stopped")
    sys.exit(130)
print("finished", seen)
"""


def run_loop(hook: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(LOOP).format(hook=hook)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def test_ctrl_c_in_the_main_process_while_workers_fork_stops_the_loop():
    # Unheld, fork's hooks swallow the KeyboardInterrupt ("Exception ignored in ...") and the loop goes on.
    done = run_loop("after_in_parent")
    assert (done.returncode, done.stdout.strip()) == (130, "stopped"), done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_ctrl_c_in_a_worker_before_its_first_step_leaves_it_working():
    # Unheld, the worker dies of the KeyboardInterrupt before it ignores SIGINT.
    done = run_loop("after_in_child")
    assert (done.returncode, done.stdout.strip()) == (0, "finished 8"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_held_interrupt_is_raised_when_the_block_ends_and_not_before():
    # Python's own handler, whatever this test run inherited (a background job of a script ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a signal is handled between bytecodes: unheld, it would be raised here
                reached = True
        assert reached
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_interrupt_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
