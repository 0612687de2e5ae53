"""A worker that starts into a raw topic already full, with tables to recover and no offset
committed yet (a first start after a crash before the first commit, or a new group), reads
every raw message: none is skipped while the tables recover and then left behind.

Faust resumes the raw partitions and fetches from them before it seeks them back to the
committed offsets, and aiokafka's seek leaves a partition with no committed offset (or
offset 0) where that early fetch left it; streams/app.py seeks such partitions to their
start. Without that, this test failed 2 runs of 3 (1,180 and 1,172 of 1,200 events never
came out), and the kill test of test_stream_recovery.py about one run in four."""

import time
import uuid
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import Settings, load_settings
from deploy.wiring import topic_names, topic_specs
from schemas.batch import encode_batch, split_enriched_message
from schemas.events import EVENT_MODELS
from schemas.examples import EXAMPLES
from streams.dedupe import RecentEventIds

pytestmark = pytest.mark.kafka

DEADLINE_S = 120.0
MESSAGES = 300
EVENTS_PER_MESSAGE = 4
IP = "81.2.69.160"
CHANGELOG_ENTRIES = 5_000
"""A table entry per raw message, on each changelog partition: recovery takes a while."""


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: object) -> Iterator[Settings]:
    yield load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-start:{bytes(range(32)).hex()}",
            "TALLY_RAW_PARTITIONS": "2",
            "TALLY_STREAM_BATCH_SIZE": "5",
        }
    )


def _envelope(now_ms: int) -> tuple[bytes, set[str]]:
    fields = {**EXAMPLES["login"], "client_time_ms": now_ms}
    for stamp in ("ip", "collector_time_ms"):
        fields.pop(stamp, None)
    model = EVENT_MODELS[("login", fields["schema_version"])]
    events = [
        model.model_validate({**fields, "event_id": str(uuid.uuid4())})
        for _ in range(EVENTS_PER_MESSAGE)
    ]
    value = encode_batch(events, app_id=fields["app_id"], collector_time_ms=now_ms, ip=IP)
    return value, {e.event_id for e in events}


def test_a_worker_starting_into_a_full_raw_topic_with_tables_to_recover_reads_it_all(
    settings: Settings, kafka_bootstrap: str
) -> None:
    names = topic_names(settings)
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    # A table entry on each changelog partition, as a worker killed before its first commit
    # leaves them: the next worker recovers the tables before it reads the raw topic.
    earlier = RecentEventIds()
    for partition in (0, 1):
        for offset in range(10_000, 10_000 + CHANGELOG_ENTRIES):
            earlier.begin_message(partition, offset)
            assert not earlier.seen_before(f"earlier-{partition}-{offset}")
            for write in earlier.remember(partition, offset, int(time.time() * 1000)):
                producer.send(
                    names.recent_event_ids_changelog,
                    write.value,
                    key=write.key,
                    partition=write.partition,
                )
    now_ms = int(time.time() * 1000)
    sent: set[str] = set()
    for index in range(MESSAGES):
        value, ids = _envelope(now_ms)
        producer.send(names.raw, value, key=f"client-{index}".encode())
        sent |= ids
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        names.enriched,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=200,
    )
    seen: set[str] = set()
    try:
        with stream_worker(settings, kafka_bootstrap) as worker:
            deadline = time.monotonic() + DEADLINE_S
            while not sent <= seen:
                for message in consumer:
                    seen.update(r["event_id"] for r in split_enriched_message(message.value))
                assert worker.poll() is None, "the stream worker exited"
                assert time.monotonic() < deadline, (
                    f"{len(sent - seen)} of {len(sent)} events never came out"
                )
    finally:
        consumer.close()
    log = (settings.state_dir / "logs" / "worker.log").read_text()
    assert (
        f"tables recovered for partitions [0, 1]: {2 * CHANGELOG_ENTRIES} recent event ids" in log
    )
