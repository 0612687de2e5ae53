"""A flood of invalid events from a broken client release trips the dead-letter limit on a
real worker: one error line with the top reason codes, nothing of the events' values, and the
worker goes on."""

import time
import uuid
from pathlib import Path

import orjson
import pytest
from kafka import KafkaProducer

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.settings import load_settings
from deploy.wiring import topic_names, topic_specs
from schemas.examples import EXAMPLES

pytestmark = pytest.mark.kafka

DEADLINE_S = 90.0
MARK = "zq7 please call me back tonight"


def test_a_flood_of_refusals_trips_the_dead_letter_limit(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-dl:{bytes(range(32)).hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_DEAD_LETTER_ALARM_MIN_EVENTS": "50",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    now_ms = int(time.time() * 1000)
    login = {k: v for k, v in EXAMPLES["login"].items() if k != "collector_time_ms"}
    good = [{**login, "event_id": str(uuid.uuid4()), "client_time_ms": now_ms} for _ in range(20)]
    bad = [{**event, "event_id": str(uuid.uuid4()), "note": MARK} for event in good * 5]
    log = tmp_path / "logs" / "worker.log"
    with stream_worker(settings, kafka_bootstrap) as worker:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        for event in good + bad:
            producer.send(topic_names(settings).raw, orjson.dumps(event))
        producer.flush(timeout=30)
        producer.close()
        deadline = time.monotonic() + DEADLINE_S
        while "dead-letter limit" not in (log.read_text() if log.exists() else ""):
            assert worker.poll() is None, "the stream worker exited"
            assert time.monotonic() < deadline, "the dead-letter limit never tripped"
            time.sleep(0.2)  # polling the worker's log against the deadline
        assert worker.poll() is None
    text = log.read_text()
    (line,) = [ln for ln in text.splitlines() if "dead-letter limit" in ln]
    assert "ERROR" in line and "(top reasons: content_forbidden " in line
    assert "clock_skew" not in line, "the valid events were counted as refused"
    assert MARK not in text and "zq7" not in text
