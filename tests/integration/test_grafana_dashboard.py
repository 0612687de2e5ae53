"""The Grafana dashboard (deploy/grafana/): generated from the panel definitions, every SQL
panel run against both ClickHouse backends with the plugin's macros expanded, returning the
columns the panel expects and rows after a workload; every PromQL panel names metrics a
stage exposes."""

import json
import re
from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest

from deploy.dashboard_panels import DASHBOARD_FILE, PANELS, expand_macros, render_dashboard
from producers.collector.metrics import new_metrics
from sinks.backends import ClickHouseBackend
from sinks.metrics import new_sink_metrics
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from streams.metrics import new_stream_metrics
from tests.integration.test_alert_rules import exposed_names
from tests.integration.test_rollups import NOW, K, workload, write


def test_the_dashboard_file_is_generated_from_the_panels():
    assert DASHBOARD_FILE.read_text() == render_dashboard(), (
        "deploy/grafana is stale: run `python -m deploy.dashboard_panels`"
    )


def test_every_sql_panel_returns_its_columns_and_rows_on_this_backend(backend: ClickHouseBackend):
    apply_migrations(backend, K)
    records = workload([f"u{n}" for n in range(3 * K)], NOW)
    records += workload([f"v{n}" for n in range(3 * K)], NOW - 3600, software_version="5.0.0")
    write(ClickHouseWriter(backend), records)
    start = datetime.fromtimestamp(NOW, UTC) - timedelta(hours=6)
    end = datetime.fromtimestamp(NOW, UTC) + timedelta(hours=1)
    expected = {panel.title: panel.columns for panel in PANELS}
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    sql_panels = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if "rawSql" not in target:
                continue
            sql_panels += 1
            sql = expand_macros(target["rawSql"], start, end)
            assert "$__" not in sql, f"{panel['title']}: a macro left unexpanded"
            columns = [row[0] for row in backend.query(f"DESCRIBE TABLE ({sql})")]
            assert tuple(columns) == expected[panel["title"]], panel["title"]
            rows = backend.query(sql)
            assert rows, f"{panel['title']}: no rows after a workload"
    assert sql_panels == sum(1 for panel in PANELS if panel.sql)


def test_every_promql_panel_names_metrics_a_stage_exposes():
    registries = [new_metrics(pending=lambda: 0).registry, new_stream_metrics().registry,
                  new_sink_metrics().registry]  # fmt: skip
    names = set().union(*(exposed_names(generate_latest(r).decode()) for r in registries))
    names.add("tally_sink_consumer_lag")  # its partitions appear with the first batch
    for panel in PANELS:
        for expr in panel.promql:
            assert set(re.findall(r"\btally_[a-z_]+\b", expr)) <= names, panel.title
