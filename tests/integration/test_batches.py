"""Batches on real Kafka through the real Faust worker: the valid events of every batch and
single event are enriched, once each; each invalid event inside a batch is one dead letter
with its index and its batch's offset; a broken envelope is one dead letter; no output holds
a rejected value, a raw id or the IP."""

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import Settings, load_settings
from deploy.wiring import topic_names, topic_specs
from schemas.batch import encode_batch, split_enriched_message
from schemas.events import EVENT_MODELS, Envelope
from schemas.examples import EXAMPLES
from schemas.validation import encode_event

DEADLINE_S = 90.0
SETTLE_S = 2.0
"""After the expected count, how long the topic must stay quiet for the count to be final."""
HMAC_SECRET = bytes(range(32))
APP = EXAMPLES["login"]["app_id"]
IP = "81.2.69.160"
MARK = "zq7~SECRET~zq7"

Message = tuple[bytes | None, bytes]


def _event(event_type: str, **changes: Any) -> Envelope:
    """A valid event with fresh ids and no stamps of its own, as a client sends it; each
    session event in a session of its own, so that none is judged against another's."""
    fields = {
        **EXAMPLES[event_type],
        "event_id": str(uuid.uuid4()),
        "user_id": f"u-zq7-{uuid.uuid4().hex[:10]}",
        **changes,
    }
    if fields.get("session_id"):
        fields["session_id"] = f"s-{uuid.uuid4().hex[:12]}"
    for stamp in ("ip", "collector_time_ms"):
        fields.pop(stamp, None)
    return EVENT_MODELS[(event_type, fields["schema_version"])].model_validate(fields)


def _tampered(raw: bytes, **changes: Any) -> bytes:
    """A batch with events replaced at some indices (``e<i>``) or envelope fields changed."""
    batch = orjson.loads(raw)
    for name, value in changes.items():
        if name.startswith("e") and name[1:].isdigit():
            batch["events"][int(name[1:])] = value
        else:
            batch[name] = value
    return orjson.dumps(batch)


@dataclass(frozen=True)
class Sent:
    """One raw message: its key and value, and what the worker must make of it."""

    key: bytes | None
    value: bytes
    valid_ids: list[str]
    letters: list[tuple[str, str | None, int | None]]
    """(reason, field, index) of each dead letter it must give."""


@dataclass(frozen=True)
class BatchRun:
    settings: Settings
    sent: list[tuple[Sent, int, int]]  # with its partition and offset on the raw topic
    enriched: list[Message]
    """One (key, record) per enriched event."""
    dead: list[Message]
    raw_user_ids: list[str]
    collector_time_ms: int
    enriched_messages: list[Message]


def _messages(now_ms: int) -> tuple[list[Sent], list[str]]:
    stamp = {"app_id": APP, "collector_time_ms": now_ms, "ip": IP}
    a = [_event(t, client_time_ms=now_ms - 1000) for t in ("login", "session_start", "logout")]
    b = [
        _event(t, client_time_ms=now_ms)
        for t in ("login", "client_info", "quality_sample", "session_end", "logout")
    ]
    c = [_event("login", client_time_ms=now_ms)]
    d = [a[0], _event("client_info", client_time_ms=now_ms)]  # a[0] again: a client's retry
    singles = [_event("login", client_time_ms=now_ms), _event("session_end", client_time_ms=now_ms)]
    bad_single = {**EXAMPLES["logout"], "note": f"{MARK} see you at nine"}
    other_app = {**orjson.loads(encode_event(b[4])), "app_id": "other.app"}
    sent = [
        Sent(b"client-a", encode_batch(a, **stamp), [e.event_id for e in a], []),
        Sent(
            b"client-b",
            _tampered(
                encode_batch(b, **stamp),
                e1={**orjson.loads(encode_event(b[1])), "message": f"{MARK} see you at nine"},
                e3=MARK,
                e4=other_app,
            ),
            [b[0].event_id, b[2].event_id],
            [
                ("content_forbidden", None, 1),
                ("malformed_json", None, 3),
                ("app_mismatch", "app_id", 4),
            ],
        ),
        Sent(
            b"client-c",
            _tampered(encode_batch(c, **stamp), schema_version=99),
            [],
            [("unsupported_version", "schema_version", None)],
        ),
        # same key as the first batch: same partition, read after it, so a[0] is the repeat
        Sent(
            b"client-a", encode_batch(d, **stamp), [d[1].event_id], [("duplicate", "event_id", 0)]
        ),
        *(
            Sent(
                None,
                encode_event(e.model_copy(update={"collector_time_ms": now_ms, "ip": IP})),
                [e.event_id],
                [],
            )
            for e in singles
        ),
        Sent(None, orjson.dumps(bad_single), [], [("content_forbidden", None, None)]),
    ]
    raw_ids = [e.user_id for e in (*a, *b, *c, *d, *singles) if e.user_id]
    return sent, raw_ids


def _read(
    topic: str,
    bootstrap: str,
    count: int,
    worker: Any,
    records_in: Callable[[bytes], int] = lambda _: 1,
) -> list[Message]:
    """Every message on ``topic`` once ``count`` records have come (``records_in`` counts a
    message's) and the topic stayed quiet for SETTLE_S, so that one too many is seen; polls
    with a deadline."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=500
    )
    messages: list[Message] = []
    records = 0
    deadline = time.monotonic() + DEADLINE_S
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            before = len(messages)
            messages.extend((m.key, m.value) for m in consumer)
            records += sum(records_in(value) for _, value in messages[before:])
            assert worker.poll() is None, "stream worker exited"
            if records < count or len(messages) > before:
                quiet_since = None
                continue
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= SETTLE_S:
                break
    finally:
        consumer.close()
    assert records >= count, f"{records} of {count} records on {topic}"
    return messages


@pytest.fixture(scope="module")
def batch_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchRun]:
    """Batches (sound, with broken events, with a broken envelope, with a retried event)
    and single events, through one running stream worker on fresh topics."""
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path_factory.mktemp("state")),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"b{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-it:{HMAC_SECRET.hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_LOG_LEVEL": "DEBUG",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    topics = topic_names(settings)
    now_ms = int(time.time() * 1000)
    sent, raw_ids = _messages(now_ms)
    with stream_worker(settings, kafka_bootstrap) as worker:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        placed = []
        for message in sent:  # one at a time: the retried batch must follow the first
            meta = producer.send(topics.raw, message.value, key=message.key).get(timeout=30)
            placed.append((message, meta.partition, meta.offset))
        producer.close()
        enriched_messages = _read(
            topics.enriched,
            kafka_bootstrap,
            sum(len(s.valid_ids) for s in sent),
            worker,
            lambda value: len(split_enriched_message(value)),
        )
        dead = _read(topics.dead, kafka_bootstrap, sum(len(s.letters) for s in sent), worker)
    enriched = [
        (key, orjson.dumps(record))
        for key, value in enriched_messages
        for record in split_enriched_message(value)
    ]
    yield BatchRun(settings, placed, enriched, dead, raw_ids, now_ms, enriched_messages)


def test_exactly_the_valid_events_are_enriched(batch_run: BatchRun):
    """The enriched topic holds each valid event of every batch and single message once,
    and nothing else; batch events carry the envelope's time and the country of its IP."""
    ids = sorted(
        record["event_id"]
        for record in (orjson.loads(value) for _, value in batch_run.enriched)
        if record["event_type"] != "session_summary"
    )
    assert ids == sorted(i for s, _, _ in batch_run.sent for i in s.valid_ids)
    for _, value in batch_run.enriched:  # every event was stamped by the collector alone
        record = orjson.loads(value)
        assert record["country_code"] == "GB"
        assert record["received_time"] == batch_run.collector_time_ms // 1000


def test_each_raw_message_leaves_whole_in_one_enriched_message(batch_run: BatchRun):
    """The valid events of one raw message leave together, in their batch's order, inside one
    enriched message (which may hold other messages' records too): the per-message cost is
    paid once per batch of messages, not once per event."""
    leaving = [
        [record["event_id"] for record in split_enriched_message(value)]
        for _, value in batch_run.enriched_messages
    ]
    assert len(leaving) < sum(1 for s, _, _ in batch_run.sent if s.valid_ids)
    for sent, _, _ in batch_run.sent:
        if sent.valid_ids:
            assert any(
                ids[i : i + len(sent.valid_ids)] == sent.valid_ids
                for ids in leaving
                for i in range(len(ids))
            ), sent.valid_ids


def test_each_invalid_event_is_one_dead_letter_with_its_index(batch_run: BatchRun):
    """One dead letter per invalid event, naming its batch's partition and offset and its
    index; a broken envelope and a bad single event give one each, without index."""
    expected = sorted(
        (reason, field, partition, offset, index)
        for s, partition, offset in batch_run.sent
        for reason, field, index in s.letters
    )
    letters = [orjson.loads(value) for _, value in batch_run.dead]
    got = sorted(
        (d["reason"], d["field"], d["source"]["partition"], d["source"]["offset"], d["index"])
        for d in letters
    )
    assert got == expected
    assert {d["source"]["topic"] for d in letters} == {topic_names(batch_run.settings).raw}


def test_no_output_holds_a_rejected_value_a_raw_id_or_the_ip(batch_run: BatchRun):
    """Keys and values of every enriched record and dead letter, and the worker's DEBUG log,
    hold neither the marked content, nor a raw user id, nor the IP stamped on the envelopes."""
    forbidden = [MARK.encode(), IP.encode(), *(i.encode() for i in batch_run.raw_user_ids)]
    for key, value in [*batch_run.enriched, *batch_run.dead]:
        for raw in forbidden:
            assert raw not in (key or b"") and raw not in value
    worker_log = (batch_run.settings.state_dir / "logs" / "worker.log").read_bytes()
    assert b"DEBUG" in worker_log, "the worker did not log at DEBUG"
    for raw in forbidden:
        assert raw not in worker_log, raw
