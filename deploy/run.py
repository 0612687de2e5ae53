"""`tally run`: the whole pipeline on a synthetic workload, ending in a report.

Brings up what is not configured elsewhere (a local Kafka broker, embedded ClickHouse),
starts the Faust worker as a child process and the sink in a thread, replays the workload,
waits until ClickHouse holds it, prints the report and stops everything it started, on
completion, error or Ctrl-C alike.
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from deploy.kafka import ensure_topics, fetch_broker_jars, start_kafka, stop_kafka
from deploy.settings import Settings, settings_environ
from deploy.wiring import kafka_jars_dir, open_backend, sink_config, topic_names, topic_specs
from producers.sdk import TallyProducer
from producers.workload import generate_workload
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.report import format_logins_per_hour, logins_per_hour
from sinks.writer import ClickHouseWriter

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    events_sent: int
    rows_written: int
    seconds_to_first_row: float | None
    seconds_total: float
    report: str


@contextlib.contextmanager
def kafka_for(settings: Settings) -> Iterator[str]:
    """The configured cluster, or a local broker started here and stopped on exit."""
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap
        return
    jars = kafka_jars_dir(settings)
    if fetch_broker_jars(jars):
        log.info("fetched Kafka broker jars into %s", jars)
    else:
        log.info("reusing cached Kafka broker jars in %s", jars)
    broker = start_kafka(
        settings.state_dir / "kafka",
        jars,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
    )
    try:
        yield broker.bootstrap
    finally:
        stop_kafka(settings.state_dir / "kafka")


@contextlib.contextmanager
def stream_worker(settings: Settings, bootstrap: str) -> Iterator[subprocess.Popen[bytes]]:
    """The Faust worker in a child process of its own group, stopped (SIGTERM, then KILL)."""
    log_path = settings.state_dir / "logs" / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_environ(settings), "TALLY_KAFKA_BOOTSTRAP": bootstrap}
    with open(log_path, "ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "worker"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    log.info("stream worker started (pid %d, log %s)", worker.pid, log_path)
    try:
        yield worker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def replay_workload(settings: Settings, bootstrap: str) -> int:
    """Send the seeded workload, paced over ``workload_duration_s``, with a progress bar."""
    events = generate_workload(
        seed=settings.workload_seed,
        clients=settings.workload_clients,
        events=settings.workload_events,
        end_ms=int(time.time() * 1000),
        span_ms=6 * 3_600_000,
    )
    producer = TallyProducer(bootstrap, topic_names(settings))
    started = time.monotonic()
    pace = settings.workload_duration_s / len(events)
    try:
        progress = tqdm(events, desc="events", unit="ev", file=sys.stderr, disable=None)
        for n, event in enumerate(progress):
            producer.emit(event)
            ahead = started + n * pace - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the replay, not synchronizing
        producer.flush(timeout_s=60)
    finally:
        producer.close()
    return len(events)


def run_pipeline(settings: Settings, *, drain_timeout_s: float = 180.0) -> RunSummary:
    """Run the whole pipeline once; see the module docstring."""
    t0 = time.time()
    backend = open_backend(settings)
    try:
        apply_migrations(backend)
        writer = ClickHouseWriter(backend)
        with kafka_for(settings) as bootstrap:
            ensure_topics(bootstrap, topic_specs(settings))
            stop = threading.Event()
            sink = EnrichedSink(sink_config(settings, bootstrap), writer)
            sink_thread = threading.Thread(target=sink.run, args=(stop,), name="sink")
            with stream_worker(settings, bootstrap) as worker:
                sink_thread.start()
                try:
                    sent = replay_workload(settings, bootstrap)
                    deadline = time.monotonic() + drain_timeout_s
                    while sink.rows_written < sent and time.monotonic() < deadline:
                        if worker.poll() is not None:
                            raise RuntimeError(
                                "the stream worker exited; see "
                                f"{settings.state_dir / 'logs' / 'worker.log'}"
                            )
                        stop.wait(0.2)
                    if sink.rows_written < sent:
                        log.warning(
                            "only %d of %d events reached ClickHouse before the deadline",
                            sink.rows_written,
                            sent,
                        )
                finally:
                    stop.set()
                    if sink_thread.is_alive():
                        sink_thread.join()
                    sink.close()
        report = format_logins_per_hour(logins_per_hour(backend))
    finally:
        backend.close()
    first = sink.first_write_at - t0 if sink.first_write_at else None
    return RunSummary(sent, sink.rows_written, first, time.time() - t0, report)
