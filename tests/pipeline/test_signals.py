"""SIGTERM inside ``signals_as_interrupt``: Ctrl-C's KeyboardInterrupt, or the Ctrl-C handler a library set."""

import os
import signal

import pytest

from pipeline.signals import Stop, retake_stop_signals, signals_as_interrupt


def test_sigterm_raises_stop_and_the_handlers_come_back_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stop), signals_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_goes_to_a_library_s_own_ctrl_c_handler():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with signals_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)  # no exception: the library's handler ends its work its way
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIGINT]


def test_retake_wins_sigterm_back_from_a_library_inside_the_block_only():
    with pytest.raises(Stop), signals_as_interrupt():
        with signals_as_interrupt():  # an inner block ends; the outer one is still open
            pass
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as ray.init sets its own (which exits)
        retake_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    retake_stop_signals()  # outside a block it leaves the handlers alone
    assert signal.getsignal(signal.SIGTERM) is before
