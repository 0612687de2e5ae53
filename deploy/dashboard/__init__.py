"""`tally dashboard`: the built-in service-quality dashboard, served on loopback by `tally up`.

The page (static/) draws with uPlot, vendored in static/vendor/uplot (MIT): 50 KB, no
dependencies, fast on thousands of points, and served from here so the page asks no other
host for anything. Its Content-Security-Policy allows only this origin.
"""

import asyncio
import logging
import signal

from aiohttp import web

from deploy.dashboard.pipeline import PipelineWatch
from deploy.dashboard.server import dashboard_app
from deploy.settings import Settings
from deploy.up import up_state_file
from deploy.wiring import open_shared_reader

log = logging.getLogger(__name__)


def metrics_endpoints(settings: Settings) -> dict[str, str]:
    """The stages' /metrics pages (a stage whose metrics are not served is left out)."""
    endpoints = {"collector": f"http://{settings.collector_host}:{settings.collector_port}/metrics"}
    if settings.worker_metrics_port:
        endpoints["worker"] = (
            f"http://{settings.worker_metrics_host}:{settings.worker_metrics_port}/metrics"
        )
    if settings.sink_metrics_port:
        endpoints["sink"] = (
            f"http://{settings.sink_metrics_host}:{settings.sink_metrics_port}/metrics"
        )
    return endpoints


async def serve_dashboard(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM; 1 when the address cannot be bound."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = dashboard_app(
        lambda: open_shared_reader(settings),
        PipelineWatch(metrics_endpoints(settings)),
        min_users=settings.analyst_min_users,
        backend_name=settings.clickhouse_backend,
        state_file=up_state_file(settings),
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        host, port = settings.dashboard_host, settings.dashboard_port
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as err:
            log.error("dashboard cannot listen on %s:%d: %s", host, port, err.strerror)
            return 1
        log.info("dashboard on http://%s:%d/", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
    log.info("dashboard stopped")
    return 0


def run_dashboard_service(settings: Settings) -> int:
    return asyncio.run(serve_dashboard(settings))
