"""The quality dashboard's panels, once: the Grafana dashboard (deploy/grafana/) is generated
from them (`python -m deploy.dashboard_panels`), and `tally up`'s built-in dashboard
(deploy/dashboard/) runs them with its filters (``dashboard_sql``). Every SQL panel reads
only the analyst views, so small-count suppression applies, and uses the ClickHouse plugin's
macros (``$__timeFilter``), which ``expand_macros`` expands the way the plugin does so the tests
can run each panel against both backends."""

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from sinks.analyst_views import ANALYST_VIEWS, FILTER_DIMENSIONS, filtered_view
from sinks.backends import sql_string
from sinks.rollups import QUANTILE_LEVELS

GRAFANA_DIR: Final = Path(__file__).resolve().parent / "grafana"
DASHBOARD_FILE: Final = GRAFANA_DIR / "dashboards" / "tally-service-quality.json"
DATASOURCE_UID: Final = "tally-clickhouse"
PROMETHEUS_UID: Final = "tally-prometheus"


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str
    """Grafana panel type: timeseries, table, barchart."""
    columns: tuple[str, ...]
    """The columns the panel expects, in order."""
    sql: str = ""
    promql: tuple[str, ...] = ()
    unit: str = "short"


def _per_hour(view: str, *values: str) -> str:
    return (
        f"SELECT hour AS time, {', '.join(values)} FROM {view} "
        "WHERE $__timeFilter(hour) GROUP BY time ORDER BY time"
    )


def _top(view: str, column: str, value: str, name: str) -> str:
    return (
        f"SELECT {column}, {value} AS {name} FROM {view} WHERE $__timeFilter(day) "
        f"GROUP BY {column} ORDER BY {name} DESC LIMIT 15"
    )


def _quantile(measure: str, level: float, name: str, scale: int = 1) -> str:
    """A quantile over every row read, whatever the view's breakdown, from the merged states."""
    levels = ", ".join(str(each) for each in QUANTILE_LEVELS)
    index = QUANTILE_LEVELS.index(level) + 1
    scaled = f" / {scale}" if scale != 1 else ""
    return f"quantilesIfMerge({levels})({measure}_state)[{index}]{scaled} AS {name}"


PANELS: Final = (
    Panel("Call quality: good, fair and poor shares", "timeseries",
          ("time", "good_share", "fair_share", "poor_share"),
          _per_hour("analyst_sessions_by_quality_class_quality_reason_hourly",
                    *(f"sumIf(sessions, quality_class = '{c}') / sum(sessions) AS {c}_share"
                      for c in ("good", "fair", "poor"))), unit="percentunit"),
    Panel("Round-trip time and jitter (ms, session medians)", "timeseries",
          ("time", "rtt_p50", "rtt_p95", "jitter_p50", "jitter_p95"),
          _per_hour("analyst_sessions_hourly", _quantile("rtt_ms", 0.5, "rtt_p50"),
                    _quantile("rtt_ms", 0.95, "rtt_p95"),
                    _quantile("jitter_ms", 0.5, "jitter_p50"),
                    _quantile("jitter_ms", 0.95, "jitter_p95")), unit="ms"),
    Panel("Packet loss (%) and MOS", "timeseries", ("time", "loss_p50", "loss_p95", "mos_p50"),
          _per_hour("analyst_sessions_hourly", _quantile("loss_pct", 0.5, "loss_p50"),
                    _quantile("loss_pct", 0.95, "loss_p95"), _quantile("mos", 0.5, "mos_p50"))),
    Panel("Poor calls by reason", "timeseries", ("time", "rtt_poor", "jitter_poor", "loss_poor"),
          _per_hour("analyst_sessions_by_quality_class_quality_reason_hourly",
                    *(f"sumIf(sessions, quality_class = 'poor' AND quality_reason = '{r}')"
                      f" AS {r}_poor" for r in ("rtt", "jitter", "loss")))),
    Panel("Sessions: drop, error and timeout rates", "timeseries",
          ("time", "drop_rate", "error_rate", "timeout_rate"),
          _per_hour("analyst_sessions_hourly", "sum(dropped) / sum(sessions) AS drop_rate",
                    "sum(errored) / sum(sessions) AS error_rate",
                    "sum(timed_out) / sum(sessions) AS timeout_rate"), unit="percentunit"),
    Panel("Session duration (s)", "timeseries", ("time", "p50", "p95", "p99"),
          _per_hour("analyst_sessions_hourly",
                    *(_quantile("duration_ms", level, f"p{round(level * 100)}", scale=1000)
                      for level in QUANTILE_LEVELS)), unit="s"),
    Panel("Login failure rate", "timeseries", ("time", "failure_rate"),
          _per_hour("analyst_logins_hourly", "sum(failures) / sum(logins) AS failure_rate"),
          unit="percentunit"),
    Panel("Login failures by reason", "timeseries", ("time", "failure_reason", "failure_count"),
          "SELECT hour AS time, failure_reason, sum(failures) AS failure_count "
          "FROM analyst_logins_by_outcome_failure_reason_hourly "
          "WHERE $__timeFilter(hour) AND outcome != 'success' "
          "GROUP BY time, failure_reason ORDER BY time"),
    Panel("Software versions in use (users)", "barchart", ("software_version", "users"),
          _top("analyst_clients_by_software_version_daily", "software_version",
               "uniqIfMerge(users_state)", "users")),
    Panel("Operating systems (users)", "barchart", ("os_family", "users"),
          _top("analyst_clients_by_os_family_daily", "os_family", "uniqIfMerge(users_state)",
               "users")),
    Panel("Browsers (users)", "barchart", ("browser_family", "users"),
          _top("analyst_clients_by_browser_family_daily", "browser_family",
               "uniqIfMerge(users_state)", "users")),
    Panel("Countries: sessions and poor-call share", "table",
          ("country_code", "session_count", "poor_share"),
          "SELECT country_code, sum(sessions) AS session_count, sum(poor) / sum(sessions) AS "
          "poor_share FROM analyst_sessions_by_country_code_daily WHERE $__timeFilter(day) "
          "GROUP BY country_code ORDER BY session_count DESC LIMIT 20"),
    Panel("Pipeline: events in and refused (per second)", "timeseries", (),
          promql=('sum(rate(tally_collector_events_accepted_total[5m]))',
                  'sum by (reason) (rate(tally_stream_events_refused_total[5m]))')),
    Panel("Pipeline: sink lag (records)", "timeseries", (),
          promql=("sum(tally_sink_consumer_lag)",)),
)  # fmt: skip


def expand_macros(sql: str, start: datetime, end: datetime) -> str:
    """The plugin's ``$__timeFilter(column)``, as it expands it for a DateTime column."""
    first, last = int(start.timestamp()), int(end.timestamp())
    return re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: (
            f"{m.group(1)} >= toDateTime({first}) AND {m.group(1)} <= toDateTime({last})"
            if m.group(1) != "day"
            else f"day >= toDate(toDateTime({first})) AND day <= toDate(toDateTime({last}))"
        ),
        sql,
    )


_SOURCE = re.compile(r"\bFROM (analyst_\w+) WHERE (\$__timeFilter\(\w+\))")
_VIEWS = {view.name: view for view in ANALYST_VIEWS}


def dashboard_sql(
    panel: Panel, start: datetime, end: datetime, filters: dict[str, str]
) -> tuple[str, bool]:
    """The panel's SQL over ``start``..``end``, filtered on ``filters`` (filter dimension ->
    value) when its breakdown allows, and whether it was. A panel broken down by something
    no view crosses with the filter dimensions (failure reason, quality class) is shown
    unfiltered."""
    unknown = set(filters) - set(FILTER_DIMENSIONS)
    if unknown:
        raise ValueError(f"not a filter dimension: {', '.join(sorted(unknown))}")
    sql, filtered = panel.sql, False
    found = _SOURCE.search(sql)
    if filters and found:
        view = _VIEWS[found.group(1)]
        name = filtered_view(view.rollup.name, view.breakdown, tuple(filters), view.grain)
        if name is not None:
            conditions = "".join(
                f" AND {dimension} = {sql_string(value)}"
                for dimension, value in sorted(filters.items())
            )
            sql = (
                f"{sql[: found.start()]}FROM {name} WHERE {found.group(2)}{conditions}"
                + sql[found.end() :]
            )
            filtered = True
    return expand_macros(sql, start, end), filtered


def _target(panel: Panel) -> list[dict[str, Any]]:
    if panel.promql:
        return [
            {"refId": chr(65 + n), "datasource": {"type": "prometheus", "uid": PROMETHEUS_UID},
             "expr": expr}
            for n, expr in enumerate(panel.promql)
        ]  # fmt: skip
    return [{
        "refId": "A",
        "datasource": {"type": "grafana-clickhouse-datasource", "uid": DATASOURCE_UID},
        "editorType": "sql",
        "format": 0 if panel.kind == "timeseries" else 1,
        "rawSql": panel.sql,
        "queryType": "timeseries" if panel.kind == "timeseries" else "table",
    }]  # fmt: skip


def grafana_dashboard() -> dict[str, Any]:
    panels = []
    for n, panel in enumerate(PANELS):
        panels.append({
            "id": n + 1,
            "title": panel.title,
            "type": panel.kind,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (n % 2), "y": 8 * (n // 2)},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "targets": _target(panel),
        })  # fmt: skip
    return {
        "uid": "tally-service-quality",
        "title": "Tally: service quality",
        "description": "Generated by python -m deploy.dashboard_panels; reads the analyst "
        "views (small groups folded into 'other').",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "1m",
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "templating": {"list": []},
        "tags": ["tally"],
        "panels": panels,
    }


def render_dashboard() -> str:
    return json.dumps(grafana_dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    DASHBOARD_FILE.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_FILE.write_text(render_dashboard())
    print(f"wrote {DASHBOARD_FILE}")
