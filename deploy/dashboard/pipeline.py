"""Pipeline health for the built-in dashboard: the collector's, the worker's and the sink's
``/metrics`` scraped every few seconds and kept for the last hour in memory, so the page shows
events in, refusals by reason and lag without a Prometheus server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

SCRAPE_INTERVAL_S: Final = 5.0
_REFUSALS: Final = ("tally_collector_events_refused_total", "tally_stream_events_refused_total")
HISTORY: Final = 720
"""Scrapes kept: an hour at the interval."""


@dataclass(frozen=True)
class Scrape:
    """The counters and gauges the dashboard plots, at one moment."""

    at: float
    accepted: float | None
    """tally_collector_events_accepted_total, all apps."""
    enriched: float | None
    refused: dict[str, float]
    """Refusals by reason: the collector's and the stream step's together."""
    written: float | None
    sink_lag: float | None
    stream_lag: float | None


def samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def scrape_from(texts: dict[str, str | None], at: float) -> Scrape:
    """One scrape from the pages of the stages that answered (name -> page, None when not)."""
    totals: dict[str, float] = {}
    refused: dict[str, float] = {}
    for text in texts.values():
        if text is None:
            continue
        for name, labels, value in samples(text):
            if name in (
                "tally_collector_events_refused_total",
                "tally_stream_events_refused_total",
            ):
                reason = labels.get("reason", "unknown")
                refused[reason] = refused.get(reason, 0.0) + value
            else:
                totals[name] = totals.get(name, 0.0) + value
    return Scrape(
        at=at,
        accepted=totals.get("tally_collector_events_accepted_total"),
        enriched=totals.get("tally_stream_events_enriched_total"),
        refused=refused,
        written=totals.get("tally_sink_rows_written_total"),
        sink_lag=totals.get("tally_sink_consumer_lag"),
        stream_lag=totals.get("tally_stream_consumer_lag"),
    )


def _rate(before: float | None, after: float | None, seconds: float) -> float | None:
    if before is None or after is None or seconds <= 0:
        return None
    return max(after - before, 0.0) / seconds  # a restarted stage starts its counters at 0


@dataclass
class PipelineWatch:
    """Scrapes the stages' metrics pages (name -> URL; a stage whose metrics are not served is
    left out) and answers the series the dashboard draws."""

    endpoints: dict[str, str]
    history: deque[Scrape] = field(default_factory=lambda: deque(maxlen=HISTORY))
    reachable: dict[str, bool] = field(default_factory=dict)

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        texts: dict[str, str | None] = {}
        for name, url in self.endpoints.items():
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as page:
                    texts[name] = await page.text() if page.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                texts[name] = None
            self.reachable[name] = texts[name] is not None
        self.history.append(scrape_from(texts, time.time()))

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(Exception):  # a parse error must not end the watch
                    await self.scrape_once(session)
                await asyncio.sleep(SCRAPE_INTERVAL_S)

    def series(self) -> dict[str, Any]:
        """Per-second rates between consecutive scrapes, and the lags, as columns."""
        scrapes = list(self.history)
        reasons = sorted({reason for scrape in scrapes for reason in scrape.refused})
        times: list[float] = []
        columns: dict[str, list[float | None]] = {
            "events_in_per_s": [], "enriched_per_s": [], "rows_written_per_s": [],
            "sink_lag": [], "stream_lag": [],
            **{f"refused_{reason}_per_s": [] for reason in reasons},
        }  # fmt: skip
        for before, after in itertools.pairwise(scrapes):
            seconds = after.at - before.at
            times.append(after.at)
            columns["events_in_per_s"].append(_rate(before.accepted, after.accepted, seconds))
            columns["enriched_per_s"].append(_rate(before.enriched, after.enriched, seconds))
            columns["rows_written_per_s"].append(_rate(before.written, after.written, seconds))
            columns["sink_lag"].append(after.sink_lag)
            columns["stream_lag"].append(after.stream_lag)
            for reason in reasons:
                columns[f"refused_{reason}_per_s"].append(
                    _rate(before.refused.get(reason, 0.0), after.refused.get(reason, 0.0), seconds)
                )
        return {"time": times, "columns": columns, "reachable": dict(self.reachable)}
