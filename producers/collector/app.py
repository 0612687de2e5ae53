"""The collector's HTTP application: ``POST /v1/events``, ``/healthz``, ``/readyz`` and
``/metrics``, built from a frozen config and a producer (deploy/ wires both).

A request goes: authorize (a seam for app keys, none yet), read the body within its bound,
judge every event at the edge (``edge.py``), produce the accepted ones as batches, and answer
2xx only once Kafka has acknowledged all of them. Kafka unreachable: 503 with Retry-After and
nothing accepted (a batch already acknowledged is then sent again by the client's retry, and
the stream step drops the repeated event ids).

Bodies: aiohttp's parser decodes a gzip body itself, in bounded chunks, whatever its
``auto_decompress`` says (the C parser ignores it for requests), so the app counts the decoded
bytes as they come and refuses (413) past the bound: a small body that inflates without limit
never sits in memory. ``edge.read_body`` decodes gzip for callers that hold the raw bytes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producers.collector.edge import (
    IpNetwork,
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
from producers.collector.metrics import CollectorMetrics, new_metrics
from schemas.reasons import ReasonCode

Authorize = Callable[[web.Request], Awaitable[str | None]]
"""The auth seam: the app id the request may write for (None: any single app), or raise an
``aiohttp.web.HTTPException`` (401, 403) to refuse it before its body is read."""

METRICS_KEY: Final = web.AppKey("tally_collector_metrics", CollectorMetrics)


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
    """Said in Retry-After when Kafka cannot take the events."""


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


def create_app(
    config: CollectorConfig, producer: BatchProducer, *, authorize: Authorize | None = None
) -> web.Application:
    """The collector app; it closes ``producer`` on cleanup (after the last request)."""
    metrics = new_metrics()
    app = web.Application()
    app[METRICS_KEY] = metrics

    async def handle(request: web.Request) -> web.Response:
        app_id = await authorize(request) if authorize is not None else None
        try:
            gzipped = is_gzip(request.headers.get("Content-Encoding"))
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
            return _json({"error": refusal.reason}, refusal.status)
        batch_id = str(uuid.uuid4())
        batches = encode_batches(judged, batch_id=batch_id)
        if batches and judged.app_id is not None:
            key = partition_key(judged.app_id, judged.accepted, batch_id)
            try:
                with metrics.produce_seconds.time():
                    await producer.send(key, batches)
            except ProducerUnavailable:
                return _json(
                    {"error": "kafka_unavailable", "accepted": []},
                    503,
                    {"Retry-After": str(config.retry_after_s)},
                )
        metrics.events_accepted.inc(len(judged.accepted))
        for refused in judged.refused:
            metrics.events_refused.labels(reason=refused.reason.value).inc()
        return _json(response_body(judged), 200)

    async def post_events(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handle(request)
            status = response.status
            return response
        except web.HTTPException as err:
            status = err.status
            raise
        finally:
            metrics.requests.labels(status=str(status)).inc()
            metrics.request_seconds.observe(time.perf_counter() - started)

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
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.on_cleanup.append(close_producer)
    return app
