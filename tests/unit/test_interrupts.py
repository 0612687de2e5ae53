"""SIGINT and SIGTERM: held while a child starts, raised once, never twice."""

import os
import signal
from collections.abc import Iterator

import pytest

from deploy import interrupts
from deploy.interrupts import Interrupted, install_interrupt_handlers, interrupts_deferred


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts._state = interrupts._State()
    install_interrupt_handlers()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    interrupts._state = interrupts._State()


def test_a_signal_inside_the_block_is_raised_when_it_ends(handlers: None):
    """SIGTERM while a child is starting does not cut the start short; it is raised as
    Interrupted (exit code 143) right after the block, once cleanup is registered."""
    reached_end_of_block = False
    with pytest.raises(Interrupted) as caught, interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        reached_end_of_block = True
    assert reached_end_of_block
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143


def test_outside_a_block_the_signal_interrupts_at_once(handlers: None):
    """SIGINT outside any deferral raises Interrupted (a KeyboardInterrupt) immediately."""
    with pytest.raises(KeyboardInterrupt) as caught:
        os.kill(os.getpid(), signal.SIGINT)
    assert isinstance(caught.value, Interrupted) and caught.value.exit_code == 130


def test_a_second_signal_does_not_cut_the_stop_short(handlers: None):
    """After the first interrupt, further signals are ignored while everything stops."""
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert interrupts.stopping()


def test_nested_blocks_raise_once_at_the_outermost(handlers: None):
    """A signal inside nested deferrals waits for the outermost block to end."""
    steps = []
    with pytest.raises(Interrupted):
        with interrupts_deferred():
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
            steps.append("inner ended")
        steps.append("never")
    assert steps == ["inner ended"]
