"""Enriched records as the stream step emits them, built directly, and the checks every sink
test makes: each event stored once, each rollup equal to a recomputation from the rows."""

import hashlib
import uuid
from typing import Any

from schemas.enriched import ENRICHED_COLUMNS, table_name
from sinks.backends import ClickHouseBackend
from sinks.migrations import STORED_TYPES
from sinks.rollups import DIMENSIONS, ROLLUPS, Rollup

HOUR = 3600


def pseudonym(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _envelope(event_type: str, event_time: int, user: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "event_type": event_type, "schema_version": 1,
        "event_time": event_time, "received_time": event_time + 1,
        "app_id": "conferendo.desktop", "channel": "stable", "software_version": "4.2.1",
        "consent": "full", "key_id": "k1", "user_pseudonym": pseudonym(user) if user else "",
        "session_pseudonym": "", "browser_family": "Chrome", "browser_version": "120",
        "os_family": "Windows", "os_version": "10", "device_class": "desktop",
        "country_code": "DE", "region_code": "", "referrer_domain": "",
    }  # fmt: skip
    record.update(fields)
    return {name: record.get(name) for name, _ in ENRICHED_COLUMNS[event_type]}


def login(event_time: int, user: str, *, failed: bool = False, **fields: Any) -> dict[str, Any]:
    return _envelope(
        "login", event_time, user,
        outcome="failure" if failed else "success",
        failure_reason="bad_credentials" if failed else None, auth_method="password", **fields,
    )  # fmt: skip


def summary(event_time: int, user: str, *, end_reason: str = "normal", poor: bool = False,
            duration_ms: int | None = 60_000, **fields: Any) -> dict[str, Any]:  # fmt: skip
    session = str(uuid.uuid4())
    return _envelope(
        "session_summary", event_time, user,
        session_pseudonym=pseudonym(session), session_kind="video", participants_bucket="2",
        end_reason=end_reason, server_duration_ms=duration_ms, client_duration_ms=duration_ms,
        sample_count=6, rtt_p50_ms=500.0 if poor else 80.0, rtt_p95_ms=600.0 if poor else 95.0,
        jitter_p50_ms=5.0, jitter_p95_ms=9.0, loss_p50_pct=0.5, loss_p95_pct=1.0,
        bitrate_mean_kbps=1500.0, worst_resolution="720p", mos_estimate=3.1 if poor else 4.3,
        client_mos=None, quality_class="poor" if poor else "good",
        quality_reason="rtt" if poor else "", **fields,
    )  # fmt: skip


def client_info(event_time: int, user: str, **fields: Any) -> dict[str, Any]:
    return _envelope(
        "client_info", event_time, user, platform="windows", screen_class="large", **fields
    )


def assert_each_event_once(backend: ClickHouseBackend) -> dict[str, int]:
    """count() = uniqExact(event_id) in every table, without FINAL; rows per table."""
    counts = {}
    for event_type in STORED_TYPES:
        table = table_name(event_type)
        [(rows, distinct)] = backend.query(f"SELECT count(), uniqExact(event_id) FROM {table}")
        assert rows == distinct, f"{table}: {rows} rows for {distinct} event ids"
        counts[table] = rows
    return counts


def _recomputed(rollup: Rollup) -> str:
    keys = [f"{expression} AS {column}" for column, expression, _ in rollup.keys]
    values = [m.state.replace("State(", "(", 1) for m in rollup.measures]
    return (
        f"SELECT toStartOfHour(event_time) AS hour, {', '.join([*DIMENSIONS, *keys, *values])} "
        f"FROM {table_name(rollup.source_type)} GROUP BY {', '.join(rollup.key_columns)}"
    )


def _merged(rollup: Rollup) -> str:
    values = [f"{m.merge}({m.name})" for m in rollup.measures]
    return (
        f"SELECT {', '.join([*rollup.key_columns, *values])} FROM {rollup.table} "
        f"GROUP BY {', '.join(rollup.key_columns)}"
    )


def rollups_differing(backend: ClickHouseBackend) -> list[str]:
    """The rollups that, merged, differ from the same aggregates computed from the
    event-level rows (exact: uniq below 65,536 and quantiles below 8,192 values a group)."""
    return [
        rollup.table
        for rollup in ROLLUPS
        if sorted(map(repr, backend.query(_merged(rollup))))
        != sorted(map(repr, backend.query(_recomputed(rollup))))
    ]


def assert_rollups_recompute(backend: ClickHouseBackend) -> None:
    differing = rollups_differing(backend)
    assert not differing, f"differ from their recomputation: {differing}"
