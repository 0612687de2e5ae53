"""A flood of invalid events from a broken client release trips the dead-letter limit on a
real worker: one error line with the top reason codes, nothing of the events' values, the
worker's metrics count the trip and the refusals by reason, and the worker goes on."""

import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import ensure_topics
from deploy.run import stream_worker
from deploy.services.ports import free_ports
from deploy.settings import Settings, load_settings
from deploy.wiring import topic_names, topic_specs
from schemas.batch import split_enriched_message
from schemas.examples import EXAMPLES

pytestmark = pytest.mark.kafka

DEADLINE_S = 90.0
MARK = "zq7 please call me back tonight"


def _metrics_text(port: int) -> str:
    """The worker's metrics page now; '' while it does not serve it yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The worker's metrics now; {} while it does not serve them yet."""
    text = _metrics_text(port)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _flood_settings(tmp_path: Path, kafka_bootstrap: str, **extra: str) -> Settings:
    """A worker's settings whose limit trips on 50 events, its topics created."""
    settings = load_settings(
        {
            "TALLY_STATE_DIR": str(tmp_path),
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:10]}.",
            "TALLY_HMAC_KEY": f"k-dl:{bytes(range(32)).hex()}",
            "TALLY_SESSION_TIMEOUT_S": "6",
            "TALLY_DEAD_LETTER_ALARM_MIN_EVENTS": "50",
            **extra,
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(settings))
    return settings


def test_a_flood_of_refusals_trips_the_dead_letter_limit(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    (metrics_port,) = free_ports(1)
    settings = _flood_settings(
        tmp_path, kafka_bootstrap, TALLY_WORKER_METRICS_PORT=str(metrics_port)
    )
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
        refused = ("tally_stream_events_refused_total", (("reason", "content_forbidden"),))
        enriched = ("tally_stream_events_enriched_total", ())
        while _metrics(metrics_port).get(refused) != len(bad):
            assert time.monotonic() < deadline, f"refusals never counted: {_metrics(metrics_port)}"
            time.sleep(0.2)  # polling the worker's metrics against the deadline
        metrics = _metrics(metrics_port)
        assert metrics[("tally_stream_dead_letter_limit_trips_total", ())] == 1
        assert metrics[("tally_stream_dead_letter_limit_tripped", ())] == 1
        assert metrics[enriched] == len(good)
        page = _metrics_text(metrics_port)
        for value in ("zq7", login["user_id"], login["ip"], good[0]["event_id"]):
            assert value not in page, "an event's value reached the metrics"
        assert metrics[("tally_stream_events_refused_total", (("reason", "clock_skew"),))] == 0
        assert worker.poll() is None
    text = log.read_text()
    (line,) = [ln for ln in text.splitlines() if "dead-letter limit" in ln]
    assert "ERROR" in line and "(top reasons: content_forbidden " in line
    assert "clock_skew" not in line, "the valid events were counted as refused"
    assert MARK not in text and "zq7" not in text


def test_with_a_pause_configured_the_flood_waits_in_kafka(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """With TALLY_DEAD_LETTER_ALARM_PAUSE_S set, the tripped limit stops reading the raw
    partitions: events sent meanwhile are enriched only after they are resumed."""
    settings = _flood_settings(tmp_path, kafka_bootstrap, TALLY_DEAD_LETTER_ALARM_PAUSE_S="4")
    names = topic_names(settings)
    now_ms = int(time.time() * 1000)
    login = {k: v for k, v in EXAMPLES["login"].items() if k != "collector_time_ms"}
    bad = [{**login, "event_id": str(uuid.uuid4()), "client_time_ms": now_ms, "note": MARK}
           for _ in range(100)]  # fmt: skip
    later = [{**login, "event_id": str(uuid.uuid4()), "client_time_ms": now_ms} for _ in range(5)]
    log = tmp_path / "logs" / "worker.log"
    enriched = KafkaConsumer(
        names.enriched, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=200,
    )  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    with stream_worker(settings, kafka_bootstrap) as worker:

        def wait_for_log(text: str) -> None:
            deadline = time.monotonic() + DEADLINE_S
            while text not in (log.read_text() if log.exists() else ""):
                assert worker.poll() is None, "the stream worker exited"
                assert time.monotonic() < deadline, f"the worker never logged {text!r}"
                time.sleep(0.2)  # polling the worker's log against the deadline

        for event in bad:
            producer.send(names.raw, orjson.dumps(event))
        producer.flush(timeout=30)
        wait_for_log("reading paused for 4 s")
        for event in later:
            producer.send(names.raw, orjson.dumps(event))
        producer.flush(timeout=30)
        wanted = {event["event_id"] for event in later}
        seen: set[str] = set()
        deadline = time.monotonic() + DEADLINE_S
        while not wanted <= seen:
            assert time.monotonic() < deadline, "the events sent during the pause never came"
            for message in enriched:
                for record in split_enriched_message(message.value):
                    seen.add(record["event_id"])
                    assert "reading resumed" in log.read_text(), "an event was read while paused"
        assert worker.poll() is None
    producer.close()
    enriched.close()
