"""`tally keys rotate` and `tally keys destroy` on a running stream worker (real Kafka): new
events are pseudonymized with the new key within seconds, with no restart, and destroying the
old key costs the worker nothing."""

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from deploy.kafka import ensure_topics
from deploy.keys import destroy_key, make_key_ring, rotate_key
from deploy.run import stream_worker
from deploy.settings import load_settings
from deploy.wiring import KEY_RING_CHECK_INTERVAL_S, topic_names, topic_specs
from producers.sdk import TallyProducer
from schemas.batch import split_enriched_message
from schemas.events import EVENT_MODELS
from schemas.examples import EXAMPLES

pytestmark = pytest.mark.kafka

DEADLINE_S = 90.0


def test_a_running_worker_takes_a_rotated_key_without_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    ring = tmp_path / "hmac.key"
    make_key_ring(ring)
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path / "state"),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY_FILE": str(ring),
            "TALLY_SESSION_TIMEOUT_S": "6",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    consumer = KafkaConsumer(
        topic_names(settings).enriched, bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=300,
    )  # fmt: skip
    sdk = TallyProducer(kafka_bootstrap, topic_names(settings))
    seen: dict[str, str] = {}
    sent_after_k2: list[str] = []

    def send_until(done: Callable[[], bool], what: str) -> None:
        """Send a login a second, reading what comes out, until ``done()``."""
        deadline = time.monotonic() + DEADLINE_S
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting until {what}: {seen}"
            assert worker.poll() is None, "the stream worker exited"
            event = EVENT_MODELS[("login", 1)].model_validate(
                {**EXAMPLES["login"], "event_id": str(uuid.uuid4()),
                 "client_time_ms": int(time.time() * 1000)}
            )  # fmt: skip
            if "k2" in seen.values():
                sent_after_k2.append(event.event_id)
            sdk.emit(event)
            sdk.flush(timeout_s=10)
            ends = time.monotonic() + 1.0
            while time.monotonic() < ends:  # reading for a second, not sleeping
                for message in consumer:
                    for record in split_enriched_message(message.value):
                        seen[record["event_id"]] = record["key_id"]

    try:
        with stream_worker(settings, kafka_bootstrap) as worker:
            pid = worker.pid
            send_until(lambda: "k1" in seen.values(), "a record made with k1")
            rotated_at = time.monotonic()
            rotate_key(ring)
            send_until(lambda: "k2" in seen.values(), "a record made with k2")
            took = time.monotonic() - rotated_at
            destroy_key(ring, "k1")
            send_until(
                lambda: len(sent_after_k2) >= 3 and set(sent_after_k2) <= seen.keys(),
                "three more records after the rotation and the destruction",
            )
            assert worker.poll() is None and worker.pid == pid
    finally:
        sdk.close()
        consumer.close()
    assert took < KEY_RING_CHECK_INTERVAL_S + 30, f"the rotation took {took:.1f} s to apply"
    assert {seen[event_id] for event_id in sent_after_k2} == {"k2"}
    print(f"rotation applied {took:.1f} s after `tally keys rotate`")
