"""The sink on real Kafka and both ClickHouse backends: commit after insert, never lose,
never double count, dead-letter what cannot be a row."""

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.clickhouse import start_clickhouse_server, stop_clickhouse_server
from deploy.kafka import ensure_topics
from deploy.run import SinkThread, StageFailed, sink_thread
from deploy.settings import load_settings
from deploy.wiring import sink_config, topic_specs
from schemas.enriched import table_name
from schemas.examples import EXAMPLES
from schemas.validation import decode_event
from sinks.backends import ClickHouseBackend, ServerClickHouse
from sinks.consumer import EnrichedSink, SinkConfig
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from streams.enrich import NOWHERE, Lookups, enrich
from streams.pseudonymize import HmacKey, Pseudonymizer
from tests.clickhouse_fixtures import private_clickhouse_server

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
    """A record that cannot be a row goes to the dead-letter topic, redacted, with its reason
    (malformed_json when it is not JSON) and declared type; the rest are written."""
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
    assert sorted((letter["reason"], letter["event_type"]) for letter in letters) == [
        ("invalid_field", "login"), ("malformed_json", None)
    ]  # fmt: skip
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


def _poll(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


OUTAGE_S = 30.0


def test_the_sink_rides_out_a_clickhouse_server_outage_of_30_s(
    config: SinkConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """With the server stopped for 30 s while records keep coming, the sink retries with
    backoff, keeps its offsets and holds one batch at most (it stops fetching); once the
    server is back it writes every record exactly once, without a restart."""
    caplog.set_level(logging.WARNING, logger="sinks.consumer")
    state = tmp_path / "clickhouse"
    with private_clickhouse_server(state) as server:
        backend = ServerClickHouse(server.host, server.tcp_port, database="restart")
        apply_migrations(backend)
        sink = EnrichedSink(config, ClickHouseWriter(backend))
        with sink_thread(sink) as sinking:
            produce(config, enriched_logins(50))
            _poll(lambda: sink.rows_written >= 50, "the first 50 rows are written")
            stop_clickhouse_server(state)
            outage_ends = time.monotonic() + OUTAGE_S
            sent = 50
            while time.monotonic() < outage_ends:  # under load for the whole outage
                produce(config, enriched_logins(200))
                sent += 200
                sinking.check()
            assert "ClickHouse insert failed" in caplog.text
            assert sink.rows_written == 50
            start_clickhouse_server(state, tcp_port=server.tcp_port, http_port=server.http_port)
            _poll(lambda: sink.rows_written >= sent, "the sink catches up", 120)
            sinking.check()
        assert sink.max_messages_held <= sink.config.batch_size
        rows = backend.query(f"SELECT count(), uniqExact(event_id) FROM {table_name('login')}")
        assert rows == [(sent, sent)]
        backend.close()


def test_a_sink_that_dies_is_reported_not_silent(config: SinkConfig, backend):
    """When the sink's loop fails (here its consumer is closed under it), the thread's
    check raises StageFailed naming the error, so `tally run` stops instead of waiting."""
    apply_migrations(backend)
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    sinking = SinkThread(sink)
    sinking.start()
    try:
        sink._consumer.close()  # the failure: every later poll raises
        deadline = time.monotonic() + 30
        with pytest.raises(
            StageFailed, match=r"^the ClickHouse sink stopped: \w+(Error|Exception)"
        ):
            while time.monotonic() < deadline:
                sinking.check()
                time.sleep(0.1)
    finally:
        sinking.stop()


def test_a_row_clickhouse_refuses_is_dead_lettered_and_the_rest_written(
    config: SinkConfig, backend
):
    """A value ClickHouse cannot take (here a schema version past UInt16) is found by halving
    the insert and dead-lettered as storage_rejected; the batch's other rows are written,
    once, and the sink goes on without retrying."""
    apply_migrations(backend)
    bad = orjson.loads(enriched_logins(1)[0]) | {"schema_version": 70_000}
    produce(config, [*enriched_logins(5), orjson.dumps(bad), *enriched_logins(2)])
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    try:
        drain(sink, threading.Event(), until=8)
    finally:
        sink.close()
    assert (count_logins(backend), sink.dead_letters, sink.insert_failures) == (7, 1, 0)
    letters = _dead_letters(config)
    assert [(x["reason"], x["event_type"]) for x in letters] == [("storage_rejected", "login")]
    metric = sink.metrics.registry.get_sample_value
    assert metric("tally_sink_dead_letters_total", {"reason": "storage_rejected"}) == 1
    assert metric("tally_sink_rows_written_total", {"table": table_name("login")}) == 7
    assert metric("tally_sink_records_total") == 8
    failed = metric("tally_logins_total", {"outcome": "failure"}) or 0
    assert failed + (metric("tally_logins_total", {"outcome": "success"}) or 0) == 7
    assert (metric("tally_sink_last_write_timestamp_seconds") or 0) > time.time() - 60


def test_a_missing_column_dead_letters_its_table_only(config: SinkConfig, backend):
    """When a table lacks a column the sink writes, that table's rows are dead-lettered at
    once (no halving, no retry) and the other tables are written."""
    apply_migrations(backend)
    backend.execute(f"ALTER TABLE {table_name('login')} DROP COLUMN auth_method")
    summary = session_summary_record()
    produce(config, [*enriched_logins(3), orjson.dumps(summary)])
    sink = EnrichedSink(config, ClickHouseWriter(backend))
    try:
        drain(sink, threading.Event(), until=4)
    finally:
        sink.close()
    assert (sink.rows_written, sink.dead_letters, sink.insert_failures) == (1, 3, 0)
    assert {x["reason"] for x in _dead_letters(config)} == {"storage_rejected"}


def session_summary_record() -> dict:
    from tests.sink_records import summary

    return summary(int(time.time()), "someone")


def _dead_letters(config: SinkConfig) -> list[dict]:
    dead = KafkaConsumer(config.topics.dead, bootstrap_servers=config.bootstrap,
                         auto_offset_reset="earliest", consumer_timeout_ms=2000)  # fmt: skip
    letters = [orjson.loads(m.value) for m in dead]
    dead.close()
    return letters


_KILLED_SINK = """
import os, signal, sys, threading
from deploy.run import sink_thread
from schemas.topics import TopicNames
from sinks.backends import EmbeddedClickHouse, ServerClickHouse
from sinks.consumer import EnrichedSink, SinkConfig
from sinks.writer import ClickHouseWriter
bootstrap, namespace, kind, where, database = sys.argv[1:]
if kind == "server":
    host, port = where.split(":")
    backend = ServerClickHouse(host, int(port), database=database)
else:
    backend = EmbeddedClickHouse(__import__("pathlib").Path(where), database)
config = SinkConfig(bootstrap, TopicNames(namespace), batch_interval_s=0.3)
sink = EnrichedSink(config, ClickHouseWriter(backend))
sink.after_insert = lambda: os.kill(os.getpid(), signal.SIGKILL)
sink.run(threading.Event())
"""


def test_a_sink_killed_between_insert_and_commit_skips_the_batch_on_restart(
    config: SinkConfig, backend
):
    """SIGKILL the sink after ClickHouse has the batch and before Kafka has the commit: the
    restarted sink skips the replayed records by their stored offsets (no id query needed),
    and every event and rollup counts once."""
    import subprocess
    import sys

    from tests.sink_records import assert_each_event_once, assert_rollups_recompute

    apply_migrations(backend)
    values = [*enriched_logins(20), *(orjson.dumps(session_summary_record()) for _ in range(5))]
    produce(config, values)
    if backend.name == "server":
        where = f"{backend.host}:{backend.port}"
    else:
        where = str(backend.path)
        backend.close()  # one process per embedded folder: the sink's now
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_SINK, config.bootstrap, config.topics.namespace,
         backend.name, where, backend.database],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]
    if backend.name == "embedded":
        from sinks.backends import EmbeddedClickHouse

        backend = EmbeddedClickHouse(Path(where), backend.database)
    try:
        [(stored,)] = backend.query(f"SELECT count() FROM {table_name('login')}")
        assert stored > 0, "the killed sink wrote nothing before its kill"
        sink = EnrichedSink(config, ClickHouseWriter(backend))
        try:
            deadline = time.monotonic() + DEADLINE_S
            while sink.records_done < len(values) and time.monotonic() < deadline:
                messages = sink.poll_batch()
                if messages:
                    sink.write_batch(messages, threading.Event())
        finally:
            sink.close()
        assert sink.replays_skipped > 0, "the restarted sink did not skip the stored batch"
        assert sink.writer.duplicates_skipped == 0
        counts = assert_each_event_once(backend)
        assert counts[table_name("login")] == 20
        assert counts[table_name("session_summary")] == 5
        assert_rollups_recompute(backend)
    finally:
        if backend.name == "embedded":
            backend.close()
