"""Pytest plugin: the ClickHouse server for the session, and a fresh database per test.

Loaded from tests/conftest.py through ``pytest_plugins``. The server keeps its state in
``<repo>/.tally/test/clickhouse`` on ports taken free when it starts. A running one is reused;
the last session using a server that a test session started stops it. Tests that use these fixtures
are marked ``clickhouse``.
"""

from __future__ import annotations

import contextlib
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
from deploy.services.ports import free_ports
from sinks.backends import ClickHouseBackend, EmbeddedClickHouse, ServerClickHouse
from tests.services import service_unavailable, shared_between_sessions

REPO_ROOT = Path(__file__).resolve().parents[1]
CLICKHOUSE_STATE_DIR = REPO_ROOT / ".tally" / "test" / "clickhouse"
BACKEND_NAMES = ("embedded", "server")

_CLICKHOUSE_FIXTURES = frozenset({"clickhouse_server", "backend"})


def clickhouse_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it in CI, where a service that cannot start is a failure."""
    service_unavailable(f"ClickHouse server did not start: {reason}")


@contextlib.contextmanager
def private_clickhouse_server(state: Path) -> Iterator[ClickHouseServer]:
    """A server of the test's own under ``state``, on free ports, stopped on the way out (for
    tests that stop it or log in to it; others share ``clickhouse_server``)."""
    tcp_port, http_port = free_ports(2)
    try:
        try:
            yield start_clickhouse_server(state, tcp_port=tcp_port, http_port=http_port)
        except ClickHouseStartError as exc:
            clickhouse_unavailable(str(exc))
    finally:
        stop_clickhouse_server(state)


def unique_database_name() -> str:
    """A database name no other test (or earlier session) uses."""
    return f"test_{uuid.uuid4().hex[:16]}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests using ClickHouse ``clickhouse`` before ``-m`` deselects by marker."""
    for item in items:
        if _CLICKHOUSE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.clickhouse)


def _start_on_free_ports() -> ClickHouseServer:
    tcp_port, http_port = free_ports(2)
    try:
        return start_clickhouse_server(CLICKHOUSE_STATE_DIR, tcp_port=tcp_port, http_port=http_port)
    except ClickHouseStartError as exc:
        clickhouse_unavailable(str(exc))


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseServer]:
    """The server, shared with any concurrent test session on this checkout."""
    with shared_between_sessions(
        CLICKHOUSE_STATE_DIR,
        running=lambda: running_clickhouse_server(CLICKHOUSE_STATE_DIR),
        start=_start_on_free_ports,
        stop=lambda: stop_clickhouse_server(CLICKHOUSE_STATE_DIR),
    ) as server:
        yield server


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
