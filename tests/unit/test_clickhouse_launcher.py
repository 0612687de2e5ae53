"""The ClickHouse launcher's failure paths, which need no server: a binary that dies at
start-up, and no binary at all."""

import shutil
from pathlib import Path

import pytest

from deploy import clickhouse
from deploy.clickhouse import ClickHouseStartError, start_clickhouse_server
from deploy.services.ports import free_ports


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "clickhouse"


def test_an_early_exit_names_the_log_and_leaves_nothing(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that dies during start-up raises an error naming its log, with its last lines."""
    script = "echo 'cannot open data folder' >&2; exit 3"
    monkeypatch.setattr(clickhouse, "find_clickhouse_server_command", lambda: ["sh", "-c", script])

    tcp_port, http_port = free_ports(2)
    with pytest.raises(ClickHouseStartError) as err:
        start_clickhouse_server(state_dir, tcp_port=tcp_port, http_port=http_port)

    message = str(err.value)
    assert message.splitlines()[0].startswith("clickhouse-server exited during start-up")
    assert "with code 3" in message
    assert str(state_dir.resolve() / "log" / "stdout.log") in message
    assert "cannot open data folder" in message
    assert not (state_dir / "clickhouse-server.pid").exists()


def test_a_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a clickhouse-server binary the error says to apt-get install it."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)

    with pytest.raises(ClickHouseStartError, match="apt-get install clickhouse-server"):
        clickhouse.find_clickhouse_server_command()
