"""The stream step's tables on real Kafka: a worker SIGKILLed mid-stream and started again
loses no event, applies none twice to its session, refuses a client's retry as a duplicate
whatever restarted in between, and summarizes every session once; a session that goes
silent closes by timeout; an event for a closed session is dead-lettered ``too_late``."""

import os
import re
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
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
from schemas.events import Envelope
from schemas.examples import EXAMPLES
from tests.session_events import session_event as _event

pytestmark = pytest.mark.kafka

DEADLINE_S = 120.0
APP = EXAMPLES["login"]["app_id"]
IP = "81.2.69.160"
CALLS = 40
"""Sessions with a start, SAMPLES samples and an end, split across the kill."""
ORPHANS = 8
"""Sessions with a start and ORPHAN_SAMPLES samples, then silence."""
SAMPLES = 12
ORPHAN_SAMPLES = 3
RETRIES = 20


def _envelope(events: list[Envelope]) -> bytes:
    return encode_batch(events, app_id=APP, collector_time_ms=int(time.time() * 1000), ip=IP)


@dataclass
class Topic:
    """Everything read so far from one topic."""

    consumer: KafkaConsumer
    values: list[bytes]

    def read(self) -> None:
        self.values.extend(message.value for message in self.consumer)


def _topic(bootstrap: str, name: str) -> Topic:
    consumer = KafkaConsumer(
        name, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=200
    )
    return Topic(consumer, [])


def _records(topic: Topic) -> list[dict[str, Any]]:
    return [record for value in topic.values for record in split_enriched_message(value)]


@dataclass(frozen=True)
class Recovery:
    settings: Settings
    sent_ids: set[str]
    calls: list[str]
    orphans: list[str]
    enriched: list[dict[str, Any]]
    copies: dict[str, set[bytes]]
    dead: list[dict[str, Any]]
    processed_before_kill: int
    worker_log: str


def _wait(
    what: str, done: Any, topics: list[Topic], worker: Any, missing: Any = lambda: ""
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for topic in topics:
            topic.read()
        if done():
            return
        assert worker.poll() is None, "the stream worker exited"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {missing()}"


@pytest.fixture(scope="module")
def recovery(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recovery]:
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path_factory.mktemp("state")),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-rec:{bytes(range(32)).hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_SESSION_SILENCE_TIMEOUT_S": "15",
            "TALLY_RAW_PARTITIONS": "2",
            "TALLY_STREAM_BATCH_SIZE": "5",
        }
    )
    names = topic_names(settings)
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    now_ms = int(time.time() * 1000)
    calls = [f"call-{uuid.uuid4().hex[:10]}" for _ in range(CALLS)]
    orphans = [f"orphan-{uuid.uuid4().hex[:10]}" for _ in range(ORPHANS)]
    half = SAMPLES // 2
    before: list[tuple[str, list[Envelope]]] = []
    after: list[tuple[str, list[Envelope]]] = []
    for session in calls:
        samples = [_event("quality_sample", session, now_ms) for _ in range(SAMPLES)]
        before.append((session, [_event("session_start", session, now_ms), *samples[:half]]))
        after.append((session, [*samples[half:], _event("session_end", session, now_ms)]))
    for session in orphans:
        samples = [_event("quality_sample", session, now_ms) for _ in range(ORPHAN_SAMPLES)]
        before.append((session, [_event("session_start", session, now_ms), *samples]))
    sent_ids = {e.event_id for _, events in before + after for e in events}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)

    def send(envelopes: list[tuple[str, list[Envelope]]], paced: threading.Event | None) -> None:
        for session, events in envelopes:
            producer.send(names.raw, _envelope(events), key=session.encode())
            if paced is not None:
                producer.flush()
                paced.wait(0.02)  # a steady stream, so that the kill lands in its middle
        producer.flush()

    enriched = _topic(kafka_bootstrap, names.enriched)
    dead = _topic(kafka_bootstrap, names.dead)
    first_half = threading.Event()
    sender = threading.Thread(target=send, args=(before, first_half))
    with stream_worker(settings, kafka_bootstrap) as worker:
        sender.start()
        _wait("the first output", lambda: len(_records(enriched)) >= 60, [enriched], worker)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        processed_before_kill = len(_records(enriched))
    sender.join(timeout=DEADLINE_S)
    send(after, None)
    log = settings.state_dir / "logs" / "worker.log"
    log_before = log.read_text() if log.exists() else ""
    with stream_worker(settings, kafka_bootstrap) as worker:

        def all_summarized() -> bool:
            records = _records(enriched)
            seen = {r["event_id"] for r in records}
            summaries = {
                r["session_pseudonym"] for r in records if r["event_type"] == "session_summary"
            }
            return sent_ids <= seen and len(summaries) == CALLS + ORPHANS

        def not_yet_out() -> str:
            records = _records(enriched)
            seen = {r["event_id"] for r in records}
            summarized = len(
                {r["session_pseudonym"] for r in records if r["event_type"] == "session_summary"}
            )
            return (
                f"{len(sent_ids - seen)} of {len(sent_ids)} events and "
                f"{CALLS + ORPHANS - summarized} of {CALLS + ORPHANS} summaries missing"
            )

        _wait("every event and every summary", all_summarized, [enriched], worker, not_yet_out)
        # A client's retries of events from before the kill, in new requests.
        retried = [events[0] for _, events in before[:RETRIES]]
        for event in retried:
            producer.send(names.raw, _envelope([event]), key=event.session_id.encode())
        # Samples for sessions whose summaries are out: one within the allowed lateness, kept
        # out of its summary; one from two hours ago, past it.
        now = int(time.time() * 1000)
        late = _event("quality_sample", calls[0], now)
        too_late = _event("quality_sample", calls[1], now - 2 * 3_600_000)
        for event in (late, too_late):
            producer.send(names.raw, _envelope([event]), key=event.session_id.encode())
        producer.flush()
        sent_ids.add(late.event_id)

        def refused() -> bool:
            reasons = Counter(orjson.loads(v)["reason"] for v in dead.values)
            seen = {r["event_id"] for r in _records(enriched)}
            return (
                reasons["duplicate"] >= RETRIES
                and reasons["too_late"] >= 1
                and late.event_id in seen
            )

        _wait("the retries and the late samples judged", refused, [enriched, dead], worker)
    producer.close()
    for topic in (enriched, dead):
        topic.read()
        topic.consumer.close()
    copies: dict[str, set[bytes]] = defaultdict(set)
    for record in _records(enriched):
        copies[record["event_id"]].add(orjson.dumps(record))
    yield Recovery(
        settings,
        sent_ids,
        calls,
        orphans,
        _records(enriched),
        copies,
        [orjson.loads(v) for v in dead.values],
        processed_before_kill,
        log.read_text()[len(log_before) :],
    )


def test_the_kill_landed_mid_stream(recovery: Recovery):
    """Some events were out before the kill, not all of them: the restart had work to do."""
    assert 0 < recovery.processed_before_kill < len(recovery.sent_ids)


def test_no_event_is_lost_and_every_copy_is_the_same(recovery: Recovery):
    """Every event is on the enriched topic; an event sent again by the replay of a batch the
    killed worker had not committed is the very same record, so tables keyed by event id keep
    it once."""
    events = {r["event_id"] for r in recovery.enriched if r["event_type"] != "session_summary"}
    assert events == recovery.sent_ids
    assert all(len(versions) == 1 for versions in recovery.copies.values())


def test_every_session_is_summarized_once_with_every_sample_once(recovery: Recovery):
    """One summary per session (the same record however often sent), counting each sample
    once across the kill: the session table was recovered from its changelog."""
    summaries = [r for r in recovery.enriched if r["event_type"] == "session_summary"]
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for summary in summaries:
        by_id[summary["event_id"]].add(orjson.dumps(summary))
    assert len(by_id) == CALLS + ORPHANS
    assert all(len(versions) == 1 for versions in by_id.values())
    distinct = [orjson.loads(next(iter(versions))) for versions in by_id.values()]
    outcomes = Counter((s["end_reason"], s["sample_count"]) for s in distinct)
    assert outcomes == {("normal", SAMPLES): CALLS, ("timeout", ORPHAN_SAMPLES): ORPHANS}
    for summary in distinct:
        assert summary["server_duration_ms"] is not None and summary["server_duration_ms"] >= 0
        assert summary["quality_class"] in ("good", "fair", "poor")


def test_retries_after_the_restart_are_duplicates_and_the_late_sample_too_late(
    recovery: Recovery,
):
    """A retry of an event the killed worker had handled is refused as duplicate by the
    restarted one, from the recovered table; a sample hours past the allowed lateness is
    too_late (one within it is kept: see the summaries' sample counts). Nothing else was
    refused."""
    reasons = Counter(letter["reason"] for letter in recovery.dead)
    assert reasons == {"duplicate": RETRIES, "too_late": 1}


def test_the_restarted_worker_recovered_its_tables(recovery: Recovery):
    """The restarted worker says what it recovered: ids and sessions, before its first
    batch."""
    found = re.findall(r"(\d+) recent event ids, (\d+) sessions", recovery.worker_log)
    assert found, recovery.worker_log[-2000:]
    ids, sessions = (int(n) for n in found[0])
    assert ids > 0 and sessions > 0
