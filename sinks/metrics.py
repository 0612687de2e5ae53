"""The sink's Prometheus metrics, in a registry of its own (``tally sink`` serves it with
``TALLY_SINK_METRICS_PORT``).

Besides the pipeline's own health (records in, rows out by table, skips, dead letters,
insert time, batch sizes, lag per partition, the last write), the sink counts what the
service-quality alerts watch: logins by outcome, sessions by how they ended, calls by
quality class. Every label is a closed list (tables, reasons, outcomes, classes, partition
numbers), never a value a client chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.enriched import ENRICHED_COLUMNS, table_name
from schemas.reasons import ReasonCode

_INSERT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 2500, 5000, 10000)
_LOGIN_OUTCOMES = ("success", "failure")
_END_REASONS = ("normal", "dropped", "error", "timeout")
_QUALITY_CLASSES = ("good", "fair", "poor")


def _position(event_type: str, column: str) -> int:
    return [name for name, _ in ENRICHED_COLUMNS[event_type]].index(column)


@dataclass(frozen=True)
class SinkMetrics:
    registry: CollectorRegistry
    records: Counter
    rows_written: Counter
    rows_skipped: Counter
    dead_letters: Counter
    insert_failures: Counter
    insert_seconds: Histogram
    batch_records: Histogram
    consumer_lag: Gauge
    last_write: Gauge
    logins: Counter
    sessions: Counter
    calls: Counter

    def count_written(self, rows_by_type: Mapping[str, list[tuple[Any, ...]]]) -> None:
        """Rows inserted, by table, and the service-quality counts they carry."""
        for event_type, rows in rows_by_type.items():
            if not rows:
                continue
            self.rows_written.labels(table_name(event_type)).inc(len(rows))
            if event_type == "login":
                at = _position("login", "outcome")
                for row in rows:
                    self.logins.labels(row[at]).inc()
            elif event_type == "session_summary":
                reason_at = _position(event_type, "end_reason")
                class_at = _position(event_type, "quality_class")
                for row in rows:
                    self.sessions.labels(row[reason_at]).inc()
                    self.calls.labels(row[class_at]).inc()


def new_sink_metrics() -> SinkMetrics:
    registry = CollectorRegistry(auto_describe=True)
    metrics = SinkMetrics(
        registry=registry,
        records=Counter("tally_sink_records", "Enriched records read", registry=registry),
        rows_written=Counter(
            "tally_sink_rows_written", "Rows inserted, by table", ["table"], registry=registry
        ),
        rows_skipped=Counter(
            "tally_sink_rows_skipped",
            "Records not inserted: already stored by offset (replayed) or id (duplicate), "
            "or of an erased user",
            ["why"],
            registry=registry,
        ),
        dead_letters=Counter(
            "tally_sink_dead_letters",
            "Records dead-lettered, by reason",
            ["reason"],
            registry=registry,
        ),
        insert_failures=Counter(
            "tally_sink_insert_failures",
            "Batch writes that failed and were retried (ClickHouse away or slow)",
            registry=registry,
        ),
        insert_seconds=Histogram(
            "tally_sink_insert_seconds",
            "Time to write one batch, checks included",
            buckets=_INSERT_BUCKETS,
            registry=registry,
        ),
        batch_records=Histogram(
            "tally_sink_batch_records",
            "Records in a batch",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        ),
        consumer_lag=Gauge(
            "tally_sink_consumer_lag",
            "Enriched records not yet read, by partition (after the last batch)",
            ["partition"],
            registry=registry,
        ),
        last_write=Gauge(
            "tally_sink_last_write_timestamp_seconds",
            "When the last batch was written and committed (unix time)",
            registry=registry,
        ),
        logins=Counter("tally_logins", "Logins stored, by outcome", ["outcome"], registry=registry),
        sessions=Counter(
            "tally_sessions",
            "Chat sessions summarized and stored, by how they ended",
            ["end_reason"],
            registry=registry,
        ),
        calls=Counter(
            "tally_calls",
            "Sessions stored, by call-quality class",
            ["quality_class"],
            registry=registry,
        ),
    )
    for reason in ReasonCode:
        metrics.dead_letters.labels(reason.value)
    for why in ("replayed", "duplicate", "erased"):
        metrics.rows_skipped.labels(why)
    for outcome in _LOGIN_OUTCOMES:
        metrics.logins.labels(outcome)
    for end_reason in _END_REASONS:
        metrics.sessions.labels(end_reason)
    for quality_class in _QUALITY_CLASSES:
        metrics.calls.labels(quality_class)
    metrics.last_write.set(0)
    return metrics
