"""The local Kafka 4.1 broker from deploy/kafka.py, and the Python clients Tally uses against it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

from deploy import interrupts
from deploy.interrupts import Interrupted, install_interrupt_handlers, interrupts_deferred
from deploy.kafka import (
    KafkaBroker,
    KafkaStartError,
    TopicSpec,
    ensure_topics,
    fetch_broker_jars,
    start_kafka,
    stop_kafka,
)
from deploy.services.ports import free_ports
from tests.kafka_fixtures import KAFKA_JARS_DIR, KAFKA_STATE_DIR

pytestmark = pytest.mark.kafka

_WAIT_S = 30.0


def _unique_name(kind: str) -> str:
    return f"tally.test.{kind}.{uuid.uuid4().hex[:12]}"


def _process_gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _port(broker: KafkaBroker) -> int:
    return int(broker.bootstrap.rpartition(":")[2])


def test_start_reuses_running_broker(
    kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting again on a running state directory returns the same JVM instead of a second one."""
    caplog.set_level(logging.INFO, logger="deploy.kafka")
    first = start_kafka(KAFKA_STATE_DIR, KAFKA_JARS_DIR, port=_port(kafka_broker))
    second = start_kafka(KAFKA_STATE_DIR, KAFKA_JARS_DIR, port=_port(kafka_broker))
    assert first == second == kafka_broker
    assert "reusing running Kafka broker" in caplog.text


def test_start_refuses_other_port_for_running_broker(kafka_broker: KafkaBroker) -> None:
    """A running broker is not silently reused on a port it does not listen on."""
    (other,) = free_ports(1)
    with pytest.raises(KafkaStartError, match="stop it first"):
        start_kafka(KAFKA_STATE_DIR, KAFKA_JARS_DIR, port=other)


def test_cached_jars_are_not_fetched_again(kafka_bootstrap: str) -> None:
    """With the broker jars already in the cache, Maven does not run."""
    assert fetch_broker_jars(KAFKA_JARS_DIR) is False


def test_kafka_python_round_trip(kafka_bootstrap: str) -> None:
    """A message produced with kafka-python to a topic made by ensure_topics is consumed back."""
    topic = _unique_name("kafka-python")
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, partitions=1, retention_ms=None)])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        producer.send(topic, key=b"k", value=b"hello").get(timeout=_WAIT_S)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=_unique_name("group"),
        auto_offset_reset="earliest",
    )
    received: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + _WAIT_S
    try:
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend((record.key, record.value) for record in records)
    finally:
        consumer.close()
    assert received == [(b"k", b"hello")]


def test_ensure_topics_sets_retention_and_is_idempotent(kafka_bootstrap: str) -> None:
    """ensure_topics creates the partitions and retention.ms asked for, and a repeat is a no-op."""
    kept = TopicSpec(_unique_name("kept"), partitions=3, retention_ms=3_600_000)
    default = TopicSpec(_unique_name("default"), partitions=1, retention_ms=None)
    ensure_topics(kafka_bootstrap, [kept, default])
    ensure_topics(kafka_bootstrap, [kept, default])

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        described = {t["name"]: t for t in admin.describe_topics([kept.name, default.name])}
        configs = admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, kept.name),
                ConfigResource(ConfigResourceType.TOPIC, default.name),
            ]
        )["topic"]
    finally:
        admin.close()
    assert len(described[kept.name]["partitions"]) == 3
    assert len(described[default.name]["partitions"]) == 1
    assert configs[kept.name]["retention.ms"]["value"] == "3600000"
    assert "retention.ms" not in configs.get(default.name, {})


def test_aiokafka_round_trip(kafka_bootstrap: str) -> None:
    """aiokafka, Faust's client, creates a topic, produces, consumes and commits on Kafka 4.1."""
    topic = _unique_name("aiokafka")
    group = _unique_name("group")
    values = [f"event-{n}".encode() for n in range(100)]

    async def round_trip() -> tuple[list[bytes], int | None]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()

        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            batch = [await producer.send(topic, value) for value in values]
            await asyncio.gather(*batch)
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        received: list[bytes] = []
        try:
            async with asyncio.timeout(_WAIT_S):
                while len(received) < len(values):
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        received.extend(record.value for record in records)
            await consumer.commit()
            committed: int | None = await consumer.committed(TopicPartition(topic, 0))
        finally:
            await consumer.stop()
        return received, committed

    received, committed = asyncio.run(round_trip())
    assert received == values
    assert committed == len(values)


def test_stop_leaves_no_jvm(tmp_path: Path, kafka_bootstrap: str) -> None:
    """stop_kafka ends a broker's JVM, and a second stop finds nothing to stop."""
    state_dir = tmp_path / "state"
    port, controller_port = free_ports(2)
    broker = start_kafka(state_dir, KAFKA_JARS_DIR, port=port, controller_port=controller_port)
    assert not _process_gone(broker.pid)
    assert stop_kafka(state_dir) is True
    assert _process_gone(broker.pid)
    assert stop_kafka(state_dir) is False


def test_broker_does_not_create_topics_on_demand(tmp_path: Path, kafka_bootstrap: str) -> None:
    """On a broker Tally starts, producing to a missing topic fails fast and creates nothing."""
    state_dir = tmp_path / "state"
    port, controller_port = free_ports(2)
    broker = start_kafka(state_dir, KAFKA_JARS_DIR, port=port, controller_port=controller_port)
    topic = _unique_name("missing")
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            setting = admin.describe_configs(
                [ConfigResource(ConfigResourceType.BROKER, "1", ["auto.create.topics.enable"])],
                config_filter="all",
            )["broker"]["1"]["auto.create.topics.enable"]
            assert setting["value"] == "false"
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_block_ms=3_000)
            started = time.monotonic()
            try:
                with pytest.raises(KafkaTimeoutError):
                    producer.send(topic, value=b"hello").get(timeout=_WAIT_S)
            finally:
                producer.close()
            assert time.monotonic() - started < _WAIT_S
            assert topic not in admin.list_topics()
            (described,) = admin.describe_topics([topic])
            assert described["error_code"] == UnknownTopicOrPartitionError.errno
        finally:
            admin.close()
    finally:
        stop_kafka(state_dir)


def test_an_interrupt_while_a_kafka_client_bootstraps_is_raised_after_it(
    kafka_bootstrap: str,
) -> None:
    """kafka-python runs its event loop in the calling thread while a producer bootstraps and
    swallows an exception a signal handler raises into it (the command then hangs, deaf);
    built inside interrupts_deferred, the interrupt is raised once the client exists."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    raised = 0
    try:
        for n in range(10):
            interrupts._state = interrupts._State()
            install_interrupt_handlers()
            producers: list[KafkaProducer] = []
            timer = threading.Timer(0.001 + n * 0.01, os.kill, (os.getpid(), signal.SIGTERM))
            try:
                with interrupts_deferred():
                    timer.start()
                    producers.append(KafkaProducer(bootstrap_servers=kafka_bootstrap))
                    timer.join()
            except Interrupted:
                raised += 1
            for producer in producers:
                producer.close(timeout=5)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        interrupts._state = interrupts._State()
    assert raised == 10
