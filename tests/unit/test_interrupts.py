"""SIGINT and SIGTERM: held while a child starts, raised once, never twice."""

import contextlib
import os
import signal

import pytest

from deploy import interrupts
from deploy.interrupts import (
    Interrupted,
    ignore_interrupts_from_now,
    interrupts_deferred,
    raise_if_interrupted,
)


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


def test_after_the_stop_a_late_signal_is_ignored(handlers: None):
    """Once a command has stopped everything, a late SIGTERM neither raises nor kills."""
    ignore_interrupts_from_now()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_swallowed_interrupt_is_raised_again_at_the_next_checkpoint(handlers: None):
    """A library that catches BaseException swallows the first Interrupted; the main loop's
    next checkpoint raises it again, so the command still stops (and is never deaf)."""
    with contextlib.suppress(BaseException):  # as kafka-python's event loop does
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        raise_if_interrupted()
    assert caught.value.exit_code == 143


def test_without_a_stop_the_checkpoint_does_nothing(handlers: None):
    """No signal, no raise."""
    raise_if_interrupted()
