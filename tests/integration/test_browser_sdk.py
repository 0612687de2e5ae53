"""The browser SDK (producers/collector/static/tally.js) in Debian's Chromium against the
collector on the real session broker: a real WebRTC call on fake media lands on the raw
topic as session_start, quality samples and session_end; nothing the page sends holds an
IP address, SDP, an ICE candidate, a track label or a device id; consent (DNT, GPC, a
narrowed choice), the referrer cut to its origin, the bounded queue, retries after 503 and the
beacon on pagehide, each seen in what the page actually sent.

The collector runs in-process without a registry (no key checks); the SDK's key is still
checked where it travels: the Authorization header of a fetch, the query of a beacon.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from kafka import KafkaConsumer

from deploy.kafka import ensure_topics
from deploy.services.ports import free_ports
from deploy.settings import Settings, load_settings
from deploy.wiring import collector_config, collector_producer, topic_names, topic_specs
from producers.collector.app import create_app
from schemas.batch import decode_message
from schemas.events import Envelope
from tests.services import service_unavailable

try:
    from playwright.sync_api import Browser, Page, Request, sync_playwright
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover (the dev extras install it)
    sync_playwright = None  # type: ignore[assignment]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",  # a test pattern and a beep stand in for camera and mic
    "--use-fake-ui-for-media-stream",  # getUserMedia is granted without a prompt
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
]
DEADLINE_S = 30.0
PAGE_TIMEOUT_MS = 30_000
WRITE_KEY = "tw_browser-test-key"
APP_ID = "demo.web"
REFERRER = "https://www.example.org/blog/post?id=7#comments"

IPV4 = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9.])")
IPV6 = re.compile(r"(?i)(?<![0-9a-f:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![0-9a-f:])")
SDP_LINE = re.compile(r'(?:^|\\r\\n|\\n|\r\n|\n|")(?:v=0|[aocmst]=)')
NETWORK_DETAILS = ("candidate:", "ufrag", "fingerprint", ".local", "typ host", "srflx")


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium with fake media devices, closed on exit; a missing or broken
    Chromium skips the test, and fails it in CI."""
    if sync_playwright is None:
        service_unavailable("Playwright is not installed: pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        service_unavailable(
            f"Chromium is not installed ({CHROMIUM}): deploy/install-system-packages.sh --tests"
        )
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except PlaywrightError as err:
            service_unavailable(f"Chromium did not start: {err.message.splitlines()[0]}")
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class SentRequests:
    """Every request a page made, as Playwright saw it leave the browser."""

    requests: list[Request] = field(default_factory=list)

    def posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST"]

    def events(self) -> list[dict[str, Any]]:
        """Every event posted, in the order sent."""
        found: list[dict[str, Any]] = []
        for request in self.posts():
            found.extend(orjson.loads(request.post_data_buffer or b"[]"))
        return found

    def texts(self) -> list[str]:
        """What left the page beyond the address: each URL's query and each body."""
        texts = []
        for request in self.requests:
            texts.append(request.url.partition("?")[2])
            body = request.post_data_buffer
            if body:
                texts.append(body.decode("utf-8", "replace"))
        return texts


def open_page(
    browser: Browser, url: str, *, init_script: str | None = None, referer: str | None = None
) -> tuple[Page, SentRequests]:
    """A page of a fresh context (closed with the browser) recording its requests.

    The demo's Content-Security-Policy forbids eval, which Playwright's wait_for_function
    uses, so the context bypasses it.
    """
    context = browser.new_context(bypass_csp=True)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    sent = SentRequests()
    page.on("request", lambda request: sent.requests.append(request))
    page.goto(url, referer=referer)
    page.wait_for_function("() => window.demo && window.demo.ready")
    return page, sent


def demo_url(base: str, **params: str) -> str:
    query = {"key": WRITE_KEY, "app": APP_ID, "flush": "300", **params}
    return f"{base}/demo?" + "&".join(f"{k}={v}" for k, v in query.items())


@pytest.fixture(scope="module")
def settings(kafka_bootstrap: str) -> Settings:
    """Settings for a namespace of this module's own, its topics created."""
    found = load_settings(
        {
            "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": f"t{uuid.uuid4().hex[:8]}.",
            "TALLY_COLLECTOR_PRODUCE_TIMEOUT_S": "5",
        }
    )
    ensure_topics(kafka_bootstrap, topic_specs(found))
    return found


@dataclass(frozen=True)
class ReceivedRequest:
    """A request as the collector saw it arrive (what Playwright cannot see of a beacon sent
    while its page goes away)."""

    method: str
    path_qs: str
    authorization: bool


@dataclass(frozen=True)
class Collector:
    url: str
    received: list[ReceivedRequest]


@pytest.fixture(scope="module")
def collector(settings: Settings) -> Iterator[Collector]:
    """The collector app on a loopback port, served from a thread of its own (Playwright's
    sync API owns the test's thread); its base URL."""
    assert settings.kafka_bootstrap
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="collector", daemon=True)
    thread.start()
    port = free_ports(1)[0]
    app = create_app(
        collector_config(settings), collector_producer(settings, settings.kafka_bootstrap)
    )
    received: list[ReceivedRequest] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        received.append(
            ReceivedRequest(request.method, request.path_qs, "Authorization" in request.headers)
        )
        return await handler(request)

    app.middlewares.append(record)  # before the app is frozen by the runner's setup
    runner = web.AppRunner(app, access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=DEADLINE_S)
    try:
        yield Collector(f"http://127.0.0.1:{port}", received)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=DEADLINE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=DEADLINE_S)
        loop.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium for one test."""
    with chromium() as found:
        yield found


def raw_events(settings: Settings, until: Callable[[list[Envelope]], bool]) -> list[Envelope]:
    """The events on the raw topic, read from the start until ``until`` holds for them;
    fails at the deadline."""
    consumer = KafkaConsumer(
        topic_names(settings).raw,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=300,
    )
    events: list[Envelope] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not until(events):
            assert time.monotonic() < deadline, f"timed out; {len(events)} events on raw topic"
            for message in consumer:
                decoded = decode_message(message.value, received_ms=None)
                events.extend(e for e in decoded.events if isinstance(e, Envelope))
    finally:
        consumer.close()
    return events


def of_session(events: list[Envelope], session_id: str, event_type: str) -> list[Any]:
    return [e for e in events if e.session_id == session_id and e.event_type == event_type]


def test_static_files_are_served_with_type_cache_and_etag(collector: Collector) -> None:
    """The SDK, the demo page and its script are served with their content types and cache
    headers, the demo under a CSP without inline script; a matching ETag gets 304."""
    expected = {
        "/sdk/tally.js": ("text/javascript", "max-age="),
        "/demo": ("text/html", "no-cache"),
        "/demo/demo.js": ("text/javascript", "no-cache"),
    }
    for path, (content_type, cache) in expected.items():
        with urllib.request.urlopen(collector.url + path, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith(content_type), path
            assert cache in response.headers["Cache-Control"], path
            etag = response.headers["ETag"]
            body = response.read()
        assert body, path
        again = urllib.request.Request(collector.url + path, headers={"If-None-Match": etag})
        with pytest.raises(urllib.error.HTTPError) as not_modified:
            urllib.request.urlopen(again, timeout=10)
        assert not_modified.value.code == 304
    with urllib.request.urlopen(collector.url + "/demo", timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
        page = response.read().decode()
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert re.search(r"<script>|<script [^>]*>[^<]", page) is None


def test_a_call_lands_as_session_and_quality_events_and_sends_no_network_details(
    settings: Settings, collector: Collector, browser: Browser
) -> None:
    """A two-party call on fake media, sampled every second for a few seconds and ended:
    the raw topic has its session_start, several quality samples (plausible RTT, a video
    codec, 480p) and a normal session_end; every fetch carried the key as a Bearer token,
    and nothing the page sent holds an IP address, SDP, a candidate, a track label or a
    device id, nor a field the collector stamps."""
    page, sent = open_page(browser, demo_url(collector.url, interval="1000", user="u-browser-1"))
    page.wait_for_function("() => document.body.dataset.state === 'connected'")
    session_id = page.evaluate("() => window.demo.sessionId")
    # client_info, login and session_start, then three samples, all acknowledged.
    page.wait_for_function("() => window.demo.tally.sentEvents >= 6")
    devices = page.evaluate(
        """async () => (await navigator.mediaDevices.enumerateDevices())
            .flatMap(d => [d.deviceId, d.groupId, d.label])"""
    )
    assert page.evaluate("() => window.demo.endCall()") is True

    events = raw_events(settings, lambda found: bool(of_session(found, session_id, "session_end")))
    (start,) = of_session(events, session_id, "session_start")
    assert (start.session_kind, start.participants_bucket) == ("video", "2")
    samples = of_session(events, session_id, "quality_sample")
    assert len(samples) >= 3
    for sample in samples:
        assert sample.schema_version == 2
        assert 0 <= sample.rtt_ms < 1000 and 0 <= sample.packet_loss_pct <= 100
        assert sample.codec in ("vp8", "vp9", "h264", "av1")
        assert sample.resolution_class == "480p" and sample.frame_rate > 0
        assert sample.bitrate_kbps > 0 and sample.network_type in ("ethernet", "unknown")
        assert sample.browser_family and sample.os_family == "Linux"
    (end,) = of_session(events, session_id, "session_end")
    assert end.end_reason == "normal" and end.duration_ms >= 3000

    posts = sent.posts()
    assert posts and all(
        r.all_headers().get("authorization") == f"Bearer {WRITE_KEY}" for r in posts
    )
    assert all("referer" not in r.all_headers() for r in posts)  # the page's Referrer-Policy
    for event in sent.events():
        assert not {"ip", "collector_time_ms"} & set(event)
    private = [d for d in devices if d and d != "default"]
    assert private, "Chromium listed no fake devices"
    for text in sent.texts():
        assert not IPV4.search(text) and not IPV6.search(text), text
        assert not SDP_LINE.search(text), text
        assert not any(detail in text for detail in NETWORK_DETAILS), text
        assert not any(value in text for value in private), text


def test_a_failed_connection_ends_the_session_as_dropped(
    collector: Collector, browser: Browser
) -> None:
    """A watched connection that fails after connecting ends its session once, as dropped
    with an error code; a stop() after that sends nothing more."""
    page, sent = open_page(browser, demo_url(collector.url, call="0"))
    page.evaluate(
        """async () => {
            const t = Tally.init({endpoint: "/v1/events", writeKey: "tw_drop",
                appId: "demo.web", softwareVersion: "1.0.0", consent: "anonymous",
                flushIntervalMs: 3600000});
            const pc = new EventTarget();  // stands in for an RTCPeerConnection's states
            pc.getStats = async () => new Map();
            const change = state => {
                pc.connectionState = state;
                pc.dispatchEvent(new Event("connectionstatechange"));
            };
            change("connecting");
            const watch = t.watchCall(pc, {sessionId: "drop-1", kind: "audio"});
            change("connected");
            change("failed");
            watch.stop();
            return t.flush();
        }"""
    )
    events = [e for e in sent.events() if e.get("session_id") == "drop-1"]
    assert [e["event_type"] for e in events] == ["session_start", "session_end"]
    assert events[0]["session_kind"] == "audio"
    assert (events[1]["end_reason"], events[1]["error_code"]) == ("dropped", "CONNECTION_FAILED")


@pytest.mark.parametrize(
    "signal",
    [
        "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})",
        "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'})",
    ],
    ids=["gpc", "dnt"],
)
def test_privacy_signals_hold_consent_at_none(
    collector: Collector, browser: Browser, signal: str
) -> None:
    """With Global Privacy Control or Do Not Track, a page asking for full consent still
    sends consent none: no user id, no referrer; the events are accepted."""
    page, sent = open_page(
        browser,
        demo_url(collector.url, call="0", consent="full", user="u-browser-2"),
        init_script=signal,
        referer=REFERRER,
    )
    assert page.evaluate("() => window.demo.tally.flush()") is True
    assert page.evaluate("() => window.demo.tally.consent") == "none"
    events = sent.events()
    assert {e["event_type"] for e in events} == {"client_info", "login"}
    for event in events:
        assert event["consent"] == "none"
        assert "user_id" not in event and "referrer" not in event
    assert page.evaluate(
        "() => [window.demo.tally.sentEvents, window.demo.tally.rejectedEvents]"
    ) == [2, 0]


def test_the_referrer_leaves_as_its_origin_only(collector: Collector, browser: Browser) -> None:
    """Under full consent every event carries the referrer's origin, and no request holds
    its path, query or fragment, nor the page's own URL."""
    page, sent = open_page(
        browser, demo_url(collector.url, call="0", consent="full", user="u-browser-3"),
        referer=REFERRER,
    )  # fmt: skip
    assert page.evaluate("() => window.demo.tally.flush()") is True
    events = sent.events()
    assert events and all(e["referrer"] == "https://www.example.org" for e in events)
    assert all(e["user_id"] == "u-browser-3" for e in events)
    for request in sent.posts():
        body = (request.post_data_buffer or b"").decode()
        for part in ("/blog", "id=7", "comments", "/demo", WRITE_KEY):
            assert part not in body


def test_narrowed_consent_applies_to_events_already_queued(
    collector: Collector, browser: Browser
) -> None:
    """Events queued under full consent leave as none once the user narrows it before they
    are sent: no user id, no referrer."""
    page, sent = open_page(
        browser, demo_url(collector.url, call="0", consent="full", user="u-browser-4",
                          flush="3600000"), referer=REFERRER,
    )  # fmt: skip
    page.evaluate(
        """() => {
            const t = window.demo.tally;
            t.logout({reason: "user"});
            t.setConsent("none");
            return t.flush();
        }"""
    )
    events = sent.events()
    assert [e["event_type"] for e in events] == ["client_info", "login", "logout"]
    for event in events:
        assert event["consent"] == "none"
        assert "user_id" not in event and "referrer" not in event


def test_a_full_queue_drops_the_oldest_and_counts_them(
    collector: Collector, browser: Browser
) -> None:
    """With room for five, eight events queued leave the newest five, in order, and the
    three dropped are counted."""
    page, sent = open_page(browser, demo_url(collector.url, call="0"))
    counts = page.evaluate(
        """async () => {
            const t = Tally.init({endpoint: "/v1/events", writeKey: "tw_queue", appId: "demo.web",
                softwareVersion: "1.0.0", consent: "anonymous", maxQueue: 5,
                flushIntervalMs: 3600000});
            for (let i = 0; i < 8; i++) t.sessionStart({sessionId: "q-" + i, kind: "audio"});
            const before = [t.droppedEvents, t.pendingEvents];
            const flushed = await t.flush();
            return [...before, flushed, t.pendingEvents, t.sentEvents];
        }"""
    )
    assert counts == [3, 5, True, 0, 5]
    queued = [e["session_id"] for e in sent.events() if e["event_type"] == "session_start"]
    assert queued == [f"q-{i}" for i in range(3, 8)]


def test_a_503_is_retried_after_retry_after_with_the_same_event_ids(
    collector: Collector, browser: Browser
) -> None:
    """A 503 with Retry-After: 2 holds the next attempt back at least that long, even with
    a shorter backoff, and the retry carries the same events, which are then accepted."""
    page, sent = open_page(browser, demo_url(collector.url, call="0"))
    attempts: list[float] = []

    def unavailable_once(route: Any) -> None:
        if "tw_retry" not in (route.request.header_value("authorization") or ""):
            route.continue_()  # the demo's own client
            return
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            route.fulfill(status=503, headers={"Retry-After": "2"}, json={"accepted": []})
        else:
            route.continue_()

    page.route("**/v1/events", unavailable_once)
    page.evaluate(
        """() => {
            window.retried = Tally.init({endpoint: "/v1/events", writeKey: "tw_retry",
                appId: "demo.web", softwareVersion: "1.0.0", consent: "anonymous",
                flushIntervalMs: 100, retryBaseMs: 50});
            window.retried.logout({reason: "timeout"});
        }"""
    )
    page.wait_for_function("() => window.retried.sentEvents === 1")
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 1.9
    retries = [r for r in sent.posts() if "tw_retry" in (r.header_value("authorization") or "")]
    first, second = (orjson.loads(r.post_data_buffer or b"") for r in retries)
    assert [e["event_id"] for e in first] == [e["event_id"] for e in second]


def test_hidden_page_hands_the_queue_to_a_beacon_with_the_key_in_the_query(
    settings: Settings, collector: Collector, browser: Browser
) -> None:
    """When the page turns hidden, events still queued leave at once in a beacon that
    carries the key in its query (a beacon has no headers), and reach the raw topic."""
    page, _ = open_page(browser, demo_url(collector.url, call="0", flush="3600000"))
    session_id = f"beacon-{uuid.uuid4().hex[:12]}"
    page.evaluate("id => window.demo.tally.sessionStart({sessionId: id, kind: 'text'})", session_id)
    assert page.evaluate("() => window.demo.tally.pendingEvents") == 2  # with client_info
    with page.expect_request(lambda r: r.method == "POST") as beacon:
        page.evaluate(
            """() => {
                Object.defineProperty(document, "visibilityState", {get: () => "hidden"});
                document.dispatchEvent(new Event("visibilitychange"));
            }"""
        )
    request = beacon.value
    assert request.resource_type == "ping"
    assert request.url.endswith(f"/v1/events?key={WRITE_KEY}")
    assert "authorization" not in request.all_headers()
    sent_types = [e["event_type"] for e in orjson.loads(request.post_data_buffer or b"")]
    assert sent_types == ["client_info", "session_start"]
    assert page.evaluate("() => window.demo.tally.pendingEvents") == 0
    events = raw_events(
        settings, lambda found: bool(of_session(found, session_id, "session_start"))
    )
    assert len(of_session(events, session_id, "session_start")) == 1


def test_pagehide_hands_the_queue_to_a_beacon(
    settings: Settings, collector: Collector, browser: Browser
) -> None:
    """Leaving the page sends what is queued in a beacon on pagehide: the collector gets it
    with the key in the query and no Authorization header, and the events reach the raw
    topic."""
    page, _ = open_page(browser, demo_url(collector.url, call="0", flush="3600000"))
    session_id = f"pagehide-{uuid.uuid4().hex[:12]}"
    page.evaluate("id => window.demo.tally.sessionStart({sessionId: id, kind: 'text'})", session_id)
    seen = len(collector.received)
    page.goto(collector.url + "/healthz")
    events = raw_events(
        settings, lambda found: bool(of_session(found, session_id, "session_start"))
    )
    assert len(of_session(events, session_id, "session_start")) == 1
    posts = [r for r in collector.received[seen:] if r.method == "POST"]
    assert [(r.path_qs, r.authorization) for r in posts] == [(f"/v1/events?key={WRITE_KEY}", False)]
