"""The collector's HTTP application: ``POST /v1/events`` (and its CORS preflight),
``/healthz``, ``/readyz`` and ``/metrics``, built from a frozen config, a producer and the
apps registry (deploy/ wires all three).

A request goes: its key (``Authorization: Bearer KEY``, or the ``key`` query parameter for
navigator.sendBeacon) to its app, else 401; a write key from an Origin its app did not
register, 403; the key's token bucket, else 429; the bound on events waiting for Kafka, else
503 ``overloaded``. All of that before a byte of the body is read. Then the body within its
bound, every event judged at the edge (``edge.py``) for the key's app, the accepted ones
produced as batches, and 2xx only once Kafka has acknowledged all of them. Kafka unreachable:
503 with Retry-After and nothing accepted (a batch already acknowledged is then sent again by
the client's retry, and the stream step drops the repeated event ids).

Without a registry (``apps=None``, tests that build the app in-process) there are no key
checks and no CORS: the request's app is its first accepted event's.

Bodies: aiohttp's parser decodes a gzip body itself, in bounded chunks, whatever its
``auto_decompress`` says (the C parser ignores it for requests), so the app counts the decoded
bytes as they come and refuses (413) past the bound: a small body that inflates without limit
never sits in memory. ``edge.read_body`` decodes gzip for callers that hold the raw bytes.

Nothing here logs per request, and no answer, metric label or exception holds a key or a
value of an event.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producers.collector.apps import AppRegistry, KeyMatch, bearer_key, query_key
from producers.collector.edge import (
    IpNetwork,
    RequestRefusal,
    RequestRefused,
    client_ip,
    encode_batches,
    is_gzip,
    judge_events,
    partition_key,
    read_body,
    response_body,
)
from producers.collector.kafka import BatchProducer, ProducerUnavailable
from producers.collector.limits import KeyRateLimiter, PendingEvents, RateLimit, retry_after_s
from producers.collector.metrics import CollectorMetrics, new_metrics
from producers.collector.static import add_static_routes
from schemas.reasons import ReasonCode

METRICS_KEY: Final = web.AppKey("tally_collector_metrics", CollectorMetrics)

PREFLIGHT_MAX_AGE_S: Final = 3600
"""How long a browser may reuse a preflight's answer; every POST is checked anyway."""

# CORS is written out here rather than with aiohttp-cors: that library fixes the allowed
# origins per route when the app is built, while these are per app, change while the
# collector runs (`tally apps add`), and depend on the request's key.
_PREFLIGHT_HEADERS: Final = {
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
}


@dataclass(frozen=True)
class CollectorConfig:
    """What the collector is told; deploy/ builds it from settings."""

    host: str = "127.0.0.1"
    port: int = 8750
    max_body_bytes: int = 1024 * 1024
    """Largest body, as sent and after gzip decoding (413 above)."""
    max_events: int = 500
    """Most events in one request (413 above)."""
    trusted_proxies: tuple[IpNetwork, ...] = ()
    """Peers whose X-Forwarded-For is believed; from anyone else it is ignored."""
    retry_after_s: int = 5
    """Said in Retry-After when Kafka cannot take the events (or too many wait for it)."""
    write_key_rate: RateLimit = field(default_factory=lambda: RateLimit(1000.0, 2000))
    """Requests per second (and burst) of one app's public write key, all its clients
    together; 429 with Retry-After above."""
    secret_key_rate: RateLimit = field(default_factory=lambda: RateLimit(10000.0, 20000))
    """The same for one app's secret key (server-side senders)."""
    max_pending_events: int = 50_000
    """Most events held in memory awaiting Kafka's acknowledgement, all requests together: a
    request that would pass it gets 503 ``overloaded`` with Retry-After."""


def _json(body: object, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


async def _read_bounded(request: web.Request, max_bytes: int, *, as_sent: bool) -> bytes:
    """The body as aiohttp decoded it, refusing (413) once more than ``max_bytes`` have come
    (and at once when the declared length of a body read as sent is over)."""
    if as_sent and request.content_length is not None and request.content_length > max_bytes:
        raise RequestRefused(413, ReasonCode.TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise RequestRefused(413, ReasonCode.TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


def _presented_key(request: web.Request) -> tuple[str | None, bool]:
    """The request's key and whether it came in the URL. An Authorization header, when
    present, is the only place looked at (malformed: no key)."""
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    if authorization is not None:
        return bearer_key(authorization), False
    return query_key(request.query.get("key")), True


def create_app(
    config: CollectorConfig, producer: BatchProducer, *, apps: AppRegistry | None = None
) -> web.Application:
    """The collector app; it closes ``producer`` on cleanup (after the last request).

    With ``apps``, every ``POST /v1/events`` needs an active key of an app in it (see the
    module docstring); without, none is asked for and no CORS header is ever sent.
    """
    pending = PendingEvents(config.max_pending_events)
    limiter = KeyRateLimiter()
    metrics = new_metrics(pending=lambda: pending.count)
    app = web.Application()
    app[METRICS_KEY] = metrics
    retry_headers = {"Retry-After": str(config.retry_after_s)}

    def refuse(
        status: int, reason: str, headers: dict[str, str], extra: dict[str, str] | None = None
    ) -> web.Response:
        metrics.count_refusal(reason)
        return _json({"error": reason}, status, {**headers, **extra} if extra else headers)

    async def handle(request: web.Request) -> web.Response:
        origin = request.headers.get(hdrs.ORIGIN)
        headers: dict[str, str] = {} if origin is None else {"Vary": "Origin"}
        app_id: str | None = None
        if apps is not None:
            key, in_url = _presented_key(request)
            match: KeyMatch | None = apps.lookup(key) if key is not None else None
            if match is None:
                return refuse(401, RequestRefusal.UNKNOWN_KEY, headers)
            if in_url and match.kind == "secret":
                return refuse(401, RequestRefusal.SECRET_KEY_IN_URL, headers)
            if origin is not None:
                if origin in match.origins:
                    headers["Access-Control-Allow-Origin"] = origin
                    headers["Access-Control-Expose-Headers"] = "Retry-After"
                elif match.kind == "write":
                    return refuse(403, RequestRefusal.ORIGIN_FORBIDDEN, headers)
            limit = config.write_key_rate if match.kind == "write" else config.secret_key_rate
            wait_s = limiter.take(match.digest, limit, time.monotonic())
            if wait_s:
                retry = {"Retry-After": str(retry_after_s(wait_s))}
                return refuse(429, RequestRefusal.RATE_LIMITED, headers, retry)
            app_id = match.app_id
        if pending.full():
            return refuse(503, RequestRefusal.OVERLOADED, headers, retry_headers)
        try:
            gzipped = is_gzip(request.headers.get(hdrs.CONTENT_ENCODING))
            raw = await _read_bounded(request, config.max_body_bytes, as_sent=not gzipped)
            items = read_body(raw, None, max_bytes=config.max_body_bytes)  # decoded by aiohttp
            peer = request.transport.get_extra_info("peername") if request.transport else None
            ip = client_ip(
                peer[0] if isinstance(peer, tuple) else None,
                request.headers.get("X-Forwarded-For"),
                config.trusted_proxies,
            )
            judged = judge_events(
                items,
                collector_time_ms=time.time_ns() // 1_000_000,
                ip=ip,
                app_id=app_id,
                max_events=config.max_events,
            )
        except RequestRefused as refusal:
            return refuse(refusal.status, refusal.reason, headers)
        batch_id = str(uuid.uuid4())
        batches = encode_batches(judged, batch_id=batch_id)
        if batches and judged.app_id is not None:
            held = len(judged.accepted)
            if not pending.try_hold(held):
                return refuse(503, RequestRefusal.OVERLOADED, headers, retry_headers)
            partition = partition_key(judged.app_id, judged.accepted, batch_id)
            try:
                with metrics.produce_seconds.time():
                    await producer.send(partition, batches)
            except ProducerUnavailable:
                metrics.count_refusal(RequestRefusal.KAFKA_UNAVAILABLE)
                return _json(
                    {"error": RequestRefusal.KAFKA_UNAVAILABLE, "accepted": []},
                    503,
                    {**headers, **retry_headers},
                )
            finally:
                pending.release(held)
        metrics.events_accepted.inc(len(judged.accepted))
        for refused in judged.refused:
            metrics.count_refused_event(refused.reason)
        return _json(response_body(judged), 200, headers)

    async def post_events(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handle(request)
            status = response.status
            return response
        finally:
            metrics.count_request(status)
            metrics.request_seconds.observe(time.perf_counter() - started)

    async def preflight(request: web.Request) -> web.Response:
        """Allowed for an origin registered for the ``key`` parameter's app, if the URL has
        one (the POST it precedes may carry its key there), else for any active app's (a
        preflight carries no Authorization header; the POST then checks its key's app)."""
        origin = request.headers.get(hdrs.ORIGIN)
        allowed = False
        if apps is not None and origin is not None:
            if "key" in request.query:
                key = query_key(request.query.get("key"))
                match = apps.lookup(key) if key is not None else None
                allowed = match is not None and origin in match.origins
            else:
                allowed = apps.origin_registered(origin)
        if origin is None or not allowed:
            metrics.count_preflight(403)
            return _json({"error": RequestRefusal.ORIGIN_FORBIDDEN}, 403, {"Vary": "Origin"})
        metrics.count_preflight(204)
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin", **_PREFLIGHT_HEADERS}
        return web.Response(status=204, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "up"}, 200)

    async def readyz(request: web.Request) -> web.Response:
        if await producer.ready():
            return _json({"status": "ready"}, 200)
        return _json(
            {"status": "kafka_unavailable"}, 503, {"Retry-After": str(config.retry_after_s)}
        )

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def close_producer(app: web.Application) -> None:
        await producer.close()

    app.router.add_post("/v1/events", post_events)
    app.router.add_route("OPTIONS", "/v1/events", preflight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    add_static_routes(app)
    app.on_cleanup.append(close_producer)
    return app
