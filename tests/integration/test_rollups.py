"""Rollups, analyst views with small-count suppression, erasure and retention, on both
ClickHouse backends, through the sink's writer."""

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from schemas.enriched import table_name
from sinks.analyst_views import ANALYST_VIEWS, OTHER
from sinks.backends import ClickHouseBackend
from sinks.erasure import erase_pseudonyms
from sinks.migrations import apply_migrations
from sinks.retention import drop_expired_partitions
from sinks.rollups import ROLLUPS
from sinks.writer import ClickHouseWriter, Row, with_source
from tests.sink_records import (
    HOUR,
    assert_each_event_once,
    assert_rollups_recompute,
    client_info,
    login,
    pseudonym,
    summary,
)

K = 10
NOW = int(time.time()) // HOUR * HOUR - 2 * HOUR


def workload(users: list[str], at: int, **fields: Any) -> list[dict[str, Any]]:
    """Per user: two logins (one failed), a summary (every third dropped and poor), a client
    report."""
    records = []
    for n, user in enumerate(users):
        records += [
            login(at + n, user, **fields),
            login(at + n + 60, user, failed=True, **fields),
            summary(
                at + n,
                user,
                end_reason="dropped" if n % 3 == 0 else "normal",
                poor=n % 3 == 0,
                **fields,
            ),
            client_info(at + n, user, **fields),
        ]
    return records


def write(writer: ClickHouseWriter, records: list[dict[str, Any]], partition: int = 0,
          first_offset: int = 0) -> int:  # fmt: skip
    """Write records as if read from the enriched topic, one offset each."""
    from collections import defaultdict

    from sinks.writer import to_row

    grouped: dict[str, list[Row]] = defaultdict(list)
    for offset, record in enumerate(records, start=first_offset):
        event_type, row = to_row(record)
        grouped[event_type].append(with_source(row, "enriched", partition, offset))
    result = writer.write(grouped, {("enriched", partition): first_offset + len(records) - 1})
    assert not result.rejected
    return result.written


def test_replays_and_resends_count_once_and_rollups_recompute(backend: ClickHouseBackend):
    """A batch written again (a sink replay) and the same events under new offsets (the
    stream step's re-send) store nothing more: count() = uniqExact(event_id) without FINAL,
    and every rollup equals a recomputation from the rows."""
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    records = workload([f"u{n}" for n in range(30)], NOW)
    assert write(writer, records) == len(records)
    assert write(writer, records) == 0
    assert write(writer, records[::2], partition=1, first_offset=500) == 0
    assert writer.duplicates_skipped == len(records) + len(records[::2])
    counts = assert_each_event_once(backend)
    assert counts[table_name("login")] == 60 and counts[table_name("session_summary")] == 30
    assert_rollups_recompute(backend)
    [(logins, failures, users)] = backend.query(
        "SELECT countMerge(logins), countIfMerge(failures), uniqIfMerge(users) "
        "FROM rollup_logins_hourly"
    )
    assert (logins, failures, users) == (60, 30, 30)


def test_stored_offsets_are_the_last_of_the_written_batches(backend: ClickHouseBackend):
    """Recorded with the first batch, then at most once an interval, covering the batches
    written meanwhile."""
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend, offsets_record_interval_s=3600)
    write(writer, workload(["a"], NOW), partition=3, first_offset=10)
    write(writer, workload(["b"], NOW), partition=3, first_offset=14)
    write(writer, workload(["c"], NOW), partition=0, first_offset=0)
    assert writer.stored_offsets("enriched") == {3: 13}
    writer.offsets_record_interval_s = 0
    write(writer, workload(["d"], NOW), partition=0, first_offset=4)
    assert writer.stored_offsets("enriched") == {3: 17, 0: 7}
    assert writer.stored_offsets("another") == {}


def test_none_consent_counts_in_totals_never_in_users(backend: ClickHouseBackend):
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    write(writer, [login(NOW, "", consent="none") for _ in range(5)] + [login(NOW, "u1")])
    [(logins, users)] = backend.query(
        "SELECT countMerge(logins), uniqIfMerge(users) FROM rollup_logins_hourly"
    )
    assert (logins, users) == (6, 1)


RARE = {
    "country_code": "AA", "software_version": "9.9.9-rare", "os_family": "RareOS",
    "browser_family": "RareBrowser", "device_class": "rare-device", "app_id": "rare.app",
}  # fmt: skip


def _first_count(view: Any) -> str:
    return next(m.name for m in view.rollup.measures if m.merge.startswith("count"))


def test_a_group_under_k_users_is_folded_into_other_in_every_view(backend: ClickHouseBackend):
    """k-1 users with rare values are invisible through every analyst view, hourly and daily;
    a group of exactly k is visible; each view's counts add up to the table's total."""
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    hidden = workload([f"h{n}" for n in range(K - 1)], NOW, **RARE)
    shown = workload([f"s{n}" for n in range(K)], NOW, country_code="BB")
    common = workload([f"c{n}" for n in range(3 * K)], NOW)
    write(writer, hidden + shown + common)
    rare_values = set(RARE.values())
    for view in ANALYST_VIEWS:
        columns = [view.time_column, *view.breakdown, _first_count(view)]
        rows = backend.query(f"SELECT {', '.join(columns)} FROM {view.name}")
        seen = {value for row in rows for value in row[1:-1]}
        assert not seen & rare_values, f"{view.name} shows a group of {K - 1} users"
        total = sum(row[-1] for row in rows)
        expected = backend.query(f"SELECT count() FROM {table_name(view.rollup.source_type)}")[0][0]
        assert total == expected, f"{view.name} adds up to {total}, not {expected}"
        if view.breakdown == ("country_code",):
            assert {"BB", "DE", OTHER} <= seen, f"{view.name}: {seen}"
    [(users,)] = backend.query(
        f"SELECT users FROM analyst_logins_by_country_code_daily WHERE country_code = '{OTHER}'"
    )
    assert users == K - 1


def test_views_merge_exactly_over_a_window(backend: ClickHouseBackend):
    """The *_state columns combine hourly rows into a window's distinct users and
    percentiles exactly as the rollup would."""
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    write(writer, workload([f"u{n}" for n in range(K)], NOW)
          + workload([f"u{n}" for n in range(K // 2, 2 * K)], NOW + HOUR))  # fmt: skip
    [(users, durations)] = backend.query(
        "SELECT uniqIfMerge(users_state), quantilesIfMerge(0.5, 0.95, 0.99)(duration_ms_state) "
        "FROM analyst_sessions_hourly"
    )
    assert users == 2 * K
    assert durations == [60000.0, 60000.0, 60000.0]


def test_an_erased_user_is_gone_and_stays_gone_after_a_replay(backend: ClickHouseBackend):
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    erased = workload(["erase-me"], NOW)
    kept = workload(["keep-me"], NOW)
    write(writer, erased + kept)
    rollup_before = backend.query("SELECT countMerge(logins) FROM rollup_logins_hourly")
    deleted = erase_pseudonyms(backend, [pseudonym("erase-me")])
    assert deleted[table_name("login")] == 2 and deleted[table_name("session_summary")] == 1
    assert sum(deleted.values()) == len(erased)
    assert write(writer, erased + kept, partition=2) == 0  # a replay of the topic
    assert writer.erased_skipped == len(erased)
    for event_type in ("login", "session_summary", "client_info"):
        [(left,)] = backend.query(
            f"SELECT count() FROM {table_name(event_type)} "
            f"WHERE user_pseudonym = '{pseudonym('erase-me')}'"
        )
        assert left == 0, f"{event_type}: {left} rows of the erased user"
    assert assert_each_event_once(backend)[table_name("login")] == 2
    assert backend.query("SELECT countMerge(logins) FROM rollup_logins_hourly") == rollup_before


def _epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp())


def test_retention_drops_only_what_is_past_it(backend: ClickHouseBackend):
    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    today = datetime.now(UTC).date()
    old, recent, ancient = (today - timedelta(days=d) for d in (95, 85, 800))
    write(writer, workload(["a"], _epoch(old)) + workload(["b"], _epoch(recent))
          + workload(["c"], _epoch(ancient)))  # fmt: skip
    dropped = drop_expired_partitions(backend, today, event_days=90, rollup_days=400)
    tables = {partition.table for partition in dropped}
    assert table_name("login") in tables and "rollup_logins_hourly" in tables
    [(days,)] = backend.query(
        f"SELECT groupUniqArray(toDate(event_time)) FROM {table_name('login')}"
    )
    assert days == [recent]
    months = {row[0] for row in backend.query("SELECT toYYYYMM(hour) FROM rollup_logins_hourly")}
    assert int(f"{ancient:%Y%m}") not in months and int(f"{old:%Y%m}") in months
    assert drop_expired_partitions(backend, today, event_days=90, rollup_days=400) == []


@pytest.mark.parametrize("rollup", ROLLUPS, ids=lambda r: r.name)
def test_rollup_sql_avoids_what_18_16_lacks(rollup):
    from sinks.rollups import rollup_ddl

    for statement in rollup_ddl(rollup):
        for modern in ("SimpleAggregateFunction", "LowCardinality", "TTL", "CODEC", "Map("):
            assert modern not in statement


def test_the_report_reads_the_window_through_the_views(backend: ClickHouseBackend):
    """Figures of the window and the one before, worst versions by poor-call share, and
    nothing of a group under k: JSON and CSV carry the same figures."""
    import csv
    import io
    import json

    from sinks.report import format_report, quality_report, report_as_csv, report_as_json

    apply_migrations(backend, K)
    writer = ClickHouseWriter(backend)
    end = datetime.fromtimestamp(NOW, UTC)
    write(writer, workload([f"v{n}" for n in range(30)], NOW, software_version="5.0.0")
          + workload([f"w{n}" for n in range(30)], NOW, software_version="5.1.0",
                     browser_family="Firefox")
          + workload([f"h{n}" for n in range(K - 1)], NOW, **RARE)
          + workload([f"p{n}" for n in range(12)], NOW - 24 * HOUR))  # fmt: skip
    report = quality_report(backend, end)
    assert (report.now.logins, report.now.login_failures, report.now.login_users) == (138, 69, 69)
    assert report.now.sessions == 69 and report.now.sessions_dropped == 20 + 3
    assert report.before.logins == 24
    assert report.now.duration_ms == [60000.0, 60000.0, 60000.0]
    assert report.now.poor_reasons == {"rtt": report.now.quality_classes["poor"]}
    assert [r.name for r in report.worst_versions] == ["5.0.0", "5.1.0"]
    assert all(r.name != "AA" for r in report.worst_countries)
    text = format_report(report)
    assert "9.9.9-rare" not in text and "AA " not in text and "logins            138" in text
    data = json.loads(report_as_json(report))
    assert data["now"]["login_failure_rate"] == 0.5 and data["before"]["logins"] == 24
    rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(report_as_csv(report)))}
    assert rows["logins"] == ["138", "24"] and rows["duration_ms.p50"] == ["60000.0", "60000.0"]
