"""`tally collector`: the HTTP collector as a long-running service.

It listens until SIGINT or SIGTERM, then stops taking connections, lets the requests in hand
finish (their events acknowledged by Kafka or answered 503), closes the producer and exits
0. aiohttp's access log is off: it would write every client's IP address to the journal.

It always asks for keys: the apps registry (`tally apps`) is read at start, and again when
the file changes, so an app added or revoked counts without a restart.
"""

import asyncio
import logging
import signal

from aiohttp import web

from deploy.settings import Settings, SettingsError
from deploy.wiring import collector_apps, collector_config, collector_producer, topic_names
from producers.collector.app import create_app

log = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 30.0
"""How long requests in hand may take to finish after a stop (the unit allows 60 s)."""


async def serve_collector(settings: Settings, bootstrap: str) -> int:
    """Serve until SIGINT or SIGTERM; 1 when the address cannot be bound."""
    config = collector_config(settings)
    apps = collector_apps(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    app = create_app(config, collector_producer(settings, bootstrap), apps=apps)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, config.host, config.port).start()
        except OSError as err:
            log.error(
                "collector cannot listen on %s:%d: %s", config.host, config.port, err.strerror
            )
            return 1
        log.info(
            "collector ready: http://%s:%d/v1/events into %s, %d apps in %s",
            config.host,
            config.port,
            topic_names(settings).raw,
            apps.active_apps,
            apps.path,
        )
        if not apps.active_apps:
            log.warning("no app is registered: every request is refused until `tally apps add`")
        await stop.wait()
    finally:
        await runner.cleanup()
    log.info("collector stopped")
    return 0


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    if not stop.is_set():
        log.info("%s received; finishing the requests in hand", signal.Signals(signum).name)
    stop.set()


def run_collector_service(settings: Settings) -> int:
    """Run the collector until stopped; see the module docstring."""
    if not settings.kafka_bootstrap:
        raise SettingsError("TALLY_KAFKA_BOOTSTRAP: the collector needs a Kafka cluster")
    return asyncio.run(serve_collector(settings, settings.kafka_bootstrap))
