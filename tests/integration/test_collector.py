"""The HTTP collector on the real session broker: accepted events land as one batch on the raw
topic only once Kafka has acknowledged them; refused ones never reach it; bounds, gzip, Kafka
down (503, nothing accepted), health, readiness and metrics, app keys, CORS, rate limits and
X-Forwarded-For, over real HTTP; and `tally apps` through the real command."""

import asyncio
import gzip
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import ensure_topics
from deploy.services.ports import free_ports
from deploy.settings import Settings, load_settings, settings_environ
from deploy.wiring import collector_config, collector_producer, topic_names, topic_specs
from producers.collector.app import CollectorConfig, create_app
from producers.collector.apps import AppRegistry, register_app, revoke_app
from producers.collector.kafka import KafkaBatchProducer
from producers.collector.limits import RateLimit
from schemas.batch import decode_message
from schemas.examples import EXAMPLES

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


def _serve(
    config: CollectorConfig,
    producer: KafkaBatchProducer,
    scenario: Scenario,
    apps: AppRegistry | None = None,
) -> None:
    """Run ``scenario`` against the collector app on a loopback port, then close it all."""

    async def main() -> None:
        server = TestServer(create_app(config, producer, apps=apps), port=free_ports(1)[0])
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


def _tally(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TALLY), *args], env=env, capture_output=True, text=True, timeout=DEADLINE_S
    )


def _post(port: int, events: list[dict[str, Any]], key: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events", data=orjson.dumps(events), method="POST",
        headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            assert orjson.loads(response.read())["accepted"] == [e["event_id"] for e in events]
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_tally_collector_serves_until_sigterm_then_exits_0(
    settings: Settings, tmp_path: Path
) -> None:
    """`tally collector` logs a ready line, takes a registered app's events into Kafka,
    refuses its key within a second or so of `tally apps revoke` (no restart), and on
    SIGTERM logs a stopped line and exits 0; no key or raw id reaches its log."""
    port = free_ports(1)[0]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        **settings_environ(settings),
        "TALLY_STATE_DIR": str(tmp_path),
        "TALLY_COLLECTOR_PORT": str(port),
    }
    event = _event()
    added = _tally("apps", "add", event["app_id"], "--json", env=env)
    assert added.returncode == 0, added.stderr
    keys = orjson.loads(added.stdout)
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
        assert _post(port, [event], keys["write_key"]) == 200
        assert _tally("apps", "revoke", event["app_id"], env=env).returncode == 0
        deadline = time.monotonic() + DEADLINE_S
        while _post(port, [_event()], keys["secret_key"]) == 200:
            assert time.monotonic() < deadline, "the revocation was never seen"
            time.sleep(0.1)
        assert _post(port, [_event()], keys["write_key"]) == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "SIGTERM received" in text and text.rstrip().endswith("collector stopped")
    assert event["user_id"] not in text and "127.0.0.1 " not in text  # no access log
    assert keys["write_key"][3:] not in text and keys["secret_key"][3:] not in text
    assert len(_holding(_raw_messages(settings), event["event_id"])) == 1


def test_keyed_requests_reach_kafka_for_their_app_alone(settings: Settings, tmp_path: Path) -> None:
    """With the registry: a key in the header or the query lands its app's events on the raw
    topic; an event of another app is refused with app_mismatch and never lands; an unknown
    key is 401, a foreign Origin 403, a spent key 429 with Retry-After, none of them
    producing anything; preflights allow exactly the registered origins."""
    assert settings.kafka_bootstrap
    path = tmp_path / "apps.json"
    app_id = EXAMPLES["login"]["app_id"]
    keys = register_app(path, app_id, ["https://chat.example"])
    config = replace(collector_config(settings), write_key_rate=RateLimit(0.01, 2))
    header, query, foreign = _event(), _event(), _event(app_id="other.app")
    stray = [_event(), _event(), _event()]
    answers: dict[str, tuple[int, Any, dict[str, str]]] = {}

    async def scenario(client: TestClient) -> None:
        for name, events, params, headers in [
            ("header", [foreign, header], {},
             {"Authorization": f"Bearer {keys.write_key}", "Origin": "https://chat.example"}),
            ("query", [query], {"key": keys.write_key}, {"Content-Type": "text/plain"}),
            ("unknown", [stray[0]], {}, {"Authorization": "Bearer tw_unknown"}),
            ("foreign_origin", [stray[1]], {},
             {"Authorization": f"Bearer {keys.write_key}", "Origin": "https://evil.example"}),
            ("spent", [stray[2]], {}, {"Authorization": f"Bearer {keys.write_key}"}),
        ]:  # fmt: skip
            response = await client.post(
                "/v1/events", data=orjson.dumps(events), params=params, headers=headers
            )
            answers[name] = (response.status, await response.json(), dict(response.headers))
        for origin in ("https://chat.example", "https://evil.example"):
            response = await client.options(
                "/v1/events", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
            )
            answers[origin] = (response.status, None, dict(response.headers))

    _serve(config, collector_producer(settings, settings.kafka_bootstrap), scenario,
           AppRegistry(path))  # fmt: skip
    status, body, headers = answers["header"]
    assert (status, body) == (200, {
        "accepted": [header["event_id"]],
        "refused": [{"index": 0, "reason": "app_mismatch", "field": "app_id"}],
    })  # fmt: skip
    assert headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert answers["query"][:2] == (200, {"accepted": [query["event_id"]], "refused": []})
    assert answers["unknown"][:2] == (401, {"error": "unknown_key"})
    assert answers["foreign_origin"][:2] == (403, {"error": "origin_forbidden"})
    assert answers["spent"][:2] == (429, {"error": "rate_limited"})
    assert int(answers["spent"][2]["Retry-After"]) >= 1
    allowed, refused = answers["https://chat.example"], answers["https://evil.example"]
    assert allowed[0] == 204
    assert allowed[2]["Access-Control-Allow-Origin"] == "https://chat.example"
    assert refused[0] == 403 and "Access-Control-Allow-Origin" not in refused[2]
    messages = _raw_messages(settings)
    for landed in (header, query):
        assert len(_holding(messages, landed["event_id"])) == 1
    for never in (foreign, *stray):
        assert _holding(messages, never["event_id"]) == []


@pytest.mark.parametrize(("trusted", "expected"), [(True, FORWARDED_IP), (False, "127.0.0.1")])
def test_forwarded_for_reaches_kafka_only_from_a_trusted_peer(
    settings: Settings, trusted: bool, expected: str
) -> None:
    """The IP stamped on the raw topic is X-Forwarded-For's nearest untrusted hop when the
    peer (loopback) is a trusted proxy, and the peer's own address when it is not."""
    assert settings.kafka_bootstrap
    config = collector_config(settings)
    if not trusted:
        config = replace(config, trusted_proxies=())
    event = _event()

    async def scenario(client: TestClient) -> None:
        response = await client.post(
            "/v1/events", data=orjson.dumps([event]),
            headers={"X-Forwarded-For": f"6.6.6.6, {FORWARDED_IP}"},
        )  # fmt: skip
        assert response.status == 200

    _serve(config, collector_producer(settings, settings.kafka_bootstrap), scenario)
    (raw,) = _holding(_raw_messages(settings), event["event_id"])
    decoded = decode_message(raw, received_ms=None)
    assert [e.ip for e in decoded.events] == [expected]  # type: ignore[union-attr]


def test_tally_apps_add_list_revoke_through_the_cli(tmp_path: Path) -> None:
    """`tally apps add` prints the keys once (--json: exactly app_id, write_key, secret_key)
    and keeps only their hashes in a 0600 file; `list` shows names, origins, created and
    revoked but no key; `revoke` marks the app; bad names and duplicates fail in one line."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        "TALLY_STATE_DIR": str(tmp_path / "state"),
    }
    as_json = _tally("apps", "add", "chat.web", "--origin", "https://chat.example",
                     "--origin", "HTTP://LOCALHOST:8080/", "--json", env=env)  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    keys = orjson.loads(as_json.stdout)
    assert list(keys) == ["app_id", "write_key", "secret_key"] and keys["app_id"] == "chat.web"
    assert as_json.stdout.endswith("}\n") and as_json.stdout.count("\n") == 1
    text = _tally("apps", "add", "chat.desktop", env=env)
    assert text.returncode == 0, text.stderr
    printed = [line.split()[-1] for line in text.stdout.splitlines() if line.startswith("  ")]
    assert [k[:3] for k in printed] == ["tw_", "ts_"]
    path = tmp_path / "state" / "apps.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = path.read_text()
    for key in (keys["write_key"], keys["secret_key"], *printed):
        assert key[3:] not in stored
    assert _tally("apps", "revoke", "chat.desktop", env=env).returncode == 0
    listed = _tally("apps", "list", env=env)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["APP", "CREATED", "REVOKED", "ORIGINS"]
    desktop, web = lines[1].split(maxsplit=3), lines[2].split(maxsplit=3)  # by name
    assert (web[0], web[2], web[3]) == (
        "chat.web",
        "-",
        "https://chat.example, http://localhost:8080",
    )
    assert desktop[0] == "chat.desktop" and desktop[2] != "-"
    for key in (keys["write_key"], keys["secret_key"], *printed):
        assert key[3:] not in listed.stdout + listed.stderr
    duplicate = _tally("apps", "add", "chat.web", env=env)
    bad = _tally("apps", "add", "Chat Web", env=env)
    unknown = _tally("apps", "revoke", "nope", env=env)
    for failed in (duplicate, bad, unknown):
        assert failed.returncode == 1 and failed.stdout == ""
        assert failed.stderr.startswith("tally: ") and failed.stderr.count("\n") == 1
    registry = AppRegistry(path)
    assert registry.lookup(keys["write_key"]) is not None
    assert registry.lookup(printed[0]) is None  # revoked
    revoke_app(path, "chat.web")
    assert AppRegistry(path).lookup(keys["secret_key"]) is None
