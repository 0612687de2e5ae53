"""SIGINT and SIGTERM as one orderly stop, never in the middle of starting a child.

A child process must be under cleanup from the instant it exists: between ``fork`` and the
``try`` that would stop it, an interrupt would leave it orphaned. Code that starts a child
wraps the start and the registration of its cleanup in :func:`interrupts_deferred`; a signal
arriving inside is held and raised as :class:`Interrupted` once the block is left, when the
cleanup is in place. Only the first signal interrupts: the stop that follows is not cut
short by a second Ctrl-C.

A Python signal handler runs in the main thread whatever thread the kernel picked, so this
works while other threads run (unlike ``pthread_sigmask``, which masks one thread only).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread for SIGINT or SIGTERM; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    depth = 0
    pending: int | None = None
    stopping = False
    signum: int | None = None
    installed = False


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _state.stopping:
        return  # already stopping in order; a second Ctrl-C must not cut the stop short
    if _state.depth:
        _state.pending = _state.pending or signum
        return
    _state.stopping, _state.signum = True, signum
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """A checkpoint for the main loops (replay, drain, supervise): raise Interrupted again if
    a stop was requested. A library that catches BaseException (kafka-python's event loop
    does) can swallow the first raise; without this the command would go on, deaf to the
    signals that follow. Never call it from cleanup code."""
    if _state.stopping and _state.signum is not None:
        raise Interrupted(_state.signum)


def install_interrupt_handlers() -> None:
    """Route SIGINT and SIGTERM through this module. Main thread only; idempotent."""
    for signum in _HANDLED:
        signal.signal(signum, _on_signal)
    _state.installed = True


def ignore_interrupts_from_now() -> None:
    """For the last steps of a command that has stopped everything: a late SIGINT or SIGTERM
    is ignored. Python's own shutdown puts the default action back for signals that have a
    Python handler, which would turn a signal in the last milliseconds into death by it."""
    if _state.installed:
        for signum in _HANDLED:
            signal.signal(signum, signal.SIG_IGN)


def stopping() -> bool:
    """Whether an interrupt has been raised: the process is on its way out."""
    return _state.stopping


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is left, then raise :class:`Interrupted`.

    Outside the main thread, or before handlers are installed, it holds nothing and does
    nothing (Python delivers signals to the main thread only).
    """
    if not _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _state.depth and _state.pending is not None and not _state.stopping:
            signum, _state.pending = _state.pending, None
            _state.stopping, _state.signum = True, signum
            raise Interrupted(signum)
