"""The Python SDK through a broker outage and a host restart, on real services, over each
transport: Kafka directly, and HTTP to the collector (run in this process on the same broker,
so a broker outage makes it answer 503, and stopped too when the host restarts).

The broker here is this module's own (its state under the test's temporary folder), since the
tests stop and start it; the session's shared broker is never touched. Each test sends through
the SDK with a spool file, loses the broker while sending, gets it back, and then checks the
raw topic (every event id at least once) and, through the real stream worker and sink,
ClickHouse (every event id exactly once). No test may see kafka-python's event loop fail a
task of its own (``kafka.net.selector``: "Unhandled exception in task")."""

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from kafka import KafkaConsumer

from deploy.kafka import KafkaStartError, ensure_topics, start_kafka, stop_kafka
from deploy.run import stream_worker
from deploy.services.ports import free_ports
from deploy.settings import Settings, load_settings
from deploy.wiring import (
    collector_config,
    collector_producer,
    sink_config,
    topic_names,
    topic_specs,
)
from producers.collector.app import METRICS_KEY, create_app
from producers.collector.metrics import CollectorMetrics
from producers.sdk import TallyClient, TallyHttpClient, TallyProducer
from producers.workload import generate_workload
from schemas.enriched import table_name
from schemas.events import EVENT_TYPES, Envelope
from sinks.backends import EmbeddedClickHouse
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from tests.kafka_fixtures import KAFKA_JARS_DIR
from tests.services import service_unavailable

pytestmark = pytest.mark.kafka

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0
EMIT_BOUND_S = 0.5
"""The longest one emit may take with the broker down (a local SQLite commit, on a busy CI)."""
SDK_OPTIONS = {"send_timeout_s": 2.0, "retry_backoff_s": 0.2, "retry_backoff_max_s": 1.0}
"""Short timeouts and backoff, so an outage of seconds costs the test seconds."""
HTTP_SDK_OPTIONS = {**SDK_OPTIONS, "send_timeout_s": 5.0}
"""Longer than the collector's wait for Kafka (2 s here), so an outage is answered 503."""
KEY = "tk-durability-test-key"
"""The collector here asks for no key; the SDK sends one all the same."""
TRANSPORTS = ["kafka", "http"]


@dataclass(frozen=True)
class Broker:
    """This module's broker: where it keeps its state, and its fixed ports."""

    state_dir: Path
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            start_kafka(
                self.state_dir, KAFKA_JARS_DIR, port=self.port, controller_port=self.controller_port
            )
        except KafkaStartError as exc:
            service_unavailable(f"Kafka broker did not start: {exc}")

    def stop(self) -> None:
        assert stop_kafka(self.state_dir), "the broker was not running"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker for this module alone, stopped at the end whatever the tests did to it."""
    port, controller_port = free_ports(2)
    own = Broker(tmp_path_factory.mktemp("sdk-kafka"), port, controller_port)
    own.start()
    try:
        yield own
    finally:
        stop_kafka(own.state_dir)


def fresh_settings(broker: Broker, state_dir: Path) -> Settings:
    """Settings on fresh topics of the module's broker, which exist before the SDK sends."""
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(state_dir),
            "TALLY_KAFKA_BOOTSTRAP": broker.bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-sdk:{bytes(range(32)).hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_SINK_BATCH_INTERVAL_S": "0.3",
            "TALLY_COLLECTOR_PRODUCE_TIMEOUT_S": "2",
        }
    )
    ensure_topics(broker.bootstrap, topic_specs(settings))
    return settings


class Collector:
    """The HTTP collector on the module's broker, served from a thread of this process with
    its own event loop; ``stop`` and ``start`` again keep its port."""

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        (self._port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self._port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._metrics: CollectorMetrics | None = None

    def start(self) -> None:
        app = create_app(
            collector_config(self._settings),
            collector_producer(self._settings, self._bootstrap),
        )
        self._metrics = app[METRICS_KEY]
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self._port).start())
        self._loop, self._runner = loop, runner
        self._thread = threading.Thread(target=loop.run_forever, name="collector", daemon=True)
        self._thread.start()

    def requests_refused(self, reason: str) -> float:
        """Requests answered with ``reason`` since the collector last started."""
        assert self._metrics is not None, "the collector never started"
        found = self._metrics.registry.get_sample_value(
            "tally_collector_requests_refused_total", {"reason": reason}
        )
        return found or 0.0

    def stop(self) -> None:
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None:
            return
        self._loop = self._runner = self._thread = None
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=DEADLINE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=DEADLINE_S)
        assert not thread.is_alive(), "the collector's thread did not stop"
        loop.close()


@contextlib.contextmanager
def transport_for(kind: str, settings: Settings, broker: Broker) -> Iterator[Collector | None]:
    """For ``http``, the collector, running until the test ends; for ``kafka``, nothing."""
    if kind == "kafka":
        yield None
        return
    collector = Collector(settings, broker.bootstrap)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


def open_sdk(
    settings: Settings, broker: Broker, collector: Collector | None, spool: Path
) -> TallyClient:
    """The SDK on ``spool``: over HTTP to ``collector`` if there is one, else over Kafka."""
    if collector is not None:
        return TallyHttpClient(collector.url, KEY, spool_path=spool, **HTTP_SDK_OPTIONS)  # type: ignore[arg-type]
    return TallyProducer(
        broker.bootstrap,
        topic_names(settings),
        compression_type=settings.kafka_compression_type,
        spool_path=spool,
        **SDK_OPTIONS,  # type: ignore[arg-type]
    )


@pytest.fixture
def kafka_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if kafka-python's event loop fails a task, or its I/O thread an
    iteration (its connection errors while the broker is down are expected, at ERROR)."""
    with caplog.at_level(logging.WARNING, logger="kafka"):
        yield
    failed = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and (r.name == "kafka.net.selector" or "Uncaught error" in r.getMessage())
    ]
    assert not failed, failed


SPAN_MS = 20 * 60_000
"""Client times over the last 20 minutes: well within the stream step's allowed lateness
(1 h), however long the outages here keep the events back."""


def workload(seed: int, end_ms: int, count: int) -> list[Envelope]:
    return generate_workload(seed=seed, clients=60, events=count, end_ms=end_ms, span_ms=SPAN_MS)


def raw_event_ids(settings: Settings, expected: set[str]) -> Counter[str]:
    """Event ids on the raw topic, read until every expected one is there or the deadline."""
    consumer = KafkaConsumer(
        topic_names(settings).raw,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
    )
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not expected <= seen.keys() and time.monotonic() < deadline:
            seen.update(event_id for message in consumer for event_id in ids_in(message.value))
    finally:
        consumer.close()
    return seen


def ids_in(message: bytes) -> list[str]:
    """The event ids in a raw message: one event (the Kafka transport) or a batch of the
    collector's (``schemas.batch``)."""
    obj = orjson.loads(message)
    return [e["event_id"] for e in obj["events"]] if "batch_type" in obj else [obj["event_id"]]


def stored_in_clickhouse(settings: Settings, chdb_dir: Path, expected: set[str]) -> set[str]:
    """Run the stream worker and a sink into embedded ClickHouse until every expected id is
    stored or the deadline passes; asserts each stored id is in one row, and returns them."""
    tables = [table_name(t) for t in EVENT_TYPES]
    found: set[str] = set()
    with (
        stream_worker(settings, settings.kafka_bootstrap or "") as worker,
        EmbeddedClickHouse(chdb_dir, database="sdk") as backend,
    ):
        apply_migrations(backend)
        config = replace(sink_config(settings, settings.kafka_bootstrap or ""), group_id="sdk-it")
        sink = EnrichedSink(config, ClickHouseWriter(backend))
        stop = threading.Event()
        deadline = time.monotonic() + DEADLINE_S
        try:
            while found != expected and time.monotonic() < deadline:
                assert worker.poll() is None, "the stream worker exited"
                messages = sink.poll_batch()
                if messages:
                    sink.write_batch(messages, stop)
                    ids = [
                        row[0] for t in tables for row in backend.query(f"SELECT event_id FROM {t}")
                    ]
                    assert len(ids) == len(set(ids)), "an event id is stored twice"
                    found = set(ids)
        finally:
            sink.close()
        counts = [backend.query(f"SELECT count(), uniqExact(event_id) FROM {t}")[0] for t in tables]
    assert sum(c for c, _ in counts) == sum(u for _, u in counts) == len(found)
    return found


@pytest.mark.usefixtures("kafka_loop_errors")
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_events_sent_across_a_broker_outage_land_exactly_once(
    broker: Broker, tmp_path: Path, kind: str
) -> None:
    """The broker stops while the SDK sends and stays down while it keeps emitting (over
    HTTP the collector holds each request up to its produce timeout, then answers 503):
    every emit returns at once without raising; once the broker is back, flush drains the
    spool, every event is on the raw topic, and ClickHouse holds each exactly once."""
    settings = fresh_settings(broker, tmp_path / "state")
    events = workload(seed=21, end_ms=int(time.time() * 1000), count=600)
    with transport_for(kind, settings, broker) as collector:
        sdk = open_sdk(settings, broker, collector, tmp_path / "spool.db")
        send_across_an_outage(sdk, broker, events)
        if collector is not None:
            assert collector.requests_refused("kafka_unavailable") > 0, "no 503 was answered"
    expected = {e.event_id for e in events}
    on_raw = raw_event_ids(settings, expected)
    assert expected <= on_raw.keys(), f"{len(expected - on_raw.keys())} events not on raw"
    assert stored_in_clickhouse(settings, tmp_path / "chdb", expected) == expected


def send_across_an_outage(sdk: TallyClient, broker: Broker, events: list[Envelope]) -> None:
    """Emit 150 events and see them confirmed, emit more while the broker stops and after,
    start it again, and see every event confirmed; then close the SDK."""
    slowest = 0.0
    try:
        for event in events[:150]:
            sdk.emit(event)
        assert sdk.flush(timeout_s=30), "the first events were not confirmed"
        stopper = threading.Thread(target=broker.stop)
        stopper.start()
        sent = 150
        while stopper.is_alive() and sent < 450:  # sending while the broker goes down
            started = time.monotonic()
            sdk.emit(events[sent])
            slowest = max(slowest, time.monotonic() - started)
            sent += 1
            time.sleep(0.005)  # pacing the emits, not synchronizing
        stopper.join()
        for event in events[sent:]:  # the broker is down
            started = time.monotonic()
            sdk.emit(event)
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < EMIT_BOUND_S, f"an emit took {slowest:.3f} s"
        assert not sdk.flush(timeout_s=1.0) and sdk.pending_events > 0
        broker.start()
        assert sdk.flush(timeout_s=DEADLINE_S), f"{sdk.pending_events} events still spooled"
        assert (sdk.dropped_events, sdk.rejected_events) == (0, 0)
    finally:
        sdk.close()


CHILD = """
import json, sys, time
from pathlib import Path
from producers.sdk import TallyHttpClient, TallyProducer
from producers.workload import generate_workload
from schemas.topics import TopicNames

target, namespace, spool, end_ms, count, codec, options, key = sys.argv[1:9]
events = generate_workload(seed=22, clients=60, events=int(count), end_ms=int(end_ms),
                           span_ms=20 * 60_000)
half = len(events) // 2
if target.startswith("http"):
    sdk = TallyHttpClient(target, key, spool_path=Path(spool), **json.loads(options))
else:
    sdk = TallyProducer(target, TopicNames(namespace), compression_type=codec or None,
                        spool_path=Path(spool), **json.loads(options))
for event in events[:half]:
    sdk.emit(event)
print(json.dumps({"first_half_confirmed": sdk.flush(timeout_s=30)}), flush=True)
sys.stdin.readline()  # the broker (and the collector) are stopped now
slowest = 0.0
for event in events[half:]:
    started = time.monotonic()
    sdk.emit(event)
    slowest = max(slowest, time.monotonic() - started)
started = time.monotonic()
pending = sdk.pending_events
sdk.close()
print(json.dumps({"slowest_emit_s": slowest, "pending": pending,
                  "close_s": time.monotonic() - started}), flush=True)
"""


@pytest.mark.usefixtures("kafka_loop_errors")
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_events_spooled_when_the_host_exits_are_sent_by_its_next_start(
    broker: Broker, tmp_path: Path, kind: str
) -> None:
    """A host process emits, loses the broker (over HTTP the collector too), emits more and
    exits; the next process on the same spool file, once they are back, sends what was
    left: every event is on the raw topic, and ClickHouse holds each exactly once."""
    settings = fresh_settings(broker, tmp_path / "state")
    spool, end_ms, count = tmp_path / "spool.db", int(time.time() * 1000), 400
    events = generate_workload(seed=22, clients=60, events=count, end_ms=end_ms,
                               span_ms=SPAN_MS)  # fmt: skip
    with transport_for(kind, settings, broker) as collector:
        options = SDK_OPTIONS if collector is None else HTTP_SDK_OPTIONS
        target = broker.bootstrap if collector is None else collector.url
        args = [target, settings.topic_namespace, str(spool), str(end_ms), str(count),
                settings.kafka_compression_type or "", json.dumps(options), KEY]  # fmt: skip
        host = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert host.stdin is not None and host.stdout is not None
        try:
            assert json.loads(host.stdout.readline()) == {"first_half_confirmed": True}
            if collector is not None:
                collector.stop()
            broker.stop()
            host.stdin.write("go\n")
            host.stdin.close()
            report = json.loads(host.stdout.readline())
            assert host.wait(timeout=DEADLINE_S) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                host.kill()
            broker.start()
            if collector is not None:
                collector.start()
        assert report["pending"] == count - count // 2
        assert report["slowest_emit_s"] < EMIT_BOUND_S and report["close_s"] < 10
        sdk = open_sdk(settings, broker, collector, spool)
        deliver_what_was_left(sdk, count - count // 2)
    expected = {e.event_id for e in events}
    on_raw = raw_event_ids(settings, expected)
    assert expected <= on_raw.keys(), f"{len(expected - on_raw.keys())} events not on raw"
    assert stored_in_clickhouse(settings, tmp_path / "chdb", expected) == expected


def deliver_what_was_left(sdk: TallyClient, left: int) -> None:
    """The next start: the SDK on the old spool holds ``left`` events and delivers them."""
    try:
        assert sdk.pending_events == left
        assert sdk.flush(timeout_s=DEADLINE_S), f"{sdk.pending_events} events still spooled"
    finally:
        sdk.close()
