"""The built-in dashboard's HTTP server: the page and its vendored chart library, the panels'
data as JSON, pipeline health from the stages' metrics, and a ``/metrics`` of service
restarts.

Panels read through the analyst views only (deploy/dashboard_panels.py), so small groups are
hidden here as for any analyst. ClickHouse queries run in threads, each on a reader opened
for it: the server's native port, or on embedded ClickHouse the sink's query service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from deploy.dashboard.pipeline import PipelineWatch
from deploy.dashboard_panels import PANELS, Panel, dashboard_sql
from sinks.analyst_views import FILTER_DIMENSIONS, OTHER, analyst_view
from sinks.backends import ClickHouseBackend, ClickHouseError, sql_string

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
RANGES: Final = {
    "1h": timedelta(hours=1), "6h": timedelta(hours=6), "24h": timedelta(hours=24),
    "7d": timedelta(days=7), "30d": timedelta(days=30),
}  # fmt: skip
SQL_PANELS: Final = tuple(panel for panel in PANELS if panel.sql)
MAX_FILTER_CHARS: Final = 200
_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FILTER_SOURCES: Final = {
    "app_id": analyst_view("sessions", ("app_id", "channel"), "daily"),
    **{d: analyst_view("clients", (d,), "daily") for d in FILTER_DIMENSIONS if d != "app_id"},
}
_TYPES: Final = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

ReaderFactory = Callable[[], ClickHouseBackend]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or UTC).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # 0/0 in a bucket without sessions
    return value


def _range(request: web.Request) -> tuple[datetime, datetime]:
    window = RANGES.get(request.query.get("range", "24h"))
    if window is None:
        raise web.HTTPBadRequest(text=f"range: one of {', '.join(RANGES)}")
    end = datetime.now(UTC)
    return end - window, end


def _filters(request: web.Request) -> dict[str, str]:
    filters = {}
    for dimension in FILTER_DIMENSIONS:
        value = request.query.get(dimension, "")
        if len(value) > MAX_FILTER_CHARS:
            raise web.HTTPBadRequest(text=f"{dimension}: at most {MAX_FILTER_CHARS} characters")
        if value:
            filters[dimension] = value
    return filters


@contextlib.contextmanager
def _reader(open_reader: ReaderFactory) -> Iterator[ClickHouseBackend]:
    try:
        backend = open_reader()
    except ClickHouseError as err:
        raise web.HTTPServiceUnavailable(text=f"ClickHouse is not answering yet: {err}") from None
    try:
        yield backend
    finally:
        backend.close()


def panel_data(
    open_reader: ReaderFactory, panel: Panel, start: datetime, end: datetime,
    filters: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    sql, filtered = dashboard_sql(panel, start, end, filters)
    with _reader(open_reader) as backend:
        try:
            rows = backend.query(sql)
        except ClickHouseError as err:
            log.warning("dashboard panel %r failed: %s", panel.title, err)
            raise web.HTTPServiceUnavailable(text="ClickHouse refused the panel's query") from None
    return {
        "title": panel.title,
        "kind": panel.kind,
        "unit": panel.unit,
        "columns": list(panel.columns),
        "rows": [[_json_value(value) for value in row] for row in rows],
        "filtered": filtered,
    }


def filter_values(open_reader: ReaderFactory, start: datetime, end: datetime) -> dict[str, Any]:
    """Each filter dimension's values shown in the window (hidden groups read ``other``)."""
    first, last = sql_string(start.date().isoformat()), sql_string(end.date().isoformat())
    found: dict[str, list[str]] = {}
    with _reader(open_reader) as backend:
        for dimension, view in _FILTER_SOURCES.items():
            rows = backend.query(
                f"SELECT DISTINCT {dimension} FROM {view} WHERE day >= toDate({first}) "
                f"AND day <= toDate({last}) AND {dimension} != {sql_string(OTHER)} "
                f"ORDER BY {dimension} LIMIT 200"
            )
            found[dimension] = [str(row[0]) for row in rows]
    return found


class RestartsCollector(Collector):
    """``tally up``'s service restarts and liveness, read from its state file at each scrape."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        restarts = CounterMetricFamily(
            "tally_service_restarts", "Restarts of a service by tally up", labels=["service"]
        )
        running = GaugeMetricFamily(
            "tally_service_running", "1 while tally up's service runs", labels=["service"]
        )
        try:
            children = orjson.loads(self.state_file.read_bytes()).get("children", {})
        except (OSError, orjson.JSONDecodeError):
            children = {}
        for name, child in children.items():
            restarts.add_metric([name], float(child.get("restarts", 0)))
            running.add_metric([name], 1.0 if child.get("running") else 0.0)
        yield restarts
        yield running


def dashboard_app(
    open_reader: ReaderFactory, watch: PipelineWatch, *, min_users: int, backend_name: str,
    state_file: Path,
) -> web.Application:  # fmt: skip
    registry = CollectorRegistry()
    registry.register(RestartsCollector(state_file))
    routes = web.RouteTableDef()

    @routes.get("/")
    async def page(_: web.Request) -> web.Response:
        return _static("index.html")

    @routes.get(r"/static/{path:[A-Za-z0-9_./-]+}")
    async def static(request: web.Request) -> web.Response:
        return _static(request.match_info["path"])

    @routes.get("/api/panels")
    async def panels(_: web.Request) -> web.Response:
        described = [
            {"id": n, "title": p.title, "kind": p.kind, "unit": p.unit, "columns": p.columns}
            for n, p in enumerate(SQL_PANELS)
        ]
        about = {"min_users": min_users, "backend": backend_name, "ranges": list(RANGES),
                 "filters": list(FILTER_DIMENSIONS), "other": OTHER}  # fmt: skip
        return web.json_response({"panels": described, **about}, dumps=_dumps)

    @routes.get("/api/panel/{n:[0-9]+}")
    async def panel(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n >= len(SQL_PANELS):
            raise web.HTTPNotFound(text="no such panel")
        start, end = _range(request)
        data = await asyncio.to_thread(
            panel_data, open_reader, SQL_PANELS[n], start, end, _filters(request)
        )
        return web.json_response(data, dumps=_dumps)

    @routes.get("/api/filters")
    async def filters(request: web.Request) -> web.Response:
        start, end = _range(request)
        values = await asyncio.to_thread(filter_values, open_reader, start, end)
        return web.json_response(values, dumps=_dumps)

    @routes.get("/api/pipeline")
    async def pipeline(_: web.Request) -> web.Response:
        return web.json_response(watch.series(), dumps=_dumps)

    @routes.get("/metrics")
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def watch_pipeline(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application(middlewares=[_security_headers])
    app.add_routes(routes)
    app.cleanup_ctx.append(watch_pipeline)
    return app


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _static(path: str) -> web.Response:
    file = (STATIC_DIR / path).resolve()
    if STATIC_DIR not in file.parents or not file.is_file() or file.suffix not in _TYPES:
        raise web.HTTPNotFound()
    return web.Response(body=file.read_bytes(), content_type=_TYPES[file.suffix])


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    response.headers["Content-Security-Policy"] = _POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response
