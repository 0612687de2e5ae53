"""The analyst user of a ClickHouse server, logged in with clickhouse-client: it reads the
analyst views (with small-count suppression) and nothing else."""

import subprocess
from pathlib import Path

import pytest

from deploy.clickhouse import analyst_user_password
from schemas.enriched import table_name
from sinks.analyst_views import ANALYST_VIEWS, mirror_database
from sinks.backends import ServerClickHouse
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from tests.clickhouse_fixtures import private_clickhouse_server
from tests.integration.test_rollups import NOW, RARE, K, workload, write

pytestmark = pytest.mark.clickhouse


def test_the_analyst_reads_the_views_and_nothing_else(tmp_path: Path):
    state = tmp_path / "clickhouse"
    with private_clickhouse_server(state) as server:
        with ServerClickHouse(server.host, server.tcp_port, database="tally") as backend:
            apply_migrations(backend, K)
            write(ClickHouseWriter(backend),
                  workload([f"h{n}" for n in range(K - 1)], NOW, **RARE)
                  + workload([f"s{n}" for n in range(K)], NOW))  # fmt: skip

        def as_analyst(sql: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["clickhouse-client", "--host", server.host, "--port", str(server.tcp_port),
                 "--user", "analyst", "--password", analyst_user_password(state),
                 "--query", sql],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        mirror = mirror_database("tally")
        for view in ANALYST_VIEWS:
            read = as_analyst(f"SELECT count() FROM {mirror}.{view.name}")
            assert read.returncode == 0, f"{view.name}: {read.stderr}"
            assert int(read.stdout) >= 1
        shown = as_analyst(
            f"SELECT country_code, logins, users FROM {mirror}.analyst_logins_by_country_code_daily"
            " ORDER BY country_code FORMAT TSV"
        )
        assert shown.stdout.split("\n")[:-1] == [
            f"DE\t{2 * K}\t{K}",
            f"other\t{2 * (K - 1)}\t{K - 1}",
        ]
        for forbidden in (
            f"SELECT count() FROM tally.{table_name('login')}",
            "SELECT count() FROM tally.rollup_logins_hourly",
            "SELECT count() FROM tally.analyst_logins_daily",
            f"SELECT * FROM remote('127.0.0.1:{server.tcp_port}', tally.{table_name('login')})",
            f"CREATE TABLE {mirror}.stolen (a UInt8) ENGINE = Memory",
        ):
            refused = as_analyst(forbidden)
            assert refused.returncode != 0, f"the analyst could run: {forbidden}"
            assert "Access denied" in refused.stderr or "readonly" in refused.stderr
