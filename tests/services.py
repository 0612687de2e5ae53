"""What the service fixtures share: free ports, the CI rule for a missing service, and one
service used by several test sessions at once.

Ports are taken free per session, so two checkouts (or an engineer's broker) on one machine
never collide; a collision can then never turn into a skip.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from tests.profile import IN_CI

_Service = TypeVar("_Service")


def service_unavailable(message: str) -> NoReturn:
    """Skip the test, or fail it in CI, where a service that cannot start is a failure."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def shared_between_sessions(
    state_dir: Path,
    *,
    running: Callable[[], _Service | None],
    start: Callable[[], _Service],
    stop: Callable[[], object],
) -> Iterator[_Service]:
    """The service of ``state_dir``: reused if running, else started; stopped by the last
    session using it, and only if a test session started it (one started by hand stays).

    Every session holds a shared lock while it uses the service; starting happens under the
    exclusive lock, so two sessions never start two services on different ports.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    marker = state_dir / ".started-by-tests"
    with (state_dir / ".sessions.lock").open("a") as sessions:
        fcntl.flock(sessions, fcntl.LOCK_EX)
        service = running()
        if service is None:
            service = start()
            marker.touch()
        fcntl.flock(sessions, fcntl.LOCK_SH)
        try:
            yield service
        finally:
            try:
                fcntl.flock(sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session still uses it
            else:
                if marker.exists():
                    stop()
                    marker.unlink()
