"""The SDK's HTTP transport against a small collector stand-in in this file (stdlib
``http.server``): what each of the collector's answers means for each event, what goes over
the wire (gzip, the key), and that the key never shows in a log line, a message or a repr.
No services; tests/integration/test_sdk_durability.py has the real collector and Kafka."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deploy.services.ports import free_ports
from producers.sdk import TallyHttpClient
from producers.spool import Record
from producers.transports import HttpTransport, Outcome, RetryLater
from producers.workload import generate_workload
from schemas.events import Envelope

KEY = "tk_live_5ecr3t-KEY-0123456789"
DEADLINE_S = 20.0


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    events: list[dict[str, object]]


Answer = tuple[int, dict[str, str], bytes]


def accept_all(request: Request) -> Answer:
    body = {"accepted": [e["event_id"] for e in request.events], "refused": []}
    return 200, {}, json.dumps(body).encode()


@dataclass
class Collector:
    """Answers each POST with ``answer(request)``; keeps every request, decoded."""

    url: str
    answer: Callable[[Request], Answer] = accept_all
    requests: list[Request] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    """``time.monotonic()`` of each request."""
    delay_s: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    collector: Collector

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        request = Request(self.path, dict(self.headers.items()), json.loads(raw))
        self.collector.requests.append(request)
        self.collector.arrived.append(time.monotonic())
        time.sleep(self.collector.delay_s)  # a slow collector, for the timeout test
        status, headers, body = self.collector.answer(request)
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: pytest shows what the tests log


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A collector stand-in on a free loopback port, in a thread, for one test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    stand_in = Collector(f"http://127.0.0.1:{server.server_address[1]}/tally")
    _Handler.collector = stand_in
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def events(count: int) -> list[Envelope]:
    return generate_workload(
        seed=31, clients=10, events=count, end_ms=int(time.time() * 1000), span_ms=3_600_000
    )


def records(count: int) -> list[Record]:
    return [Record(b"k", e.model_dump_json(exclude_none=True).encode()) for e in events(count)]


def ids(recs: list[Record]) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in recs]


def test_a_2xx_settles_each_event_by_its_id_and_index(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted ids are delivered, refused indexes rejected (reason logged), and an event the
    answer does not account for waits."""
    batch = records(4)
    collector.answer = lambda r: (
        200,
        {},
        json.dumps(
            {
                "accepted": [ids(batch)[0], ids(batch)[3]],
                "refused": [{"index": 1, "reason": "invalid_field", "field": "os_name"}],
            }
        ).encode(),
    )
    transport = HttpTransport(collector.url, KEY, timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="producers.transports"):
        outcomes = transport.send(batch)
    assert outcomes == [Outcome.DELIVERED, Outcome.REJECTED, Outcome.RETRY, Outcome.DELIVERED]
    assert "invalid_field" in caplog.text
    transport.close()


def test_the_body_is_a_gzipped_json_array_of_the_events_with_the_key_as_bearer(
    collector: Collector,
) -> None:
    """One POST to {endpoint}/v1/events: gzip, JSON, the events exactly as spooled, in order,
    and the key as a bearer token."""
    batch = records(3)
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    transport = HttpTransport(collector.url + "/", KEY, timeout_s=5, headers=forwarded)
    assert transport.send(batch) == [Outcome.DELIVERED] * 3
    (request,) = collector.requests
    assert request.headers["X-Forwarded-For"] == "203.0.113.7"
    assert request.path == "/tally/v1/events"
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.events == [json.loads(r.value) for r in batch]
    transport.close()


@pytest.mark.parametrize(
    ("status", "retry_after", "delay_s"),
    [(503, "7", 7.0), (429, None, 0.0), (500, None, 0.0), (429, "86400", 600.0)],
)
def test_busy_or_failing_collector_means_retry_after_what_it_asked(
    collector: Collector, status: int, retry_after: str | None, delay_s: float
) -> None:
    """503, 429 and 5xx settle nothing: RetryLater carries the Retry-After (at most 10 min)."""
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    collector.answer = lambda r: (status, headers, b'{"error": "kafka_unavailable"}')
    transport = HttpTransport(collector.url, KEY, timeout_s=5)
    with pytest.raises(RetryLater) as raised:
        transport.send(records(3))
    assert raised.value.delay_s == delay_s
    transport.close()


def test_the_client_waits_at_least_the_retry_after_before_sending_again(
    collector: Collector,
) -> None:
    """With a backoff of 10 ms, a 503 with Retry-After: 1 still holds the next attempt for
    about a second (jitter never goes below it); then the events are delivered."""
    answers = iter([(503, {"Retry-After": "1"}, b"{}")])
    collector.answer = lambda r: next(answers, None) or accept_all(r)
    sdk = TallyHttpClient(collector.url, KEY, retry_backoff_s=0.01, retry_backoff_max_s=0.02)
    try:
        batch = events(5)
        for event in batch:
            sdk.emit(event)
        deadline = time.monotonic() + DEADLINE_S
        while sdk.pending_events and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the client's count against the deadline
        assert sdk.pending_events == 0
    finally:
        sdk.close()
    first, second = collector.requests[:2]
    assert [e["event_id"] for e in second.events] == [e.event_id for e in batch]
    assert first.events == second.events[: len(first.events)]  # sent again, not lost
    assert collector.arrived[1] - collector.arrived[0] >= 0.95


def test_a_refused_key_waits_with_one_error_line_that_never_shows_the_key(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """401 (and 403): every event waits; one error line says so, not one per attempt, and
    neither it nor anything else logged holds the key."""
    collector.answer = lambda r: (401, {}, b'{"error": "unknown_key"}')
    transport = HttpTransport(collector.url, KEY, timeout_s=5)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert transport.send(records(2)) == [Outcome.RETRY] * 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "401" in errors[0].getMessage()
    assert KEY not in caplog.text
    transport.close()


def test_a_413_splits_the_batch_and_later_batches_stay_under_the_limit(
    collector: Collector,
) -> None:
    """A collector that takes at most 3 events per request: a batch of 8 is delivered whole
    through halves, and the transport's own limit drops to fit."""

    def at_most_three(request: Request) -> Answer:
        if len(request.events) > 3:
            return 413, {}, b'{"error": "too_large"}'
        return accept_all(request)

    collector.answer = at_most_three
    transport = HttpTransport(collector.url, KEY, timeout_s=5)
    batch = records(8)
    assert transport.send(batch) == [Outcome.DELIVERED] * 8
    delivered = [e["event_id"] for r in collector.requests if len(r.events) <= 3 for e in r.events]
    assert delivered == ids(batch)
    assert transport.max_batch_records <= 3
    transport.close()


def test_a_single_event_refused_as_too_large_is_rejected(collector: Collector) -> None:
    """413 for one event alone: no retry can shrink it, so it is rejected."""
    collector.answer = lambda r: (413, {}, b'{"error": "too_large"}')
    transport = HttpTransport(collector.url, KEY, timeout_s=5)
    assert transport.send(records(1)) == [Outcome.REJECTED]
    transport.close()


def test_an_unreachable_collector_raises_for_the_client_to_retry() -> None:
    """Connection refused: the send raises (all RETRY), quickly, and the message holds no key."""
    (port,) = free_ports(1)
    transport = HttpTransport(f"http://127.0.0.1:{port}", KEY, timeout_s=5)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError) as raised:
        transport.send(records(2))
    assert time.monotonic() - started < 5
    assert KEY not in str(raised.value) and KEY not in repr(raised.value)
    transport.close()


def test_a_collector_that_does_not_answer_costs_one_timeout(collector: Collector) -> None:
    """A collector slower than timeout_s: the send raises TimeoutError after about it."""
    collector.delay_s = 2.0
    transport = HttpTransport(collector.url, KEY, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        transport.send(records(2))
    assert time.monotonic() - started < 1.5
    transport.close()


def test_a_connection_the_collector_closed_meanwhile_is_replaced_at_once(
    collector: Collector,
) -> None:
    """A kept-alive connection closed by the server between batches costs no failed attempt."""
    transport = HttpTransport(collector.url, KEY, timeout_s=5)
    assert transport.send(records(1)) == [Outcome.DELIVERED]
    assert transport._conn is not None and transport._conn.sock is not None
    transport._conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had dropped it
    assert transport.send(records(2)) == [Outcome.DELIVERED] * 2
    transport.close()


def test_the_key_is_in_no_repr_and_no_refusal_message() -> None:
    """repr of the transport and the client shows the endpoint only; a bad key's message does
    not quote it."""
    transport = HttpTransport("https://collector.example/tally", KEY)
    assert KEY not in repr(transport) and KEY not in repr(vars(transport))
    sdk = TallyHttpClient("https://collector.example/tally", KEY)
    try:
        assert KEY not in repr(sdk) and KEY not in repr(vars(sdk))
    finally:
        sdk.close(timeout_s=0)
    bad = "line\nbreak-" + KEY
    with pytest.raises(ValueError) as raised:
        HttpTransport("https://collector.example", bad)
    assert KEY not in str(raised.value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://collector.example",
        "collector.example",
        "https://user:pw@collector.example",
        "https://collector.example/?a=1",
        "http://collector.example:99999",
    ],
)
def test_an_endpoint_that_is_not_an_http_url_is_refused(endpoint: str) -> None:
    """The endpoint is an http(s) URL with a host and an optional path, nothing else."""
    with pytest.raises(ValueError):
        HttpTransport(endpoint, KEY)


def test_the_client_delivers_many_events_once_each_in_batches_within_the_limits(
    collector: Collector,
) -> None:
    """1,200 events of several apps through TallyHttpClient: each arrives exactly once, each
    app's in order, in requests of one app and at most 500 events."""
    sdk = TallyHttpClient(collector.url, KEY, retry_backoff_s=0.01)
    batch = events(1200)
    try:
        for event in batch:
            sdk.emit(event)
        assert sdk.flush(timeout_s=DEADLINE_S)
        assert (sdk.dropped_events, sdk.rejected_events, sdk.pending_events) == (0, 0, 0)
    finally:
        sdk.close()
    sent = [e for r in collector.requests for e in r.events]
    assert len({e.app_id for e in batch}) > 1, "the workload should hold several apps"
    for app in {e.app_id for e in batch}:
        in_order = [e.event_id for e in batch if e.app_id == app]
        assert [e["event_id"] for e in sent if e["app_id"] == app] == in_order
    assert len(sent) == len(batch)
    assert all(len({e["app_id"] for e in r.events}) == 1 for r in collector.requests)
    assert max(len(r.events) for r in collector.requests) <= 500


def test_extra_headers_may_not_replace_the_transports_own() -> None:
    """An extra Authorization (or Content-Encoding) header is refused when the transport is
    made, so it cannot send a body the collector would misread or a key it did not mean."""
    for name in ("Authorization", "content-encoding"):
        with pytest.raises(ValueError):
            HttpTransport("https://collector.example", KEY, headers={name: "x"})
