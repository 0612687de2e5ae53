"""`tally sink`: the ClickHouse writer as a long-running service.

It runs until SIGINT or SIGTERM, then finishes the batch in hand, commits and exits 0. On
embedded ClickHouse it owns the data folder (one process per folder), so it also answers
read-only queries for `tally status` and `tally report` (sinks/query_service.py); how to
reach it is written to a connection file, mode 0600, removed on stop.
"""

import contextlib
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import orjson

from deploy.settings import Settings, SettingsError
from deploy.wiring import open_writer, query_service_file, serve_metrics, sink_config
from sinks.consumer import EnrichedSink
from sinks.metrics import new_sink_metrics
from sinks.migrations import apply_migrations
from sinks.query_service import QueryService, SerializedBackend
from sinks.retention import drop_expired_partitions
from sinks.writer import ClickHouseWriter

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: the service finishes its work in hand, then stops."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("%s received; stopping after the batch in hand", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    return stop


@contextlib.contextmanager
def serving_queries(backend: SerializedBackend, connection_file: Path) -> Iterator[None]:
    """Answer read-only queries on loopback while the block runs."""
    token = secrets.token_urlsafe(32)
    with QueryService(backend, token) as service:
        _write_private(connection_file, orjson.dumps({"url": service.url, "token": token}))
        try:
            yield
        finally:
            connection_file.unlink(missing_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` whole with ``data``, readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    staging.replace(path)


RETENTION_INTERVAL_S = 24 * 3600.0


@contextlib.contextmanager
def daily_retention(backend: SerializedBackend, settings: Settings) -> Iterator[None]:
    """Drop partitions past retention now and every day after, while the block runs."""
    done = threading.Event()

    def drop_daily() -> None:
        while True:
            try:
                drop_expired_partitions(
                    backend,
                    datetime.now(UTC).date(),
                    settings.retention_event_days,
                    settings.retention_rollup_days,
                )
            except Exception as err:  # ClickHouse away: the next day tries again
                log.warning("retention failed, trying again in a day: %s", err)
            if done.wait(RETENTION_INTERVAL_S):
                return

    thread = threading.Thread(target=drop_daily, name="retention", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def run_sink_service(settings: Settings) -> int:
    """Consume the enriched topic into ClickHouse until stopped; see the module docstring."""
    if not settings.kafka_bootstrap:
        raise SettingsError("TALLY_KAFKA_BOOTSTRAP: the sink needs a Kafka cluster")
    stop = stop_on_signals()
    backend = SerializedBackend(open_writer(settings))
    try:
        apply_migrations(backend, settings.analyst_min_users)
        config = sink_config(settings, settings.kafka_bootstrap)
        metrics = new_sink_metrics()
        if settings.sink_metrics_port:
            serve_metrics(
                metrics.registry,
                settings.sink_metrics_host,
                settings.sink_metrics_port,
                "TALLY_SINK_METRICS_PORT",
            )
        sink = EnrichedSink(config, ClickHouseWriter(backend), metrics)
        try:
            with contextlib.ExitStack() as stack:
                if backend.name == "embedded":
                    stack.enter_context(serving_queries(backend, query_service_file(settings)))
                stack.enter_context(daily_retention(backend, settings))
                log.info(
                    "sink ready: %s into %s ClickHouse, database %s (group %s)",
                    config.topics.enriched,
                    backend.name,
                    backend.database,
                    config.group_id,
                )
                sink.run(stop)
        finally:
            sink.close()
    finally:
        backend.close()
    log.info("sink stopped after writing %d rows", sink.rows_written)
    return 0
