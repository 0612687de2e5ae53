"""A load generator for the HTTP collector: the synthetic workload's event mix, at a target
rate or flat out, as cheaply as the sender can make it.

Making and encoding an event takes about 47 us, nearly a core at 20,000 events/s on a machine
the pipeline shares. So a few thousand events are made once as byte templates; each send fills
in a new event id, the send time as client time, and a cycle suffix on user and session ids
(so every cycle's sessions are new ones): about 2 us an event.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import aiohttp

from producers.workload import generate_workload
from schemas.validation import encode_event

_EVENT_ID: Final = re.compile(rb'^\{"event_id":"[0-9a-f-]{36}"')
_CLIENT_TIME: Final = re.compile(rb'"client_time_ms":\d+')
_IDS: Final = re.compile(rb'"(user_id|session_id)":"([A-Za-z0-9_.:-]{1,50})"')
LOGIN: Final = b'"event_type":"login"'


@dataclass(frozen=True)
class EventTemplate:
    """An encoded event as %-format bytes: event id, client time, then the cycle suffix of
    each opaque id in it."""

    fmt: bytes
    ids: int
    is_login: bool


def event_templates(app_id: str, count: int, seed: int = 7) -> list[EventTemplate]:
    """``count`` events of the workload's mix, in client-time order, for app ``app_id``."""
    far = int(time.time() * 1000) + 86_400_000
    events = generate_workload(
        seed=seed, clients=max(count // 8, 10), events=count, end_ms=far, span_ms=3_600_000
    )
    templates = []
    for event in events:
        raw = encode_event(event.model_copy(update={"app_id": app_id})).replace(b"%", b"%%")
        raw = _EVENT_ID.sub(b'{"event_id":"%s"', raw, count=1)
        raw = _CLIENT_TIME.sub(b'"client_time_ms":%d', raw, count=1)
        raw, ids = _IDS.subn(rb'"\1":"\2-%s"', raw)
        templates.append(EventTemplate(raw, ids, LOGIN in raw))
    return templates


@dataclass
class Probe:
    """A login whose arrival in ClickHouse is watched: sent at ``sent_s`` (wall clock)."""

    event_id: str
    sent_s: float
    seen_s: float | None = None


@dataclass
class LoadStats:
    sent_events: int = 0
    accepted_events: int = 0
    refused_requests: int = 0
    failed_requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    sent_per_second: dict[int, int] = field(default_factory=dict)
    """Events accepted, by whole second since the start."""


class LoadGenerator:
    """Sends the templates' events in requests of ``batch`` events, cycling through them."""

    def __init__(self, templates: list[EventTemplate], batch: int = 100) -> None:
        self._templates = templates
        self._batch = batch
        self._prefix = str(uuid.uuid4())[:24]
        self._serial = itertools.count()
        self._cycle = 0
        self._position = 0

    def _next_body(self, now_ms: int, probe_every: bool) -> tuple[bytes, int, Probe | None]:
        parts = []
        probe = None
        for _ in range(self._batch):
            if self._position == len(self._templates):
                self._position = 0
                self._cycle += 1
            template = self._templates[self._position]
            self._position += 1
            event_id = f"{self._prefix}{next(self._serial):012x}"
            suffix = f"c{self._cycle}".encode()
            values = (event_id.encode(), now_ms, *([suffix] * template.ids))
            parts.append(template.fmt % values)
            if probe_every and probe is None and template.is_login:
                probe = Probe(event_id, now_ms / 1000)
        return b"[" + b",".join(parts) + b"]", len(parts), probe

    def body(self, now_ms: int) -> bytes:
        """The next request's body (a JSON array of ``batch`` events)."""
        return self._next_body(now_ms, False)[0]

    async def run(
        self, url: str, key: str, *, rate: float, seconds: float, connections: int = 8,
        probe_interval_s: float = 0.1, on_probe: Callable[[Probe], None] = lambda _: None,
        on_progress: Callable[[int], object] = lambda _: None,
    ) -> LoadStats:  # fmt: skip
        """Send for ``seconds`` at ``rate`` events/s (0: as fast as the collector answers),
        over ``connections`` kept-alive connections; one login every ``probe_interval_s``
        is handed to ``on_probe``."""
        stats = LoadStats()
        start = time.monotonic()
        stop_at = start + seconds
        slots: Iterator[int] = itertools.count()
        next_probe = [start]
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def sender() -> None:
                while True:
                    slot = next(slots)
                    if rate > 0:
                        due = start + slot * self._batch / rate
                        if due >= stop_at:
                            return
                        if due > time.monotonic():
                            await asyncio.sleep(due - time.monotonic())
                    elif time.monotonic() >= stop_at:
                        return
                    now = time.monotonic()
                    wants_probe = now >= next_probe[0]
                    body, count, probe = self._next_body(int(time.time() * 1000), wants_probe)
                    if probe is not None:
                        next_probe[0] = now + probe_interval_s
                    stats.sent_events += count
                    try:
                        async with session.post(url, data=body, headers=headers) as answer:
                            await answer.read()
                            status = answer.status
                    except (aiohttp.ClientError, OSError):
                        stats.failed_requests += 1
                        continue
                    stats.statuses[status] = stats.statuses.get(status, 0) + 1
                    if 200 <= status < 300:
                        stats.accepted_events += count
                        second = int(time.monotonic() - start)
                        stats.sent_per_second[second] = stats.sent_per_second.get(second, 0) + count
                        on_progress(count)
                        if probe is not None:
                            on_probe(probe)
                    else:
                        stats.refused_requests += 1

            await asyncio.gather(*(sender() for _ in range(connections)))
        return stats
