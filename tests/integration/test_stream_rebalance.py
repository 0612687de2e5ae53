"""Two stream workers in one group on real Kafka: partitions move to a second worker and back
while calls go on, and every call is still summarized once, with every sample once.

A worker's tables live in its memory while it runs and in their changelogs; a worker that is
given a partition rebuilds that partition's sessions from the recovered table. This test
holds that path, where the changelog, not the worker that wrote it, carries the state.

No event is sent while partitions move: a worker must rebuild its sessions once recovery
ends, not only when the next batch comes (which made this test wait on a replay that a
timely commit avoids, and time out)."""

import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import Settings, load_settings
from deploy.wiring import topic_names, topic_specs
from schemas.batch import encode_batch, split_enriched_message
from tests.session_events import session_event

pytestmark = pytest.mark.kafka

DEADLINE_S = 120.0
CALLS = 30
SAMPLES_PER_PHASE = 3
IP = "81.2.69.160"


def _settings(state: Path, namespace: str, bootstrap: str) -> Settings:
    return load_settings(
        {
            "TALLY_STATE_DIR": str(state),
            "TALLY_KAFKA_BOOTSTRAP": bootstrap,
            "TALLY_TOPIC_NAMESPACE": namespace,
            "TALLY_HMAC_KEY": f"k-rebalance:{bytes(range(32)).hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_RAW_PARTITIONS": "2",
            "TALLY_STREAM_BATCH_SIZE": "5",
        }
    )


def _envelope(event_type: str, session: str, count: int) -> tuple[bytes, list[str]]:
    now_ms = int(time.time() * 1000)
    events = [session_event(event_type, session, now_ms) for _ in range(count)]
    value = encode_batch(events, app_id=events[0].app_id, collector_time_ms=now_ms, ip=IP)
    return value, [e.event_id for e in events]


def _log(settings: Settings) -> str:
    path = settings.state_dir / "logs" / "worker.log"
    return path.read_text() if path.exists() else ""


def test_calls_survive_partitions_moving_between_workers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}."
    first = _settings(tmp_path / "first", namespace, kafka_bootstrap)
    second = _settings(tmp_path / "second", namespace, kafka_bootstrap)
    names = topic_names(first)
    ensure_topics(kafka_bootstrap, topic_specs(first))
    calls = [f"call-{uuid.uuid4().hex[:10]}" for _ in range(CALLS)]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    enriched = KafkaConsumer(
        names.enriched,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=200,
    )
    records: list[dict[str, Any]] = []
    sent: set[str] = set()

    def send(event_type: str, count: int) -> None:
        for call in calls:
            value, ids = _envelope(event_type, call, count)
            producer.send(names.raw, value, key=call.encode())
            sent.update(ids)
        producer.flush()

    def wait_until(what: str, done: Callable[[], bool], workers: list[Any]) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not done():
            for message in enriched:
                records.extend(split_enriched_message(message.value))
            for worker in workers:
                assert worker.poll() is None, "a stream worker exited"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"

    def all_out() -> bool:
        return sent <= {r["event_id"] for r in records}

    def rebuilt(settings: Settings, partitions: str, times: int) -> Callable[[], bool]:
        pattern = rf"tables recovered for partitions \[{partitions}\]"
        return lambda: len(re.findall(pattern, _log(settings))) >= times

    try:
        with stream_worker(first, kafka_bootstrap) as worker_a:
            send("session_start", 1)
            send("quality_sample", SAMPLES_PER_PHASE)
            wait_until("the first phase's events", all_out, [worker_a])
            with stream_worker(second, kafka_bootstrap) as worker_b:
                wait_until(
                    "the partitions to split", rebuilt(second, r"\d", 1), [worker_a, worker_b]
                )
                wait_until("the first worker to give one up", rebuilt(first, r"\d", 1), [worker_a])
                send("quality_sample", SAMPLES_PER_PHASE)
                wait_until("the second phase's events", all_out, [worker_a, worker_b])
            wait_until("the partitions to come back", rebuilt(first, "0, 1", 2), [worker_a])
            send("quality_sample", SAMPLES_PER_PHASE)
            send("session_end", 1)

            def all_summarized() -> bool:
                summaries = {r["event_id"] for r in records if r["event_type"] == "session_summary"}
                return all_out() and len(summaries) == CALLS

            wait_until("every event and every summary", all_summarized, [worker_a])
    finally:
        producer.close()
        enriched.close()
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for record in records:
        if record["event_type"] == "session_summary":
            by_id[record["event_id"]].add(orjson.dumps(record))
    assert len(by_id) == CALLS
    assert all(len(versions) == 1 for versions in by_id.values()), "a call summarized twice"
    outcomes = Counter(
        (summary["end_reason"], summary["sample_count"])
        for summary in (orjson.loads(next(iter(versions))) for versions in by_id.values())
    )
    assert outcomes == {("normal", 3 * SAMPLES_PER_PHASE): CALLS}
