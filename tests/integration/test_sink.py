"""The sink on real Kafka and both ClickHouse backends: commit after insert, never lose,
never double count, dead-letter what cannot be a row."""

import threading
import time
import uuid

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import ensure_topics
from deploy.settings import load_settings
from deploy.wiring import sink_config, topic_specs
from schemas.enriched import table_name
from schemas.examples import EXAMPLES
from schemas.validation import decode_event
from sinks.backends import ClickHouseBackend
from sinks.consumer import EnrichedSink, SinkConfig
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from streams.enrich import NOWHERE, Lookups, enrich
from streams.pseudonymize import HmacKey, Pseudonymizer

DEADLINE_S = 60.0
KEY = HmacKey("k-sink", bytes(32))


def enriched_logins(n: int) -> list[bytes]:
    lookups = Lookups(Pseudonymizer(KEY).pseudonymize_id, KEY.key_id, lambda ip: NOWHERE)
    records = []
    for _ in range(n):
        raw = orjson.dumps({**EXAMPLES["login"], "event_id": str(uuid.uuid4())})
        event = decode_event(raw, received_ms=None)
        records.append(orjson.dumps(enrich(event, EXAMPLES["login"]["collector_time_ms"], lookups)))
    return records


@pytest.fixture
def config(kafka_bootstrap: str) -> SinkConfig:
    settings = load_settings(
        {"TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
         "TALLY_TOPIC_NAMESPACE": f"s{uuid.uuid4().hex[:10]}.",
         "TALLY_SINK_BATCH_INTERVAL_S": "0.3"}
    )  # fmt: skip
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    return sink_config(settings, kafka_bootstrap)


def produce(config: SinkConfig, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=config.bootstrap, acks="all")
    for value in values:
        producer.send(config.topics.enriched, value)
    producer.flush(timeout=30)
    producer.close()


def drain(sink: EnrichedSink, stop: threading.Event, until: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while sink.rows_written + sink.dead_letters < until and time.monotonic() < deadline:
        messages = sink.poll_batch()
        if messages:
            sink.write_batch(messages, stop)


def count_logins(backend: ClickHouseBackend) -> int:
    return int(backend.query(f"SELECT count() FROM {table_name('login')} FINAL")[0][0])


def test_a_record_out_of_contract_is_dead_lettered(config: SinkConfig, backend):
    """A record that cannot be a row goes to the dead-letter topic, redacted; the rest are
    written."""
    apply_migrations(backend)
    produce(config, [*enriched_logins(3), b'{"event_type": "login", "x": "zq7MARKzq7"}',
                     b"not json zq7MARKzq7"])  # fmt: skip
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    try:
        drain(sink, threading.Event(), until=5)
    finally:
        sink.close()
    assert (count_logins(backend), sink.dead_letters) == (3, 2)
    dead = KafkaConsumer(config.topics.dead, bootstrap_servers=config.bootstrap,
                         auto_offset_reset="earliest", consumer_timeout_ms=2000)  # fmt: skip
    letters = [orjson.loads(m.value) for m in dead]
    dead.close()
    assert [letter["reason"] for letter in letters] == ["invalid_field", "invalid_field"]
    assert "zq7MARKzq7" not in str(letters), "a dead letter carried a value of the record"


def test_offsets_wait_for_clickhouse(config: SinkConfig, backend):
    """While inserts fail nothing is committed; a new sink in the same group then writes
    every record once."""
    produce(config, enriched_logins(4))
    failing = EnrichedSink(config, ClickHouseWriter(backend))  # no tables yet: inserts fail
    stop = threading.Event()
    try:
        messages: list = []
        deadline = time.monotonic() + DEADLINE_S
        while len(messages) < 4 and time.monotonic() < deadline:
            messages += failing.poll_batch()
        stop.set()  # give up after the first failed insert, as a shutdown would
        assert failing.write_batch(messages, stop) == 0
    finally:
        failing.close()
    apply_migrations(backend)
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    try:
        drain(sink, threading.Event(), until=4)
    finally:
        sink.close()
    assert sink.rows_written == 4 and count_logins(backend) == 4
