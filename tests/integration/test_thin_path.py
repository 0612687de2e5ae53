"""The thin path on real services: events under each consent level through real Kafka and the
real Faust worker into each real ClickHouse backend. What each level keeps is checked column
by column; no raw id, IP, referrer path, user agent or content is on any key or value of the
enriched and dead-letter topics, in ClickHouse, or in a log line, at DEBUG."""

import hashlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.daily_keys import DailyKeys, read_daily_keys
from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import Settings, load_settings
from deploy.wiring import sink_config, topic_names, topic_specs
from producers.sdk import TallyProducer
from schemas.batch import split_enriched_message
from schemas.enriched import ENRICHED_COLUMNS, table_name
from schemas.events import EVENT_MODELS
from schemas.examples import EXAMPLES
from schemas.validation import encode_event
from sinks.backends import ClickHouseBackend
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter

HMAC_SECRET = bytes(range(32))
DEADLINE_S = 90.0
DAY_MS = 86_400_000
IP = "81.2.69.160"
REFERRER_PATH = "/zq7-private-path/thread"
REFERRER = f"https://www.example.org{REFERRER_PATH}?q=zq7query"
USER_AGENT = EXAMPLES["login"]["user_agent"]
CONTENT_MARK = "zq7-see-you-at-nine-zq7"


def pseudonym(message: str, secret: bytes = HMAC_SECRET) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def utc_day(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Sent:
    """One event sent on purpose, with its raw ids and what each consent must leave of it."""

    event_id: str
    event_type: str
    consent: str
    user_id: str
    session_id: str
    client_time_ms: int

    def expected_columns(self, daily: DailyKeys) -> dict[str, str]:
        """What the consent level keeps of the ids, region and referrer (schemas/consent.py):
        anonymous ids under the random key of their UTC day, never the long-lived one."""
        if self.consent == "none":
            return {"user_pseudonym": "", "session_pseudonym": "", "key_id": "",
                    "region_code": "", "referrer_domain": ""}  # fmt: skip
        secret, key_id = HMAC_SECRET, "k-it"
        if self.consent == "anonymous":
            daily_key = daily.by_day[utc_day(self.client_time_ms)].key
            secret, key_id = daily_key.secret, daily_key.key_id
        return {
            "user_pseudonym": pseudonym(self.user_id, secret),
            "session_pseudonym": pseudonym(self.session_id, secret) if self.session_id else "",
            "key_id": key_id,
            "region_code": "England" if self.consent == "full" else "",
            "referrer_domain": "example.org",
        }


@dataclass(frozen=True)
class PipelineRun:
    settings: Settings
    sent: list[Sent]
    enriched: list[tuple[bytes | None, bytes]]
    dead: list[tuple[bytes | None, bytes]]

    @property
    def raw_values(self) -> list[bytes]:
        """Everything that must never leave the stream step."""
        ids = {s.user_id for s in self.sent} | {s.session_id for s in self.sent if s.session_id}
        return [
            *(i.encode() for i in ids),
            IP.encode(),
            REFERRER_PATH.encode(),
            b"zq7query",
            USER_AGENT.encode(),
            b"AppleWebKit",
            CONTENT_MARK.encode(),
        ]


def _event(event_type: str, consent: str, client_time_ms: int) -> Sent:
    user_id = f"user-{consent}-{uuid.uuid4().hex[:10]}"
    session_id = f"s-{uuid.uuid4().hex[:12]}" if "session_id" in EXAMPLES[event_type] else ""
    return Sent(str(uuid.uuid4()), event_type, consent, user_id, session_id, client_time_ms)


def _payload(sent: Sent, now_ms: int) -> bytes:
    """The wire form a client that ignores its own consent would send: every id included,
    so the stream step alone must enforce the level."""
    fields = {**EXAMPLES[sent.event_type], "event_id": sent.event_id, "consent": sent.consent,
              "user_id": sent.user_id, "ip": IP, "referrer": REFERRER, "user_agent": USER_AGENT,
              "client_time_ms": sent.client_time_ms, "collector_time_ms": now_ms}  # fmt: skip
    if sent.session_id:
        fields["session_id"] = sent.session_id
    model = EVENT_MODELS[(sent.event_type, fields["schema_version"])]
    return encode_event(model.model_validate(fields))


BAD_EVENTS = [
    orjson.dumps({**EXAMPLES["login"], "message": f"{CONTENT_MARK} bring the slides"}),
    orjson.dumps({**EXAMPLES["login"], "os_family": f"hi {CONTENT_MARK} are you there"}),
    b'{"event_type": "login", ' + CONTENT_MARK.encode(),
]


@pytest.fixture(scope="module")
def pipeline_run(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineRun]:
    """Events under each consent level, a retried send and bad events, through one running
    stream worker (logging at DEBUG) on fresh topics."""
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path_factory.mktemp("state")),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-it:{HMAC_SECRET.hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_ALLOWED_LATENESS_S": str(3 * DAY_MS // 1000),  # days 1 and 2 ago still count
            "TALLY_SINK_BATCH_INTERVAL_S": "0.3",
            "TALLY_LOG_LEVEL": "DEBUG",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    now_ms = int(time.time() * 1000)
    sent = [
        _event(event_type, consent, now_ms)
        for consent in ("full", "anonymous", "none")
        for event_type in ("login", "session_start")
    ]
    # One anonymous user on two UTC days: two unrelated pseudonyms.
    day1 = _event("session_start", "anonymous", now_ms - DAY_MS)
    day2 = replace(_event("session_start", "anonymous", now_ms - 2 * DAY_MS), user_id=day1.user_id)
    sent += [day1, day2]
    with stream_worker(settings, kafka_bootstrap) as worker:
        sdk = TallyProducer(kafka_bootstrap, topic_names(settings))
        first = EVENT_MODELS[("login", 1)].model_validate(
            {**EXAMPLES["login"], "event_id": str(uuid.uuid4()), "user_id": "user-sdk-zq7",
             "ip": IP, "referrer": REFERRER, "client_time_ms": now_ms}
        )  # fmt: skip
        sdk.emit(first)
        sdk.emit(first)  # a client's retry: refused as a duplicate
        sdk.flush(timeout_s=30)
        sdk.close()
        sent.append(Sent(first.event_id, "login", "full", "user-sdk-zq7", "", now_ms))
        _send_raw(kafka_bootstrap, topic_names(settings).raw,
                  [_payload(s, now_ms) for s in sent[:-1]] + BAD_EVENTS)  # fmt: skip
        enriched = _wait_for(
            settings,
            topic_names(settings).enriched,
            len(sent),
            worker,
            lambda value: len(split_enriched_message(value)),
        )
        dead = _wait_for(settings, topic_names(settings).dead, len(BAD_EVENTS) + 1, worker)
    yield PipelineRun(settings, sent, enriched, dead)


def _send_raw(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    """Bypass the SDK, as a broken or hostile client would."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for payload in payloads:
        producer.send(topic, payload)
    producer.flush(timeout=30)
    producer.close()


def _wait_for(
    settings: Settings,
    topic: str,
    count: int,
    worker: object,
    records_in: Callable[[bytes], int] = lambda _: 1,
) -> list[tuple[bytes | None, bytes]]:
    """The topic's messages once they hold ``count`` records (``records_in`` counts a
    message's)."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=500,
    )  # fmt: skip
    messages: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while sum(records_in(v) for _, v in messages) < count and time.monotonic() < deadline:
            messages.extend((message.key, message.value) for message in consumer)
            assert worker.poll() is None, "stream worker exited"  # type: ignore[attr-defined]
    finally:
        consumer.close()
    got = sum(records_in(v) for _, v in messages)
    assert got >= count, f"{got} of {count} records on {topic}"
    return messages


def _sink_until(backend: ClickHouseBackend, settings: Settings, group: str, rows: int) -> None:
    config = sink_config(settings, settings.kafka_bootstrap or "")
    config = type(config)(**{**config.__dict__, "group_id": group})
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    stop = threading.Event()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while sink.records_done < rows and time.monotonic() < deadline:
            messages = sink.poll_batch()
            if messages:
                sink.write_batch(messages, stop)
    finally:
        sink.close()
    assert sink.records_done >= rows, f"sink handled {sink.records_done} records"


def _stored(backend: ClickHouseBackend, event_type: str) -> dict[str, dict[str, object]]:
    columns = [name for name, _ in ENRICHED_COLUMNS[event_type]]
    rows = backend.query(f"SELECT {', '.join(columns)} FROM {table_name(event_type)} FINAL")
    return {row[0]: dict(zip(columns, row, strict=True)) for row in rows}


def test_each_consent_level_stores_exactly_what_it_allows(
    pipeline_run: PipelineRun, backend: ClickHouseBackend, caplog: pytest.LogCaptureFixture
):
    """Every event lands once; full keeps stable pseudonyms and region, anonymous keeps
    pseudonyms under its day's random key and no region, none keeps no id, region or
    referrer; browser, OS and country are kept at every level; the sink logs nothing raw at
    DEBUG."""
    caplog.set_level(logging.DEBUG)
    apply_migrations(backend)
    _sink_until(backend, pipeline_run.settings, f"sink-{uuid.uuid4().hex[:8]}",
                len(pipeline_run.sent))  # fmt: skip
    stored = {**_stored(backend, "login"), **_stored(backend, "session_start")}
    assert sorted(stored) == sorted(s.event_id for s in pipeline_run.sent)
    daily = read_daily_keys(pipeline_run.settings.daily_keys_path)
    for sent in pipeline_run.sent:
        row = stored[sent.event_id]
        expected = sent.expected_columns(daily)
        assert {k: row[k] for k in expected} == expected, sent
        assert (row["consent"], row["country_code"], row["browser_family"]) == (
            sent.consent, "GB", "Chrome"
        )  # fmt: skip
    day1, day2 = (stored[s.event_id] for s in pipeline_run.sent[6:8])
    assert day1["user_pseudonym"] != day2["user_pseudonym"]
    assert day1["session_pseudonym"] != day2["session_pseudonym"]
    everything = orjson.dumps([{k: str(v) for k, v in r.items()} for r in stored.values()])
    assert caplog.text, "the sink logged nothing at DEBUG"
    for raw in pipeline_run.raw_values:
        assert raw not in everything
        assert raw.decode() not in caplog.text


def test_replaying_the_topic_does_not_double_count(
    pipeline_run: PipelineRun, backend: ClickHouseBackend
):
    """Two more consumer groups replaying the same events leave one row per event, counted
    without FINAL (a materialized view would see every inserted row)."""
    apply_migrations(backend)
    for _ in range(3):
        _sink_until(backend, pipeline_run.settings, f"replay-{uuid.uuid4().hex[:8]}",
                    len(pipeline_run.sent))  # fmt: skip
    count = backend.query(f"SELECT count() FROM {table_name('login')}")[0][0]
    assert count == sum(1 for s in pipeline_run.sent if s.event_type == "login")


def test_no_key_or_value_on_the_output_topics_holds_a_raw_value(pipeline_run: PipelineRun):
    """Keys and values of every enriched record and dead letter hold no raw id, IP,
    referrer path, user agent or content; enriched keys are pseudonyms or event ids."""
    records = [r for _, value in pipeline_run.enriched for r in split_enriched_message(value)]
    assert len(records) == len(pipeline_run.sent)
    for key, value in [*pipeline_run.enriched, *pipeline_run.dead]:
        for raw in pipeline_run.raw_values:
            assert raw not in (key or b"") and raw not in value
    for key, value in pipeline_run.enriched:
        record = split_enriched_message(value)[0]  # a message is keyed by its first record
        assert key == (record["user_pseudonym"] or record["event_id"]).encode()


def test_bad_events_become_redacted_dead_letters(pipeline_run: PipelineRun):
    """Content, text in a field, broken JSON and a retried send each become one dead letter
    with its reason and declared type; the worker's DEBUG log holds no raw value."""
    letters = sorted(
        (orjson.loads(value)["reason"], orjson.loads(value)["event_type"])
        for _, value in pipeline_run.dead
    )
    assert letters == [("content_forbidden", "login"), ("content_forbidden", "login"),
                       ("duplicate", "login"), ("malformed_json", None)]  # fmt: skip
    worker_log = (pipeline_run.settings.state_dir / "logs" / "worker.log").read_bytes()
    assert b"DEBUG" in worker_log, "the worker did not log at DEBUG"
    for raw in pipeline_run.raw_values:
        assert raw not in worker_log, raw
