"""`tally clickhouse start` as a user runs it: it prints the variables that reach the server
it started (the path of the password file, never the password), ready for a shell's eval.

The server runs in a temporary state folder on a free native port, so the session's server
(tests/clickhouse_fixtures.py) is never disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.clickhouse import stop_clickhouse_server
from deploy.services.ports import free_ports
from deploy.settings import load_settings
from deploy.wiring import open_backend
from sinks.backends import ServerClickHouse
from tests.clickhouse_fixtures import clickhouse_unavailable

pytestmark = pytest.mark.clickhouse

TIMEOUT_S = 120


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state folder whose server, if the test leaves one, is stopped afterwards."""
    folder = tmp_path / "state"
    yield folder
    stop_clickhouse_server(folder / "clickhouse-server")


def _tally(state_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env |= {"TALLY_STATE_DIR": str(state_dir), **extra}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def _exported_by(stdout: str) -> dict[str, str]:
    """The TALLY_* variables a shell has after ``eval "$(tally clickhouse start)"``."""
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1" && env -0', "bash", stdout],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    pairs = (item.partition("=") for item in shell.stdout.split("\0") if item)
    return {name: value for name, _, value in pairs if name.startswith("TALLY_")}


def test_start_prints_the_exports_that_reach_the_server(state_dir: Path) -> None:
    """The printed exports, evaluated by a shell, are settings that open the server as the
    `tally` user (SELECT 1 answers); the password is in a 0600 file and in no output."""
    (tcp_port,) = free_ports(1)
    try:
        started = _tally(state_dir, "clickhouse", "start", TALLY_CLICKHOUSE_PORT=str(tcp_port))
        if started.returncode != 0 and "ClickHouseStartError" in started.stderr:
            clickhouse_unavailable(started.stderr.strip().splitlines()[-1])
        assert started.returncode == 0, started.stderr[-3000:]

        exported = _exported_by(started.stdout)
        password_file = Path(exported["TALLY_CLICKHOUSE_PASSWORD_FILE"])
        assert exported == {
            "TALLY_CLICKHOUSE_BACKEND": "server",
            "TALLY_CLICKHOUSE_HOST": "127.0.0.1",
            "TALLY_CLICKHOUSE_PORT": str(tcp_port),
            "TALLY_CLICKHOUSE_USER": "tally",
            "TALLY_CLICKHOUSE_PASSWORD_FILE": str(password_file),
        }
        assert password_file.is_absolute() and password_file.is_relative_to(state_dir.resolve())
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        assert password and password not in started.stdout + started.stderr

        backend = open_backend(load_settings(exported))
        try:
            assert isinstance(backend, ServerClickHouse)
            assert backend.query("SELECT 1") == [(1,)]
            assert backend.query(
                "SELECT count() > 0 FROM system.processes WHERE user = 'tally'"
            ) == [(1,)]
        finally:
            backend.close()

        again = _tally(state_dir, "clickhouse", "start", TALLY_CLICKHOUSE_PORT=str(tcp_port))
        assert again.returncode == 0, again.stderr[-3000:]
        assert _exported_by(again.stdout) == exported, "a second start names the same server"
        assert password not in again.stdout + again.stderr
    finally:
        stopped = _tally(state_dir, "clickhouse", "stop")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert stopped.stdout.strip() == "stopped"
