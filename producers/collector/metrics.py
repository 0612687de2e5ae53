"""The collector's Prometheus metrics, in a registry of each app's own (not the process-wide
default), so two apps in one process, tests among them, never share counts.

Labels are closed lists (statuses, reason codes): never a key, an app's key hash, an origin
or anything a client sent. The labelled children a request touches are looked up once and
kept, since ``labels()`` takes a lock and a dict lookup on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from producers.collector.edge import RequestRefusal
from schemas.reasons import ReasonCode

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class CollectorMetrics:
    """Requests by status, whole requests refused by reason, events accepted and refused by
    reason, preflights by status, events waiting for Kafka, and latencies."""

    registry: CollectorRegistry
    requests: Counter
    requests_refused: Counter
    preflights: Counter
    events_accepted: Counter
    events_refused: Counter
    pending_events: Gauge
    request_seconds: Histogram
    produce_seconds: Histogram
    _children: dict[tuple[str, str], Counter] = field(default_factory=dict, repr=False)

    def count_request(self, status: int) -> None:
        self._child(self.requests, "s", str(status)).inc()

    def count_refusal(self, reason: str) -> None:
        """One whole request refused; ``reason`` is a ``RequestRefusal`` value."""
        self._child(self.requests_refused, "r", reason).inc()

    def count_preflight(self, status: int) -> None:
        self._child(self.preflights, "p", str(status)).inc()

    def count_refused_event(self, reason: ReasonCode) -> None:
        self._child(self.events_refused, "e", reason.value).inc()

    def _child(self, counter: Counter, family: str, label: str) -> Counter:
        child = self._children.get((family, label))
        if child is None:
            child = self._children[(family, label)] = counter.labels(label)
        return child


def new_metrics(pending: Callable[[], float] = lambda: 0) -> CollectorMetrics:
    """A fresh registry with every series the collector exports; each refusal reason starts
    at zero, so a dashboard sees the series before the first refusal. ``pending`` says how
    many events wait for Kafka now (read when scraped, costing requests nothing)."""
    registry = CollectorRegistry(auto_describe=True)
    refused = Counter(
        "tally_collector_events_refused",
        "Events refused at the edge, by reason code",
        ["reason"],
        registry=registry,
    )
    for reason in ReasonCode:
        refused.labels(reason=reason.value)
    requests_refused = Counter(
        "tally_collector_requests_refused",
        "POST /v1/events requests refused whole, by reason",
        ["reason"],
        registry=registry,
    )
    for refusal in RequestRefusal:
        requests_refused.labels(reason=refusal.value)
    pending_events = Gauge(
        "tally_collector_pending_events",
        "Events read from requests and not yet acknowledged by Kafka",
        registry=registry,
    )
    pending_events.set_function(pending)
    return CollectorMetrics(
        registry=registry,
        requests=Counter(
            "tally_collector_requests",
            "POST /v1/events requests, by HTTP status",
            ["status"],
            registry=registry,
        ),
        requests_refused=requests_refused,
        preflights=Counter(
            "tally_collector_preflights",
            "CORS preflights (OPTIONS /v1/events), by HTTP status",
            ["status"],
            registry=registry,
        ),
        events_accepted=Counter(
            "tally_collector_events_accepted",
            "Events acknowledged by Kafka on the raw topic",
            registry=registry,
        ),
        events_refused=refused,
        pending_events=pending_events,
        request_seconds=Histogram(
            "tally_collector_request_seconds",
            "Time to answer POST /v1/events",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        produce_seconds=Histogram(
            "tally_collector_produce_seconds",
            "Time from producing a request's batches to Kafka's acknowledgement of all",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
    )
