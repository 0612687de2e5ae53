"""Starting and stopping Debian's ClickHouse server from deploy/clickhouse.py.

Each test runs its own server in a temporary state folder on free ports, so the session's
server (tests/clickhouse_fixtures.py) is never disturbed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.clickhouse import (
    ClickHouseServer,
    ClickHouseStartError,
    running_clickhouse_server,
    start_clickhouse_server,
    stop_clickhouse_server,
)
from deploy.services.ports import free_ports
from sinks.backends import ServerClickHouse
from tests.clickhouse_fixtures import clickhouse_unavailable

pytestmark = pytest.mark.clickhouse


def _processes_using(config: Path) -> list[int]:
    """Pids of live processes whose command line names this config file."""
    marker = f"--config-file={config}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if marker in argv and state != "Z":
            found.append(int(entry.name))
    return found


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state folder whose server, if a test leaves one, is stopped afterwards."""
    folder = tmp_path / "clickhouse"
    yield folder
    stop_clickhouse_server(folder)


def _start(state_dir: Path, tcp_port: int, http_port: int) -> ClickHouseServer:
    try:
        return start_clickhouse_server(state_dir, tcp_port=tcp_port, http_port=http_port)
    except ClickHouseStartError as exc:
        clickhouse_unavailable(str(exc))


def test_start_is_idempotent(state_dir: Path) -> None:
    """A second start on the same state folder returns the running server, same pid."""
    tcp_port, http_port = free_ports(2)

    first = _start(state_dir, tcp_port, http_port)
    second = start_clickhouse_server(state_dir, tcp_port=tcp_port, http_port=http_port)

    assert second == first
    assert running_clickhouse_server(state_dir) == first
    assert _processes_using(state_dir.resolve() / "config.xml") == [first.pid]
    assert first.log_path.is_relative_to(state_dir.resolve())


def test_server_keeps_every_file_under_its_state_folder(state_dir: Path) -> None:
    """Data, logs and pid file land in the state folder, and the server runs in UTC."""
    server = _start(state_dir, *free_ports(2))

    with ServerClickHouse(server.host, server.tcp_port, database="layout") as backend:
        backend.execute("CREATE TABLE t (x UInt8) ENGINE = MergeTree() ORDER BY x")
        backend.insert("t", ["x"], [(1,)])
        assert backend.query("SELECT timezone()")[0][0] in {"UTC", "Etc/UTC"}

    assert (state_dir / "data" / "data" / "layout" / "t").is_dir()
    assert (state_dir / "data" / "metadata" / "layout").is_dir()
    assert server.log_path.is_file()
    assert (state_dir / "clickhouse-server.pid").read_text().strip() == str(server.pid)


def test_stop_leaves_no_process(state_dir: Path) -> None:
    """Stop ends the server's whole process group, frees its ports, and reports it stopped."""
    server = _start(state_dir, *free_ports(2))

    assert stop_clickhouse_server(state_dir) is True

    assert _processes_using(state_dir.resolve() / "config.xml") == []
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)
    assert not _port_open(server.tcp_port)
    assert not _port_open(server.http_port)
    assert running_clickhouse_server(state_dir) is None
    assert stop_clickhouse_server(state_dir) is False


def test_a_taken_port_fails_with_one_clear_line(state_dir: Path) -> None:
    """Start refuses, in one line, a port another process already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]

        with pytest.raises(ClickHouseStartError, match=f"port {taken} .* already in use") as err:
            start_clickhouse_server(state_dir, tcp_port=taken, http_port=free_ports(1)[0])

    assert "\n" not in str(err.value)
