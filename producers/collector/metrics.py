"""The collector's Prometheus metrics, in a registry of each app's own (not the process-wide
default), so two apps in one process, tests among them, never share counts."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from schemas.reasons import ReasonCode

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class CollectorMetrics:
    """Requests by status, events accepted and refused by reason, and latencies."""

    registry: CollectorRegistry
    requests: Counter
    events_accepted: Counter
    events_refused: Counter
    request_seconds: Histogram
    produce_seconds: Histogram


def new_metrics() -> CollectorMetrics:
    """A fresh registry with every series the collector exports; each refusal reason starts
    at zero, so a dashboard sees the series before the first refusal."""
    registry = CollectorRegistry(auto_describe=True)
    refused = Counter(
        "tally_collector_events_refused",
        "Events refused at the edge, by reason code",
        ["reason"],
        registry=registry,
    )
    for reason in ReasonCode:
        refused.labels(reason=reason.value)
    return CollectorMetrics(
        registry=registry,
        requests=Counter(
            "tally_collector_requests",
            "POST /v1/events requests, by HTTP status",
            ["status"],
            registry=registry,
        ),
        events_accepted=Counter(
            "tally_collector_events_accepted",
            "Events acknowledged by Kafka on the raw topic",
            registry=registry,
        ),
        events_refused=refused,
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
