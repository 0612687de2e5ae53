"""The HTTP collector on the real session broker: accepted events land as one batch on the raw
topic only once Kafka has acknowledged them; refused ones never reach it; bounds, gzip, Kafka
down (503, nothing accepted), health, readiness and metrics, over real HTTP."""

import asyncio
import gzip
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import ensure_topics
from deploy.settings import Settings, load_settings, settings_environ
from deploy.wiring import collector_config, collector_producer, topic_names, topic_specs
from producers.collector.app import CollectorConfig, create_app
from producers.collector.kafka import KafkaBatchProducer
from schemas.batch import decode_message
from schemas.examples import EXAMPLES
from tests.services import free_ports

DEADLINE_S = 30.0
QUIET_S = 1.5
"""How long the raw topic must stay quiet before what was read is taken as all of it."""
MARK = "zq7~SECRET~zq7"
FORWARDED_IP = "81.2.69.160"
TALLY = Path(sys.executable).parent / "tally"

Scenario = Callable[[TestClient], Awaitable[None]]


@pytest.fixture(scope="module")
def settings(kafka_bootstrap: str) -> Settings:
    """Settings for a namespace of this module's own, its topics created."""
    namespace = f"t{uuid.uuid4().hex[:8]}."
    found = load_settings(
        {
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": namespace,
            "TALLY_COLLECTOR_MAX_BODY_BYTES": "65536",
            "TALLY_COLLECTOR_TRUSTED_PROXIES": "127.0.0.1",
            "TALLY_COLLECTOR_PRODUCE_TIMEOUT_S": "5",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(found))
    return found


def _event(event_type: str = "login", **changes: Any) -> dict[str, Any]:
    """A valid event as a client sends it, with fresh ids and a current clock."""
    fields = {
        **EXAMPLES[event_type],
        "event_id": str(uuid.uuid4()),
        "user_id": f"u-zq7-{uuid.uuid4().hex[:10]}",
        "client_time_ms": time.time_ns() // 1_000_000,
    }
    fields.pop("collector_time_ms", None)
    return {**fields, **changes}


def _serve(config: CollectorConfig, producer: KafkaBatchProducer, scenario: Scenario) -> None:
    """Run ``scenario`` against the collector app on a loopback port, then close it all."""

    async def main() -> None:
        server = TestServer(create_app(config, producer), port=free_ports(1)[0])
        async with TestClient(server) as client:
            await scenario(client)

    asyncio.run(main())


def _raw_messages(settings: Settings) -> list[tuple[bytes | None, bytes]]:
    """Every message on the raw topic, read until it stays quiet for QUIET_S (by a deadline)."""
    assert settings.kafka_bootstrap
    consumer = KafkaConsumer(
        topic_names(settings).raw,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
    )
    messages: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + DEADLINE_S
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            before = len(messages)
            messages.extend((m.key, m.value) for m in consumer)
            if len(messages) > before or not messages:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_S:
                break
    finally:
        consumer.close()
    return messages


def _holding(messages: list[tuple[bytes | None, bytes]], event_id: str) -> list[bytes]:
    return [value for _, value in messages if event_id.encode() in value]


def test_valid_events_land_as_one_acknowledged_batch(settings: Settings) -> None:
    """Valid events get 200 with their ids, and one keyed batch on the raw topic holds them
    in order, stamped with the forwarded client IP (the peer is a trusted proxy)."""
    assert settings.kafka_bootstrap
    events = [_event(), _event("logout"), _event("client_info")]
    answers: list[tuple[int, Any]] = []

    async def scenario(client: TestClient) -> None:
        response = await client.post(
            "/v1/events",
            data=orjson.dumps(events),
            headers={"X-Forwarded-For": f"6.6.6.6, {FORWARDED_IP}"},
        )
        answers.append((response.status, await response.json()))

    _serve(collector_config(settings), collector_producer(settings, settings.kafka_bootstrap),
           scenario)  # fmt: skip
    status, body = answers[0]
    assert status == 200
    assert body == {"accepted": [e["event_id"] for e in events], "refused": []}
    messages = _raw_messages(settings)
    (raw,) = _holding(messages, events[0]["event_id"])
    decoded = decode_message(raw, received_ms=None)
    assert decoded.batched
    assert [e.event_id for e in decoded.events] == body["accepted"]  # type: ignore[union-attr]
    assert {e.ip for e in decoded.events} == {FORWARDED_IP}  # type: ignore[union-attr]
    (key,) = {k for k, v in messages if v == raw}
    assert key is not None and events[0]["user_id"].encode() not in key


def test_refused_events_and_bad_bodies_never_reach_the_raw_topic(settings: Settings) -> None:
    """Content-bearing and unknown-field events are refused by index and reason beside the
    accepted ones; malformed JSON, an oversize body (as sent or inflated) and an unknown
    encoding are refused whole (400, 413, 415); gzip is accepted; no refused value is answered
    or written to the raw topic."""
    assert settings.kafka_bootstrap
    good, zipped = _event(), _event("logout")
    mixed = [_event(message=f"{MARK} see you at nine"), good, _event(referrer_note=MARK)]
    answers: dict[str, tuple[int, bytes]] = {}

    async def scenario(client: TestClient) -> None:
        for name, data, headers in [
            ("mixed", orjson.dumps(mixed), {}),
            ("malformed", f'[{{"note": "{MARK}"'.encode(), {}),
            ("oversize", orjson.dumps([_event(note=MARK)] * 400), {}),
            ("gzip", gzip.compress(orjson.dumps([zipped])), {"Content-Encoding": "gzip"}),
            ("bomb", gzip.compress(b"[" + b" " * 10_000_000 + b"]"), {"Content-Encoding": "gzip"}),
            ("unknown_encoding", orjson.dumps([_event()]), {"Content-Encoding": "x-custom"}),
        ]:
            response = await client.post("/v1/events", data=data, headers=headers)
            answers[name] = (response.status, await response.read())

    _serve(collector_config(settings), collector_producer(settings, settings.kafka_bootstrap),
           scenario)  # fmt: skip
    assert answers["mixed"][0] == 200
    assert orjson.loads(answers["mixed"][1]) == {
        "accepted": [good["event_id"]],
        "refused": [
            {"index": 0, "reason": "content_forbidden"},
            {"index": 2, "reason": "content_forbidden"},
        ],
    }
    assert answers["malformed"] == (400, b'{"error":"malformed_json"}')
    assert answers["oversize"] == answers["bomb"] == (413, b'{"error":"too_large"}')
    assert answers["unknown_encoding"] == (415, b'{"error":"unsupported_encoding"}')
    assert answers["gzip"] == (200, orjson.dumps({"accepted": [zipped["event_id"]], "refused": []}))
    assert all(MARK.encode() not in body for _, body in answers.values())
    messages = _raw_messages(settings)
    assert all(MARK.encode() not in value for _, value in messages)
    for event_id in (good["event_id"], zipped["event_id"]):
        assert len(_holding(messages, event_id)) == 1
    for refused in (mixed[0], mixed[2]):
        assert _holding(messages, refused["event_id"]) == []


def test_kafka_unreachable_is_503_with_retry_after_and_nothing_accepted(
    settings: Settings,
) -> None:
    """With Kafka unreachable, events get 503 with Retry-After and no accepted id, /readyz is
    503, /healthz still 200."""
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    producer = KafkaBatchProducer(closed, topic_names(settings).raw, compression_type=None,
                                  timeout_s=2.0)  # fmt: skip
    answers: dict[str, tuple[int, Any, str | None]] = {}

    async def scenario(client: TestClient) -> None:
        for name, method, path in [
            ("events", "POST", "/v1/events"),
            ("readyz", "GET", "/readyz"),
            ("healthz", "GET", "/healthz"),
        ]:
            data = orjson.dumps([_event()]) if method == "POST" else None
            response = await client.request(method, path, data=data)
            answers[name] = (
                response.status, await response.json(), response.headers.get("Retry-After")
            )  # fmt: skip

    _serve(collector_config(settings), producer, scenario)
    status, body, retry_after = answers["events"]
    assert (status, body["accepted"], retry_after) == (503, [], "5")
    assert answers["readyz"][0] == 503
    assert answers["healthz"][:2] == (200, {"status": "up"})


def test_health_readiness_and_metrics(settings: Settings) -> None:
    """/healthz and /readyz answer 200 with Kafka up, and /metrics (Prometheus text) counts
    requests by status, events accepted and refused by reason, and both latencies."""
    assert settings.kafka_bootstrap
    pages: dict[str, tuple[int, str]] = {}

    async def scenario(client: TestClient) -> None:
        await client.post("/v1/events", data=orjson.dumps([_event(), _event(note=MARK)]))
        await client.post("/v1/events", data=b"not json")
        for path in ("/healthz", "/readyz", "/metrics"):
            response = await client.get(path)
            pages[path] = (response.status, await response.text())

    _serve(collector_config(settings), collector_producer(settings, settings.kafka_bootstrap),
           scenario)  # fmt: skip
    assert pages["/healthz"][0] == 200 and pages["/readyz"][0] == 200
    status, text = pages["/metrics"]
    assert status == 200 and MARK not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("tally_collector_requests_total", (("status", "200"),))] == 1
    assert samples[("tally_collector_requests_total", (("status", "400"),))] == 1
    assert samples[("tally_collector_events_accepted_total", ())] == 1
    refused = ("tally_collector_events_refused_total", (("reason", "content_forbidden"),))
    assert samples[refused] == 1
    assert samples[("tally_collector_events_refused_total", (("reason", "too_large"),))] == 0
    assert samples[("tally_collector_request_seconds_count", ())] == 2
    assert samples[("tally_collector_produce_seconds_count", ())] == 1


def test_tally_collector_serves_until_sigterm_then_exits_0(
    settings: Settings, tmp_path: Path
) -> None:
    """`tally collector` logs a ready line, takes events into Kafka, and on SIGTERM logs a
    stopped line and exits 0."""
    port = free_ports(1)[0]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        **settings_environ(settings),
        "TALLY_STATE_DIR": str(tmp_path),
        "TALLY_COLLECTOR_PORT": str(port),
    }
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(TALLY), "collector"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "collector ready" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert f"collector ready: http://127.0.0.1:{port}/v1/events" in log.read_text()
        event = _event()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/events", data=orjson.dumps([event]), method="POST"
        )
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            assert response.status == 200
            assert orjson.loads(response.read())["accepted"] == [event["event_id"]]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "SIGTERM received" in text and text.rstrip().endswith("collector stopped")
    assert event["user_id"] not in text and "127.0.0.1 " not in text  # no access log
    assert len(_holding(_raw_messages(settings), event["event_id"])) == 1
