"""The stream worker's Prometheus metrics, in a registry of the worker's own (not the
process-wide default), so tests that build several apps in one process never share counts.

Labels are closed lists (reason codes, destinations): never an id, an address or anything a
client sent. Every refusal reason starts at zero, so a dashboard sees the series before the
first refusal.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.reasons import ReasonCode

_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class StreamMetrics:
    """Raw messages read, events enriched and refused by reason, session summaries, the
    dead-letter limit, the tables' sizes and the time a batch takes."""

    registry: CollectorRegistry
    messages: Counter
    events_enriched: Counter
    events_refused: Counter
    session_summaries: Counter
    dead_letter_limit_trips: Counter
    dead_letter_limit_tripped: Gauge
    open_sessions: Gauge
    recent_event_ids: Gauge
    batch_seconds: Histogram
    consumer_lag: Gauge
    active_key_age: Gauge
    lag_partitions: set[int] = field(default_factory=set)

    def record_positions(
        self, positions: dict[int, int], highwater: Callable[[int], int | None]
    ) -> None:
        """Each partition's lag behind the broker after a batch: its high watermark (as of the
        last fetch) less the next offset to read."""
        for partition, offset in positions.items():
            end = highwater(partition)
            if end is not None:
                self.consumer_lag.labels(str(partition)).set(max(end - offset - 1, 0))
                self.lag_partitions.add(partition)

    def keep_lag_of(self, owned: set[int]) -> None:
        """Drop the lag of partitions a rebalance took away: another worker reports them."""
        for partition in self.lag_partitions - owned:
            self.consumer_lag.remove(str(partition))
        self.lag_partitions.intersection_update(owned)

    def count_batch(
        self, messages: int, reasons: Iterable[ReasonCode | None], summaries: int
    ) -> None:
        """One batch's messages, its events' outcomes (None: enriched) and summaries."""
        self.messages.inc(messages)
        refused = Tally(reasons)
        self.events_enriched.inc(refused.pop(None, 0))
        for reason, count in refused.items():
            if reason is not None:
                self.events_refused.labels(reason.value).inc(count)
        self.session_summaries.inc(summaries)


def new_stream_metrics() -> StreamMetrics:
    registry = CollectorRegistry()
    refused = Counter(
        "tally_stream_events_refused",
        "Events the stream step dead-lettered, by reason code",
        ["reason"],
        registry=registry,
    )
    for reason in ReasonCode:
        refused.labels(reason.value)
    return StreamMetrics(
        registry=registry,
        messages=Counter(
            "tally_stream_messages", "Raw messages (events or batches) read", registry=registry
        ),
        events_enriched=Counter(
            "tally_stream_events_enriched", "Events enriched and sent on", registry=registry
        ),
        events_refused=refused,
        session_summaries=Counter(
            "tally_stream_session_summaries", "Sessions closed and summarized", registry=registry
        ),
        dead_letter_limit_trips=Counter(
            "tally_stream_dead_letter_limit_trips",
            "Times the refused share passed TALLY_DEAD_LETTER_ALARM_SHARE",
            registry=registry,
        ),
        dead_letter_limit_tripped=Gauge(
            "tally_stream_dead_letter_limit_tripped",
            "1 from a trip until the refused share falls below half the threshold",
            registry=registry,
        ),
        open_sessions=Gauge(
            "tally_stream_open_sessions",
            "Sessions held (open, or closed and waiting out the allowed lateness)",
            registry=registry,
        ),
        recent_event_ids=Gauge(
            "tally_stream_recent_event_ids",
            "Event ids held to refuse duplicates",
            registry=registry,
        ),
        batch_seconds=Histogram(
            "tally_stream_batch_seconds",
            "Time to judge a batch and have its output acknowledged",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        ),
        consumer_lag=Gauge(
            "tally_stream_consumer_lag",
            "Raw records not yet read, by partition (as of the last fetch)",
            ["partition"],
            registry=registry,
        ),
        active_key_age=Gauge(
            "tally_stream_active_key_age_seconds",
            "Age of the key ring's active key (NaN when the ring does not say)",
            registry=registry,
        ),
    )
