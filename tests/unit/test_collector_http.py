"""The collector app over real HTTP on loopback, with a stand-in producer (no Kafka): keys
(header, query, unknown, revoked while running), origins and CORS, the rate limit, the bound
on events awaiting Kafka, bodies, X-Forwarded-For, and metrics; never a key in an answer."""

import asyncio
import gzip
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from producers.collector.app import CollectorConfig, create_app
from producers.collector.apps import AppRegistry, IssuedKeys, register_app, revoke_app
from producers.collector.edge import parse_trusted_proxies
from producers.collector.kafka import ProducerUnavailable
from producers.collector.limits import RateLimit
from schemas.batch import decode_message
from schemas.examples import EXAMPLES

APP = "chat.web"
OTHER = "chat.other"
ORIGIN = "https://chat.example"
MARK = "zq7~SECRET~zq7"
DEADLINE_S = 10.0


@dataclass
class StubProducer:
    """Takes batches as Kafka would; ``gate`` holds acknowledgements back, ``down`` fails."""

    sent: list[tuple[bytes, list[bytes]]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    waiting: int = 0
    down: bool = False

    async def send(self, key: bytes, values: Sequence[bytes]) -> None:
        if self.down:
            raise ProducerUnavailable("not acknowledged: KafkaTimeoutError")
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        self.sent.append((key, list(values)))

    async def ready(self) -> bool:
        return not self.down

    async def close(self) -> None:
        pass

    def events(self) -> list[Any]:
        return [e for _, values in self.sent for v in values
                for e in decode_message(v, received_ms=None).events]  # fmt: skip


@dataclass
class Setup:
    path: Path
    keys: IssuedKeys
    other: IssuedKeys
    registry: AppRegistry
    producer: StubProducer


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    path = tmp_path / "apps.json"
    keys = register_app(path, APP, [ORIGIN, "http://localhost:8080"])
    other = register_app(path, OTHER, ["https://other.example"])
    registry = AppRegistry(path, check_interval_s=0.05)
    return Setup(path, keys, other, registry, StubProducer())


def _event(event_type: str = "login", **changes: Any) -> dict[str, Any]:
    fields = {
        **EXAMPLES[event_type],
        "app_id": APP,
        "event_id": str(uuid.uuid4()),
        "client_time_ms": time.time_ns() // 1_000_000,
    }
    fields.pop("collector_time_ms", None)
    fields.pop("ip", None)
    return {**fields, **changes}


def _serve(
    setup: Setup | None,
    scenario: Callable[[TestClient], Awaitable[None]],
    config: CollectorConfig | None = None,
    producer: StubProducer | None = None,
) -> None:
    async def main() -> None:
        app = create_app(
            config or CollectorConfig(),
            producer or (setup.producer if setup else StubProducer()),
            apps=setup.registry if setup else None,
        )
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _no_key_text(setup: Setup, *texts: str | bytes) -> None:
    keys = (setup.keys.write_key, setup.keys.secret_key, setup.other.write_key)
    for text in texts:
        shown = text.decode() if isinstance(text, bytes) else text
        assert not any(key[3:] in shown for key in keys)


def test_keys_in_the_header_or_the_query_name_the_app(setup: Setup) -> None:
    """A write or secret key in Authorization, or a write key in ?key= (sendBeacon), lets
    the key's app write; its events are stamped and produced."""
    answers: list[tuple[int, Any]] = []
    events = [_event(), _event(), _event()]

    async def scenario(client: TestClient) -> None:
        for n, (params, headers) in enumerate([
            ({}, _bearer(setup.keys.write_key)),
            ({}, {"Authorization": f"bearer   {setup.keys.secret_key}"}),
            ({"key": setup.keys.write_key}, {"Content-Type": "text/plain"}),
        ]):  # fmt: skip
            response = await client.post(
                "/v1/events", params=params, headers=headers, data=orjson.dumps([events[n]])
            )
            answers.append((response.status, await response.json()))

    _serve(setup, scenario)
    assert answers == [(200, {"accepted": [e["event_id"]], "refused": []}) for e in events]
    assert [e.event_id for e in setup.producer.events()] == [e["event_id"] for e in events]
    assert {e.ip for e in setup.producer.events()} == {"127.0.0.1"}


def test_unknown_missing_and_misplaced_keys_are_401_before_the_body_is_read(
    setup: Setup,
) -> None:
    """No key, an unknown or malformed one, a secret key in the URL: 401 with a reason and
    no CORS header, answered while the declared body has not even been sent."""
    answers: dict[str, tuple[int, Any, str | None]] = {}

    async def scenario(client: TestClient) -> None:
        for name, params, headers in [
            ("none", {}, {}),
            ("unknown", {}, _bearer("tw_" + "A" * 43)),
            ("basic", {}, {"Authorization": f"Basic {setup.keys.write_key}"}),
            ("unknown_query", {"key": "tw_nope"}, {}),
            ("secret_in_url", {"key": setup.keys.secret_key}, {}),
        ]:
            response = await client.post(
                "/v1/events", params=params, headers={**headers, "Origin": ORIGIN},
                data=orjson.dumps([_event()]),
            )  # fmt: skip
            answers[name] = (
                response.status, await response.json(),
                response.headers.get("Access-Control-Allow-Origin"),
            )  # fmt: skip
        assert client.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                     b"Authorization: Bearer tw_unknown\r\n\r\n[")  # fmt: skip
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
        answers["unsent_body"] = (int(head.split()[1]), None, None)
        writer.close()

    _serve(setup, scenario)
    unknown = (401, {"error": "unknown_key"}, None)
    assert answers["none"] == answers["unknown"] == answers["basic"] == unknown
    assert answers["unknown_query"] == unknown
    assert answers["secret_in_url"] == (401, {"error": "secret_key_in_url"}, None)
    assert answers["unsent_body"][0] == 401
    assert setup.producer.sent == []


def test_a_key_revoked_while_running_is_401_without_restart(setup: Setup) -> None:
    """Revoking an app (the file rewritten) turns its keys away within the re-read interval,
    while another app's keys go on working; an app added meanwhile is let in."""
    statuses: list[int] = []

    async def scenario(client: TestClient) -> None:
        async def post(key: str) -> int:
            response = await client.post(
                "/v1/events", headers=_bearer(key), data=orjson.dumps([_event()])
            )
            return response.status

        assert await post(setup.keys.write_key) == 200
        revoke_app(setup.path, APP)
        added = register_app(setup.path, "chat.new", [])
        deadline = time.monotonic() + DEADLINE_S
        while await post(setup.keys.write_key) == 200:
            assert time.monotonic() < deadline, "revocation never seen"
            await asyncio.sleep(0.02)
        statuses.append(await post(setup.keys.secret_key))
        response = await client.post(
            "/v1/events", headers=_bearer(added.write_key),
            data=orjson.dumps([_event(app_id="chat.new")]),
        )  # fmt: skip
        statuses.append(response.status)

    _serve(setup, scenario)
    assert statuses == [401, 200]


def test_events_of_another_app_than_the_keys_are_refused_alone(setup: Setup) -> None:
    """The key's app is the request's, even when the first event names another: an event of
    another app is refused with app_mismatch, the rest accepted."""
    events = [_event(app_id=OTHER), _event(), _event(app_id=OTHER)]
    answers: list[Any] = []

    async def scenario(client: TestClient) -> None:
        response = await client.post(
            "/v1/events", headers=_bearer(setup.keys.write_key), data=orjson.dumps(events)
        )
        answers.append((response.status, await response.json()))

    _serve(setup, scenario)
    assert answers == [(200, {
        "accepted": [events[1]["event_id"]],
        "refused": [{"index": 0, "reason": "app_mismatch", "field": "app_id"},
                    {"index": 2, "reason": "app_mismatch", "field": "app_id"}],
    })]  # fmt: skip
    assert {e.app_id for e in setup.producer.events()} == {APP}


def test_origins_decide_the_write_key_and_the_cors_headers(setup: Setup) -> None:
    """A write key from an unregistered Origin is 403; from a registered one the answer
    names that exact origin (and Vary: Origin); with no Origin (desktop) it passes without
    CORS headers; the secret key passes from any origin, with CORS only for its own."""
    answers: dict[str, tuple[int, dict[str, str]]] = {}

    async def scenario(client: TestClient) -> None:
        for name, key, origin in [
            ("registered", setup.keys.write_key, ORIGIN),
            ("unregistered", setup.keys.write_key, "https://evil.example"),
            ("other_apps", setup.keys.write_key, "https://other.example"),
            ("desktop", setup.keys.write_key, None),
            ("secret_elsewhere", setup.keys.secret_key, "https://evil.example"),
        ]:
            headers = _bearer(key) | ({"Origin": origin} if origin else {})
            response = await client.post(
                "/v1/events", headers=headers, data=orjson.dumps([_event()])
            )
            answers[name] = (response.status, dict(response.headers))

    _serve(setup, scenario)
    status, headers = answers["registered"]
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Vary"] == "Origin"
    assert headers["Access-Control-Expose-Headers"] == "Retry-After"
    for name in ("unregistered", "other_apps"):
        assert answers[name][0] == 403
        assert "Access-Control-Allow-Origin" not in answers[name][1]
    for name in ("desktop", "secret_elsewhere"):
        assert answers[name][0] == 200
        assert "Access-Control-Allow-Origin" not in answers[name][1]
    assert len(setup.producer.sent) == 3


def test_preflights_allow_exactly_the_registered_origins(setup: Setup) -> None:
    """OPTIONS /v1/events from an origin an active app registered answers 204 with that
    origin, Vary, the method, the headers and a max-age; with ?key= only the key's app's
    origins count; an unregistered origin (or no registry) gets 403 and no CORS header."""
    answers: dict[str, tuple[int, dict[str, str]]] = {}
    request = {"Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip

    async def scenario(client: TestClient) -> None:
        for name, origin, params in [
            ("registered", ORIGIN, {}),
            ("other_app", "https://other.example", {}),
            ("unregistered", "https://evil.example", {}),
            ("keyed", ORIGIN, {"key": setup.keys.write_key}),
            ("keyed_other_app", "https://other.example", {"key": setup.keys.write_key}),
            ("bad_key", ORIGIN, {"key": "tw_nope"}),
        ]:
            response = await client.options(
                "/v1/events", headers={**request, "Origin": origin}, params=params
            )
            answers[name] = (response.status, dict(response.headers))

    _serve(setup, scenario)
    for name in ("registered", "keyed"):
        status, headers = answers[name]
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        assert headers["Vary"] == "Origin"
        assert headers["Access-Control-Allow-Methods"] == "POST"
        assert headers["Access-Control-Allow-Headers"] == (
            "Authorization, Content-Type, Content-Encoding"
        )
        assert int(headers["Access-Control-Max-Age"]) > 0
    assert answers["other_app"][0] == 204
    assert answers["other_app"][1]["Access-Control-Allow-Origin"] == "https://other.example"
    for name in ("unregistered", "keyed_other_app", "bad_key"):
        assert answers[name][0] == 403
        assert not any(h.startswith("Access-Control-") for h in answers[name][1])

    no_registry: list[int] = []

    async def without(client: TestClient) -> None:
        response = await client.options("/v1/events", headers={**request, "Origin": ORIGIN})
        no_registry.append(response.status)

    _serve(None, without)
    assert no_registry == [403]


def test_a_key_over_its_rate_is_429_with_retry_after(setup: Setup) -> None:
    """Past its burst a write key gets 429 with Retry-After (and CORS for its origin, so the
    page can read it); the secret key has a bucket of its own; nothing refused is produced."""
    config = CollectorConfig(write_key_rate=RateLimit(per_s=0.01, burst=2),
                             secret_key_rate=RateLimit(per_s=0.01, burst=1))  # fmt: skip
    answers: list[tuple[int, str | None, str | None]] = []

    async def scenario(client: TestClient) -> None:
        for key in [setup.keys.write_key] * 3 + [setup.keys.secret_key] * 2:
            response = await client.post(
                "/v1/events", headers=_bearer(key) | {"Origin": ORIGIN},
                data=orjson.dumps([_event()]),
            )  # fmt: skip
            answers.append((
                response.status, response.headers.get("Retry-After"),
                response.headers.get("Access-Control-Allow-Origin"),
            ))  # fmt: skip

    _serve(setup, scenario, config)
    assert [status for status, _, _ in answers] == [200, 200, 429, 200, 429]
    for status, retry_after, allow_origin in answers:
        if status == 429:
            assert retry_after is not None and 1 <= int(retry_after) <= 100
            assert allow_origin == ORIGIN
    assert len(setup.producer.sent) == 3


def test_events_awaiting_kafka_are_bounded_by_503_overloaded(setup: Setup) -> None:
    """While Kafka has not acknowledged, a request that would take the events held past the
    bound is 503 overloaded with Retry-After and nothing accepted; one that fits passes;
    once acknowledged, the room comes back."""
    config = CollectorConfig(max_pending_events=3, max_events=3)
    producer = StubProducer(gate=asyncio.Event())
    answers: dict[str, tuple[int, Any, str | None]] = {}

    async def scenario(client: TestClient) -> None:
        async def post(events: list[dict[str, Any]]) -> tuple[int, Any, str | None]:
            response = await client.post(
                "/v1/events", headers=_bearer(setup.keys.secret_key), data=orjson.dumps(events)
            )
            return response.status, await response.json(), response.headers.get("Retry-After")

        held = asyncio.create_task(post([_event(), _event()]))
        deadline = time.monotonic() + DEADLINE_S
        while producer.waiting < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        answers["would_pass"] = await post([_event(), _event()])
        fits = asyncio.create_task(post([_event()]))
        while producer.waiting < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        answers["full"] = await post([_event()])
        assert producer.gate is not None
        producer.gate.set()
        answers["held"], answers["fits"] = await held, await fits
        answers["after"] = await post([_event(), _event(), _event()])

    _serve(setup, scenario, config, producer)
    for name in ("would_pass", "full"):
        assert answers[name] == (503, {"error": "overloaded"}, "5")
    assert [answers[n][0] for n in ("held", "fits", "after")] == [200, 200, 200]
    assert len(producer.events()) == 6


def test_bodies_gzip_bounds_and_content_are_judged_with_a_key(setup: Setup) -> None:
    """With a key: gzip accepted; malformed JSON 400; too large 413 (bytes or events);
    content-bearing events refused alone by reason, their values never answered."""
    config = CollectorConfig(max_body_bytes=4096, max_events=5)
    good = _event()
    answers: dict[str, tuple[int, bytes]] = {}

    async def scenario(client: TestClient) -> None:
        for name, data, headers in [
            ("gzip", gzip.compress(orjson.dumps([good])), {"Content-Encoding": "gzip"}),
            ("malformed", f'[{{"note": "{MARK}"'.encode(), {}),
            ("oversize", orjson.dumps([_event(note=MARK * 300)]), {}),
            ("too_many", orjson.dumps([_event() for _ in range(6)]), {}),
            ("content", orjson.dumps([_event(message=f"{MARK} see you at nine")]), {}),
        ]:
            response = await client.post(
                "/v1/events", data=data, headers=_bearer(setup.keys.write_key) | headers
            )
            answers[name] = (response.status, await response.read())

    _serve(setup, scenario, config)
    assert answers["gzip"] == (200, orjson.dumps({"accepted": [good["event_id"]], "refused": []}))
    assert answers["malformed"] == (400, b'{"error":"malformed_json"}')
    assert answers["oversize"] == answers["too_many"] == (413, b'{"error":"too_large"}')
    assert orjson.loads(answers["content"][1]) == {
        "accepted": [], "refused": [{"index": 0, "reason": "content_forbidden"}]
    }  # fmt: skip
    assert all(MARK.encode() not in body for _, body in answers.values())
    assert [e.event_id for e in setup.producer.events()] == [good["event_id"]]


def test_kafka_down_is_503_with_nothing_accepted_and_nothing_held(setup: Setup) -> None:
    """A producer that cannot deliver gives 503 with Retry-After and no accepted id, and the
    events it held are released (the pending gauge is back to 0)."""
    producer = StubProducer(down=True)
    answers: list[Any] = []

    async def scenario(client: TestClient) -> None:
        response = await client.post(
            "/v1/events", headers=_bearer(setup.keys.write_key), data=orjson.dumps([_event()])
        )
        answers.append((response.status, await response.json(),
                        response.headers.get("Retry-After")))  # fmt: skip
        answers.append(await (await client.get("/metrics")).text())

    _serve(setup, scenario, producer=producer)
    assert answers[0] == (503, {"error": "kafka_unavailable", "accepted": []}, "5")
    assert "tally_collector_pending_events 0.0" in answers[1]


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [("127.0.0.1", "81.2.69.160"), ("", "127.0.0.1"), ("10.0.0.0/8", "127.0.0.1")],
)
def test_forwarded_for_counts_only_from_a_trusted_peer(
    setup: Setup, trusted: str, expected: str
) -> None:
    """Over HTTP from loopback: X-Forwarded-For gives the stamped IP only when the peer is a
    trusted proxy; from any other peer the socket's address is stamped."""
    config = CollectorConfig(trusted_proxies=parse_trusted_proxies(trusted))

    async def scenario(client: TestClient) -> None:
        response = await client.post(
            "/v1/events", data=orjson.dumps([_event()]),
            headers=_bearer(setup.keys.write_key)
            | {"X-Forwarded-For": "6.6.6.6, 81.2.69.160"},
        )  # fmt: skip
        assert response.status == 200

    _serve(setup, scenario, config)
    assert [e.ip for e in setup.producer.events()] == [expected]


def test_metrics_count_refusals_by_reason_and_never_show_a_key(setup: Setup) -> None:
    """Each whole-request refusal is counted under its reason (all reasons exported from
    the start); preflights by status; no key or hash reaches /metrics or an answer."""
    config = CollectorConfig(write_key_rate=RateLimit(per_s=0.01, burst=1))
    texts: list[str | bytes] = []

    async def scenario(client: TestClient) -> None:
        for headers in [
            _bearer(setup.keys.write_key),
            _bearer(setup.keys.write_key),
            _bearer("tw_" + setup.keys.write_key[3:][::-1]),
            _bearer(setup.keys.secret_key) | {"Content-Encoding": "x-custom"},
            _bearer(setup.other.write_key) | {"Origin": ORIGIN},
        ]:
            response = await client.post("/v1/events", headers=headers,
                                         data=orjson.dumps([_event()]))  # fmt: skip
            texts.extend([await response.read(), str(dict(response.headers))])
        await client.options("/v1/events", headers={"Origin": "https://evil.example"})
        texts.append(await (await client.get("/metrics")).text())

    _serve(setup, scenario, config)
    _no_key_text(setup, *texts)
    metrics = texts[-1]
    assert isinstance(metrics, str)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    refused = "tally_collector_requests_refused_total"
    counts = {"rate_limited": 1, "unknown_key": 1, "unsupported_encoding": 1,
              "origin_forbidden": 1, "overloaded": 0, "kafka_unavailable": 0}  # fmt: skip
    for reason, count in counts.items():
        assert samples[(refused, (("reason", reason),))] == count, reason
    requests = "tally_collector_requests_total"
    assert [samples[(requests, (("status", s),))] for s in ("200", "401", "403", "415", "429")] == [
        1, 1, 1, 1, 1
    ]  # fmt: skip
    assert samples[("tally_collector_preflights_total", (("status", "403"),))] == 1


def test_without_a_registry_no_key_is_asked(setup: Setup) -> None:
    """create_app without apps (in-process tests) takes events with no key, as before, and
    sends no CORS header."""
    answers: list[Any] = []
    event = _event()

    async def scenario(client: TestClient) -> None:
        response = await client.post("/v1/events", data=orjson.dumps([event]),
                                     headers={"Origin": ORIGIN})  # fmt: skip
        answers.append((response.status, await response.json(),
                        response.headers.get("Access-Control-Allow-Origin")))  # fmt: skip

    _serve(None, scenario, producer=setup.producer)
    assert answers == [(200, {"accepted": [event["event_id"]], "refused": []}, None)]


def test_settings_reach_the_collector_config(tmp_path: Path) -> None:
    """Rate limits and the pending bound come from their TALLY_COLLECTOR_* settings."""
    from deploy.settings import load_settings
    from deploy.wiring import collector_apps, collector_config

    settings = load_settings({
        "TALLY_STATE_DIR": str(tmp_path), "TALLY_COLLECTOR_RATE_PER_KEY": "5",
        "TALLY_COLLECTOR_RATE_BURST": "7", "TALLY_COLLECTOR_SECRET_RATE_PER_KEY": "50",
        "TALLY_COLLECTOR_SECRET_RATE_BURST": "70", "TALLY_COLLECTOR_MAX_PENDING_EVENTS": "900",
    })  # fmt: skip
    config = collector_config(settings)
    assert config == replace(
        CollectorConfig(),
        write_key_rate=RateLimit(5.0, 7), secret_key_rate=RateLimit(50.0, 70),
        max_pending_events=900,
    )  # fmt: skip
    assert collector_apps(settings).path == tmp_path / "apps.json"
