"""Pytest plugin: the ClickHouse server for the session, and a fresh database per test.

Loaded from tests/conftest.py through ``pytest_plugins``. The server keeps its state in
``<repo>/.tally/test/clickhouse`` on ports 19000/18123. A running one is reused; the last
session using a server that a test session started stops it. Tests that use these fixtures
are marked ``clickhouse``.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from deploy.clickhouse import (
    ClickHouseServer,
    ClickHouseStartError,
    running_clickhouse_server,
    start_clickhouse_server,
    stop_clickhouse_server,
)
from sinks.backends import ClickHouseBackend, EmbeddedClickHouse, ServerClickHouse

REPO_ROOT = Path(__file__).resolve().parents[1]
CLICKHOUSE_STATE_DIR = REPO_ROOT / ".tally" / "test" / "clickhouse"
CLICKHOUSE_TCP_PORT = 19000
CLICKHOUSE_HTTP_PORT = 18123
BACKEND_NAMES = ("embedded", "server")
_SESSIONS_LOCK = CLICKHOUSE_STATE_DIR / ".sessions.lock"
_STARTED_BY_TESTS = CLICKHOUSE_STATE_DIR / ".started-by-tests"

_CLICKHOUSE_FIXTURES = frozenset({"clickhouse_server", "backend"})
# In CI a missing service must fail the run; locally a machine without ClickHouse may skip.
_IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1"}


def clickhouse_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it in CI, where a service that cannot start is a failure."""
    if _IN_CI:
        pytest.fail(f"ClickHouse server did not start: {reason}", pytrace=False)
    pytest.skip(f"ClickHouse server did not start: {reason}")


def unique_database_name() -> str:
    """A database name no other test (or earlier session) uses."""
    return f"test_{uuid.uuid4().hex[:16]}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests using ClickHouse ``clickhouse`` before ``-m`` deselects by marker."""
    for item in items:
        if _CLICKHOUSE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.clickhouse)


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseServer]:
    """The server, shared with any concurrent test session (other engineers, xdist workers).

    Every session holds a shared lock while it uses the server; the last one out stops it,
    but only if a test session started it: a server started by hand is left running.
    """
    CLICKHOUSE_STATE_DIR.mkdir(parents=True, exist_ok=True)
    with _SESSIONS_LOCK.open("a") as sessions:
        fcntl.flock(sessions, fcntl.LOCK_SH)
        started_here = running_clickhouse_server(CLICKHOUSE_STATE_DIR) is None
        try:
            server = start_clickhouse_server(
                CLICKHOUSE_STATE_DIR, tcp_port=CLICKHOUSE_TCP_PORT, http_port=CLICKHOUSE_HTTP_PORT
            )
        except ClickHouseStartError as exc:
            clickhouse_unavailable(str(exc))
        if started_here:
            _STARTED_BY_TESTS.touch()
        yield server
        try:
            fcntl.flock(sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if _STARTED_BY_TESTS.exists():
            stop_clickhouse_server(CLICKHOUSE_STATE_DIR)
            _STARTED_BY_TESTS.unlink()


@pytest.fixture(params=BACKEND_NAMES, ids=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClickHouseBackend]:
    """A fresh, empty database on each backend: a new chdb folder, or a new server database.

    The embedded engine takes one data folder per process, so no other embedded backend may
    be open while this one is.
    """
    database = unique_database_name()
    if request.param == "embedded":
        with EmbeddedClickHouse(tmp_path / "chdb", database=database) as embedded:
            yield embedded
        return
    server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    try:
        with ServerClickHouse(server.host, server.tcp_port, database=database) as remote:
            yield remote
    finally:
        # Its own connection: the test may have closed (or broken) the backend it was given.
        with ServerClickHouse(server.host, server.tcp_port, database="default") as admin:
            admin.execute(f"DROP DATABASE IF EXISTS `{database}`")
