"""A worker stopped and started again, each time into a backlog of raw messages while more
keep coming, loses none of them.

Every start ends a table recovery with Faust's seek of the raw partitions to their committed
offsets, and with events flowing a fetch always lands around that seek. Faust used to
deliver what it fetched after the seek into the streams' queues, then clear the queues: the
partition's later fetch skipped those offsets as read (streams/app.py,
``stop_delivering_before_the_seek``)."""

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import load_settings
from deploy.wiring import topic_names, topic_specs
from schemas.batch import split_enriched_message
from tests.integration.test_worker_start import _envelope

pytestmark = pytest.mark.kafka

DEADLINE_S = 120.0
STARTS = 4
BACKLOG = 400
"""Raw messages sent while the worker is down, before it starts again."""


def test_a_worker_restarted_into_flowing_events_loses_none(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-flow:{bytes(range(32)).hex()}",
            "TALLY_RAW_PARTITIONS": "2",
            "TALLY_STREAM_BATCH_SIZE": "5",
        }
    )
    names = topic_names(settings)
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)
    enriched = KafkaConsumer(
        names.enriched,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    sent: set[str] = set()
    messages_sent = 0
    out: Counter[str] = Counter()
    stop_sending = threading.Event()

    def send_steadily() -> None:
        nonlocal messages_sent
        while not stop_sending.is_set():
            value, ids = _envelope(int(time.time() * 1000))
            producer.send(names.raw, value, key=f"client-{messages_sent}".encode())
            sent.update(ids)
            messages_sent += 1
            stop_sending.wait(0.002)  # a steady stream, not a burst
        producer.flush()

    def wait_until(what: str, done: Callable[[], bool]) -> None:
        """Read the enriched topic until ``done``; on a timeout, say how many never came."""
        deadline = time.monotonic() + DEADLINE_S
        while not done():
            # poll, not iteration: a consumer's iterator ends only after a pause in the flow
            for messages in enriched.poll(timeout_ms=200).values():
                for message in messages:
                    out.update(r["event_id"] for r in split_enriched_message(message.value))
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: {len(sent - set(out))} of {len(sent)} events "
                f"never came out"
            )

    sender = threading.Thread(target=send_steadily)
    sender.start()
    try:
        for _ in range(STARTS):
            backlog_from = messages_sent
            wait_until("a backlog", lambda start=backlog_from: messages_sent - start >= BACKLOG)
            with stream_worker(settings, kafka_bootstrap) as worker:
                out_before = sum(out.values())
                wait_until(
                    "more events out", lambda start=out_before: sum(out.values()) > start + 1_000
                )
                assert worker.poll() is None, "the stream worker exited"
    finally:
        stop_sending.set()
        sender.join(timeout=DEADLINE_S)
    with stream_worker(settings, kafka_bootstrap):
        wait_until("every event", lambda: sent <= set(out))
    producer.close()
    enriched.close()
    assert len(sent) == 4 * messages_sent
