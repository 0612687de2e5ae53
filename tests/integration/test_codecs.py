"""Every standard Kafka codec on real services: batches compressed with gzip, snappy, lz4 and
zstd by kafka-python and by kcat (librdkafka, not Python) pass the stream worker and the sink
into each ClickHouse backend, and Tally's own producers compress with the configured codec.

What a batch's codec is, is read from the broker's log segments (the batches as stored, with
``compression.type=producer``), so a step that silently sent uncompressed data fails.
"""

import dataclasses
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.record import MemoryRecords

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import Settings, load_settings
from deploy.wiring import sink_config, topic_names, topic_specs
from producers.sdk import TallyProducer, prepare_event
from schemas.batch import split_enriched_message
from schemas.enriched import table_name
from schemas.events import Envelope
from schemas.examples import EXAMPLES
from schemas.validation import decode_event
from sinks.backends import ClickHouseBackend
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from streams.enrich import NOWHERE, Lookups, enrich
from streams.pseudonymize import HmacKey, Pseudonymizer
from tests.services import service_unavailable

CODECS = ("gzip", "snappy", "lz4", "zstd")
CLIENTS = ("kafka-python", "kcat")
STEPS = [(client, codec) for codec in CODECS for client in CLIENTS]
WORKER_CODEC = "lz4"  # not the default, so the test shows the setting reaches the worker
# A client sends a batch uncompressed where the codec would not shrink it: a lone dead
# letter (~170 bytes) is shrunk by gzip, not by snappy or lz4, so gzip makes the check exact.
SINK_CODEC = "gzip"
DEADLINE_S = 120.0
HMAC_SECRET = bytes(range(32))
_CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}

Step = tuple[str, str]
Message = tuple[bytes, bytes]  # key, value


@pytest.fixture(scope="module")
def kcat() -> str:
    path = shutil.which("kcat")
    if path is None:
        service_unavailable("kcat not found; bash deploy/install-system-packages.sh --tests")
    return path


def codec_settings(bootstrap: str, state_dir: Path, codec: str) -> Settings:
    return load_settings(
        {
            "TALLY_STATE_DIR": str(state_dir),
            "TALLY_KAFKA_BOOTSTRAP": bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"z{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-codec:{HMAC_SECRET.hex()}",
            "TALLY_KAFKA_COMPRESSION": codec,
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_SINK_BATCH_INTERVAL_S": "0.3",
        }
    )


def kcat_produce(kcat: str, bootstrap: str, topic: str, codec: str, messages: list[Message]):
    """One kcat run: a line of key TAB value per message, compressed with ``codec``."""
    lines = b"".join(key + b"\t" + value + b"\n" for key, value in messages)
    done = subprocess.run(
        [kcat, "-P", "-b", bootstrap, "-t", topic, "-z", codec, "-K", "\\t", "-X", "acks=all"],
        input=lines, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def kcat_read(kcat: str, bootstrap: str, topic: str) -> list[bytes]:
    """Every value on ``topic``, read by kcat from the beginning to the current end."""
    done = subprocess.run(
        [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%s\\n"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.splitlines()


def kafka_python_read(
    bootstrap: str, topic: str, count: int, records_in: Callable[[bytes], int] = lambda _: 1
) -> list[bytes]:
    """Values of ``topic`` holding at least ``count`` records (``records_in`` counts a
    value's), read by kafka-python (fails at the deadline)."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=500
    )
    values: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while sum(map(records_in, values)) < count and time.monotonic() < deadline:
            values.extend(message.value for message in consumer)
    finally:
        consumer.close()
    got = sum(map(records_in, values))
    assert got >= count, f"{got} of {count} records on {topic}"
    return values


def stored_batches(bootstrap: str, topic: str) -> set[tuple[int, int, str]]:
    """(partition, base offset, codec) of each record batch the broker keeps for ``topic``,
    parsed from its log segments, which the broker names in DescribeLogDirs."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        log_dirs = {d["log_dir"] for b in admin.describe_log_dirs() for d in b["log_dirs"]}
    finally:
        admin.close()
    batches = set()
    for log_dir in log_dirs:
        for folder in Path(log_dir).glob(f"{topic}-*"):
            partition = folder.name.removeprefix(f"{topic}-")
            if not partition.isdigit():
                continue
            for segment in sorted(folder.glob("*.log")):
                for batch in MemoryRecords(segment.read_bytes()):
                    codec = _CODEC_NAMES[batch.compression_type]
                    batches.add((int(partition), batch.base_offset, codec))
    return batches


def produce_each_way(
    bootstrap: str,
    topic: str,
    kcat: str,
    messages: dict[Step, list[Message]],
    kafka_python_send: Callable[[str, list[Message]], None],
) -> dict[Step, set[str]]:
    """Each step's messages sent by its client with its codec, one step at a time; returns
    the codecs of the batches each step added to the topic."""
    seen = stored_batches(bootstrap, topic)
    codecs = {}
    for step in STEPS:
        client, codec = step
        if client == "kcat":
            kcat_produce(kcat, bootstrap, topic, codec, messages[step])
        else:
            kafka_python_send(codec, messages[step])
        now = stored_batches(bootstrap, topic)
        codecs[step] = {batch_codec for _, _, batch_codec in now - seen}
        seen = now
    return codecs


def new_events(now_ms: int) -> list[Envelope]:
    """One event of each type, with fresh event ids (and each session event in a session of
    its own), made and collected at ``now_ms``."""
    times = {"client_time_ms": now_ms, "collector_time_ms": now_ms}
    return [
        decode_event(
            orjson.dumps(
                {**example, "event_id": str(uuid.uuid4()), **times}
                | ({"session_id": f"s-{uuid.uuid4().hex[:12]}"} if "session_id" in example else {})
            ),
            received_ms=None,
        )
        for example in EXAMPLES.values()
    ]


def sdk_key(event: Envelope) -> bytes:
    return (event.session_id or event.user_id or event.event_id).encode()


def event_ids(values: list[bytes]) -> Counter[str]:
    return Counter(
        record["event_id"] for value in values for record in split_enriched_message(value)
    )


def stored_event_ids(backend: ClickHouseBackend) -> Counter[str]:
    """Event ids of every table, once per row after the tables' dedupe by event id."""
    ids: Counter[str] = Counter()
    for event_type in {example["event_type"] for example in EXAMPLES.values()}:
        rows = backend.query(f"SELECT event_id FROM {table_name(event_type)} FINAL")
        ids.update(str(row[0]) for row in rows)
    return ids


def drain(sink: EnrichedSink, until: int) -> None:
    """Run the sink until it has written or dead-lettered ``until`` records, or the deadline."""
    stop = threading.Event()
    deadline = time.monotonic() + DEADLINE_S
    while sink.rows_written + sink.dead_letters < until and time.monotonic() < deadline:
        messages = sink.poll_batch()
        if messages:
            sink.write_batch(messages, stop)


@dataclass(frozen=True)
class RawSent:
    settings: Settings
    worker: "subprocess.Popen[bytes]"
    ids: dict[Step, list[str]]
    raw_codecs: dict[Step, set[str]]
    enriched: list[bytes]


@pytest.fixture(scope="module")
def raw_sent(
    kafka_bootstrap: str, kcat: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RawSent]:
    """Events of every type sent to the raw topic in each codec by the SDK (kafka-python) and
    by kcat, through one stream worker (kept running for the module) to the enriched topic."""
    settings = codec_settings(kafka_bootstrap, tmp_path_factory.mktemp("state"), WORKER_CODEC)
    topics = topic_names(settings)
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    now_ms = int(time.time() * 1000)
    events = {step: new_events(now_ms) for step in STEPS}
    messages = {
        step: [(sdk_key(event), prepare_event(event, now_ms)) for event in step_events]
        for step, step_events in events.items()
    }

    def sdk_send(codec: str, _: list[Message]) -> None:
        producer = TallyProducer(kafka_bootstrap, topics, compression_type=codec)
        try:
            for event in events[("kafka-python", codec)]:
                producer.emit(event)
            producer.flush(timeout_s=30)
        finally:
            producer.close()

    with stream_worker(settings, kafka_bootstrap) as worker:
        raw_codecs = produce_each_way(kafka_bootstrap, topics.raw, kcat, messages, sdk_send)
        total = sum(len(step_events) for step_events in events.values())
        enriched = kafka_python_read(
            kafka_bootstrap, topics.enriched, total, lambda v: len(split_enriched_message(v))
        )
        assert worker.poll() is None, "the stream worker exited"
        ids = {step: [e.event_id for e in step_events] for step, step_events in events.items()}
        yield RawSent(settings, worker, ids, raw_codecs, enriched)


def test_raw_batches_carry_each_codec_and_both_clients_read_them(raw_sent: RawSent, kcat: str):
    """The SDK and kcat each wrote batches in exactly the codec asked for, and kcat and
    kafka-python both read every event back from the mixed raw topic."""
    assert raw_sent.raw_codecs == {(client, codec): {codec} for client, codec in STEPS}
    bootstrap, raw = raw_sent.settings.kafka_bootstrap or "", topic_names(raw_sent.settings).raw
    expected = Counter(i for ids in raw_sent.ids.values() for i in ids)
    assert event_ids(kcat_read(kcat, bootstrap, raw)) == expected
    assert event_ids(kafka_python_read(bootstrap, raw, sum(expected.values()))) == expected


def test_every_codec_from_both_clients_lands_once(raw_sent: RawSent, backend: ClickHouseBackend):
    """Every event of every codec and client reaches ClickHouse exactly once, and the stream
    worker is still running after reading them all."""
    apply_migrations(backend)
    config = sink_config(raw_sent.settings, raw_sent.settings.kafka_bootstrap or "")
    config = dataclasses.replace(config, group_id=f"sink-{uuid.uuid4().hex[:8]}")
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    expected = Counter(i for ids in raw_sent.ids.values() for i in ids)
    try:
        drain(sink, sum(expected.values()))
    finally:
        sink.close()
    assert stored_event_ids(backend) == expected
    assert sink.dead_letters == 0
    assert raw_sent.worker.poll() is None, "the stream worker exited"


def test_worker_writes_its_configured_codec(raw_sent: RawSent, kcat: str):
    """The worker's enriched batches are all in the configured codec (lz4 here, not the
    default), one record per event, and kcat reads them back."""
    bootstrap = raw_sent.settings.kafka_bootstrap or ""
    enriched_topic = topic_names(raw_sent.settings).enriched
    codecs = {codec for _, _, codec in stored_batches(bootstrap, enriched_topic)}
    assert codecs == {WORKER_CODEC}
    expected = Counter(i for ids in raw_sent.ids.values() for i in ids)
    assert event_ids(raw_sent.enriched) == expected
    assert event_ids(kcat_read(kcat, bootstrap, enriched_topic)) == expected


def enriched_records(key: HmacKey) -> list[bytes]:
    """One enriched record of each type, with fresh event ids, as the worker would write."""
    lookups = Lookups(Pseudonymizer(key).pseudonymize_id, key.key_id, lambda ip: NOWHERE)
    now_ms = int(time.time() * 1000)
    return [orjson.dumps(enrich(event, now_ms, lookups)) for event in new_events(now_ms)]


def out_of_contract(key: HmacKey) -> bytes:
    """A record the sink dead-letters (no event time), as large as a real one: every codec
    shrinks it, so no client sends it uncompressed."""
    record = orjson.loads(enriched_records(key)[0])
    del record["event_time"]
    return orjson.dumps(record)


def test_sink_reads_every_codec_from_both_clients(
    kafka_bootstrap: str, kcat: str, backend: ClickHouseBackend, tmp_path: Path
):
    """Enriched records in each codec from kafka-python and kcat land in ClickHouse; the
    sink's dead letters go out in its configured codec and both clients read them."""
    settings = codec_settings(kafka_bootstrap, tmp_path / "state", SINK_CODEC)
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    config = sink_config(settings, kafka_bootstrap)
    key = HmacKey("k-codec", HMAC_SECRET)
    good = {step: enriched_records(key) for step in STEPS}
    messages = {step: [(b"", v) for v in [*good[step], out_of_contract(key)]] for step in STEPS}

    def kafka_python_send(codec: str, step_messages: list[Message]) -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                 compression_type=codec)  # fmt: skip
        try:
            for _, value in step_messages:
                producer.send(config.topics.enriched, value)
            producer.flush(timeout=30)
        finally:
            producer.close()

    codecs = produce_each_way(
        kafka_bootstrap, config.topics.enriched, kcat, messages, kafka_python_send
    )
    assert codecs == {(client, codec): {codec} for client, codec in STEPS}
    apply_migrations(backend)
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    try:
        drain(sink, sum(len(step_messages) for step_messages in messages.values()))
    finally:
        sink.close()
    assert stored_event_ids(backend) == event_ids([v for values in good.values() for v in values])
    assert sink.dead_letters == len(STEPS)
    dead_codecs = {codec for _, _, codec in stored_batches(kafka_bootstrap, config.topics.dead)}
    assert dead_codecs == {SINK_CODEC}
    assert len(kcat_read(kcat, kafka_bootstrap, config.topics.dead)) == len(STEPS)
    assert len(kafka_python_read(kafka_bootstrap, config.topics.dead, len(STEPS))) == len(STEPS)
