"""The thin path on real services: a login through real Kafka and the real Faust agent into
each real ClickHouse backend, pseudonymized, with no raw id and no IP anywhere."""

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import Settings, load_settings
from deploy.wiring import sink_config, topic_names, topic_specs
from producers.sdk import TallyProducer
from schemas.enriched import ENRICHED_COLUMNS, table_name
from schemas.events import LoginV1
from schemas.examples import EXAMPLES
from sinks.backends import ClickHouseBackend
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter

HMAC_SECRET = bytes(range(32))
DEADLINE_S = 90.0


@dataclass(frozen=True)
class SentLogin:
    settings: Settings
    user_id: str
    ip: str
    event_id: str
    enriched: list[bytes]
    dead: list[bytes]


@pytest.fixture(scope="module")
def sent_login(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentLogin]:
    """One login sent through a running stream worker on fresh topics."""
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path_factory.mktemp("state")),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-it:{HMAC_SECRET.hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_SINK_BATCH_INTERVAL_S": "0.3",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    user_id, ip = f"user-{uuid.uuid4().hex[:12]}", "81.2.69.160"
    event = LoginV1.model_validate(
        {**EXAMPLES["login"], "event_id": str(uuid.uuid4()), "user_id": user_id, "ip": ip,
         "client_time_ms": int(time.time() * 1000)}
    )  # fmt: skip
    with stream_worker(settings, kafka_bootstrap) as worker:
        producer = TallyProducer(kafka_bootstrap, topic_names(settings))
        producer.emit(event)
        producer.emit(event)  # a client's retry: refused as a duplicate
        producer.flush(timeout_s=30)
        producer.close()
        _send_raw(kafka_bootstrap, topic_names(settings).raw, BAD_EVENTS)
        enriched = _wait_for(settings, topic_names(settings).enriched, 1, worker)
        dead = _wait_for(settings, topic_names(settings).dead, len(BAD_EVENTS) + 1, worker)
    yield SentLogin(settings, user_id, ip, event.event_id, enriched, dead)


CONTENT_MARK = "zq7-see-you-at-nine-zq7"
BAD_EVENTS = [
    orjson.dumps({**EXAMPLES["login"], "message": f"{CONTENT_MARK} bring the slides"}),
    orjson.dumps({**EXAMPLES["login"], "os_family": f"hi {CONTENT_MARK} are you there"}),
    b'{"event_type": "login", ' + CONTENT_MARK.encode(),
]


def _send_raw(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    """Bypass the SDK, as a broken or hostile client would."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for payload in payloads:
        producer.send(topic, payload)
    producer.flush(timeout=30)
    producer.close()


def _wait_for(settings: Settings, topic: str, count: int, worker: object) -> list[bytes]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=500,
    )  # fmt: skip
    values: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(values) < count and time.monotonic() < deadline:
            values.extend(message.value for message in consumer)
            assert worker.poll() is None, "stream worker exited"  # type: ignore[attr-defined]
    finally:
        consumer.close()
    assert len(values) >= count, f"{len(values)} of {count} messages on {topic}"
    return values


def _sink_until(backend: ClickHouseBackend, settings: Settings, group: str, rows: int) -> None:
    config = sink_config(settings, settings.kafka_bootstrap or "")
    config = type(config)(**{**config.__dict__, "group_id": group})
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    stop = threading.Event()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while sink.rows_written < rows and time.monotonic() < deadline:
            messages = sink.poll_batch()
            if messages:
                sink.write_batch(messages, stop)
    finally:
        sink.close()
    assert sink.rows_written >= rows, f"sink wrote {sink.rows_written} rows"


def test_one_login_is_one_pseudonymous_row(sent_login: SentLogin, backend: ClickHouseBackend):
    """Exactly one row lands; its user id is the keyed HMAC; no raw id or IP is stored."""
    apply_migrations(backend)
    _sink_until(backend, sent_login.settings, f"sink-{uuid.uuid4().hex[:8]}", 1)
    columns = [name for name, _ in ENRICHED_COLUMNS["login"]]
    rows = backend.query(f"SELECT {', '.join(columns)} FROM {table_name('login')} FINAL")
    assert len(rows) == 1
    row = dict(zip(columns, rows[0], strict=True))
    expected = hmac.new(HMAC_SECRET, sent_login.user_id.encode(), hashlib.sha256).hexdigest()
    assert row["user_pseudonym"] == expected
    assert row["key_id"] == "k-it" and row["event_id"] == sent_login.event_id
    assert row["country_code"] == "GB"
    stored = orjson.dumps({k: str(v) for k, v in row.items()}).decode()
    assert sent_login.user_id not in stored and sent_login.ip not in stored


def test_replaying_the_topic_does_not_double_count(
    sent_login: SentLogin, backend: ClickHouseBackend
):
    """A second consumer group replaying the same events leaves one row per event."""
    apply_migrations(backend)
    for _ in range(2):
        _sink_until(backend, sent_login.settings, f"replay-{uuid.uuid4().hex[:8]}", 1)
    count = backend.query(f"SELECT count() FROM {table_name('login')} FINAL")[0][0]
    assert count == 1


def test_bad_events_become_redacted_dead_letters(sent_login: SentLogin):
    """Content, text in a field, broken JSON and a retried send each become one dead letter
    with its reason; the content appears in no dead letter, enriched record or log line."""
    reasons = sorted(orjson.loads(letter)["reason"] for letter in sent_login.dead)
    assert reasons == ["content_forbidden", "content_forbidden", "duplicate", "malformed_json"]
    assert len(sent_login.enriched) == 1
    worker_log = (sent_login.settings.state_dir / "logs" / "worker.log").read_bytes()
    assert worker_log, "the worker wrote no log at all"
    for place in [*sent_login.dead, *sent_login.enriched, worker_log]:
        assert CONTENT_MARK.encode() not in place
        assert sent_login.user_id.encode() not in place and sent_login.ip.encode() not in place
