"""`tally run`: the whole pipeline on a synthetic workload, ending in a report.

Brings up what is not configured elsewhere (a local Kafka broker, embedded ClickHouse),
starts the Faust worker as a child process and the sink in a thread, replays the workload,
waits until ClickHouse holds it, prints the report and stops everything it started, on
completion, error or Ctrl-C alike.
"""

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from deploy.interrupts import interrupts_deferred, raise_if_interrupted
from deploy.kafka import ensure_topics, fetch_broker_jars, start_kafka, stop_kafka
from deploy.services.process import spawn_child, stop_child
from deploy.settings import Settings, settings_environ
from deploy.wiring import kafka_jars_dir, open_backend, sink_config, topic_names, topic_specs
from producers.sdk import TallyProducer
from producers.workload import generate_workload
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.report import format_logins_per_hour, logins_per_hour
from sinks.writer import ClickHouseWriter

log = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 15.0
"""A Faust worker stops in a few seconds; one stuck (stopping while it joins its group) is
killed after this. Safe: what it took but did not commit is replayed, and stored once."""
WORKLOAD_SPAN_MS = 6 * 3_600_000
"""The replayed events' client times spread over the six hours before the run."""


@dataclass
class RunSummary:
    events_sent: int
    rows_written: int
    seconds_to_first_row: float | None
    seconds_total: float
    report: str


@contextlib.contextmanager
def kafka_for(settings: Settings) -> Iterator[str]:
    """The configured cluster, or a local broker started here and stopped on exit.

    The stop is in place before the start begins, so an interrupt at any moment of the start
    leaves no broker behind (stop_kafka finds it by its pid file).
    """
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap
        return
    jars = kafka_jars_dir(settings)
    if fetch_broker_jars(jars):
        log.info("fetched Kafka broker jars into %s", jars)
    else:
        log.info("reusing cached Kafka broker jars in %s", jars)
    try:
        broker = start_kafka(
            settings.state_dir / "kafka",
            jars,
            port=settings.kafka_port,
            controller_port=settings.kafka_controller_port,
        )
        yield broker.bootstrap
    finally:
        stop_kafka(settings.state_dir / "kafka")


@contextlib.contextmanager
def stream_worker(settings: Settings, bootstrap: str) -> Iterator[subprocess.Popen[bytes]]:
    """The Faust worker in a child process of its own group, stopped (SIGTERM, then KILL)."""
    log_path = settings.state_dir / "logs" / "worker.log"
    env = {**os.environ, **settings_environ(settings), "TALLY_KAFKA_BOOTSTRAP": bootstrap}
    worker: subprocess.Popen[bytes] | None = None
    try:
        with interrupts_deferred():  # the worker is under the finally below before any raise
            worker = spawn_child(
                [sys.executable, "-m", "deploy.cli", "worker"], log_path=log_path, env=env
            )
        log.info("stream worker started (pid %d, log %s)", worker.pid, log_path)
        yield worker
    finally:
        if worker is not None:
            stop_child(worker, timeout_s=WORKER_STOP_TIMEOUT_S)


class StageFailed(RuntimeError):
    """A stage of the pipeline stopped on its own; the message says which and where to look."""


class SinkThread:
    """The ClickHouse sink in a thread of this process, whose death is noticed, not silent."""

    def __init__(self, sink: EnrichedSink) -> None:
        self.sink = sink
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink")

    def _run(self) -> None:
        try:
            self.sink.run(self._stop)
        except BaseException as err:
            self.error = err
            log.error("the ClickHouse sink stopped: %s", _one_line(err))

    def start(self) -> None:
        self._thread.start()

    def check(self) -> None:
        """Raise StageFailed if the sink thread has ended without being asked to."""
        if not self._thread.is_alive() and not self._stop.is_set():
            cause = _one_line(self.error) if self.error else "it returned"
            raise StageFailed(f"the ClickHouse sink stopped: {cause}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sink.close()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


@contextlib.contextmanager
def sink_thread(sink: EnrichedSink) -> Iterator[SinkThread]:
    thread = SinkThread(sink)
    try:
        thread.start()
        yield thread
    finally:
        thread.stop()


def check_worker(worker: subprocess.Popen[bytes], settings: Settings) -> None:
    """Raise StageFailed if the stream worker has exited."""
    code = worker.poll()
    if code is not None:
        raise StageFailed(
            f"the stream worker exited with status {code}; see "
            f"{settings.state_dir / 'logs' / 'worker.log'}"
        )


def replay_workload(
    settings: Settings, bootstrap: str, check_stages: Callable[[], None] = lambda: None
) -> int:
    """Send the seeded workload, paced over ``workload_duration_s``, with a progress bar;
    ``check_stages`` runs while it waits, so a failed stage stops the replay."""
    events = generate_workload(
        seed=settings.workload_seed,
        clients=settings.workload_clients,
        events=settings.workload_events,
        end_ms=int(time.time() * 1000),
        span_ms=WORKLOAD_SPAN_MS,
    )
    with interrupts_deferred():  # kafka-python's bootstrap would swallow an interrupt
        producer = TallyProducer(
            bootstrap, topic_names(settings), compression_type=settings.kafka_compression_type
        )
    started = time.monotonic()
    pace = settings.workload_duration_s / len(events)
    log.info("replaying %d events over %.0f s", len(events), settings.workload_duration_s)
    try:
        progress = tqdm(events, desc="events", unit="ev", file=sys.stderr, disable=None)
        for n, event in enumerate(progress):
            raise_if_interrupted()
            producer.emit(event)
            ahead = started + n * pace - time.monotonic()
            if ahead > 0:
                check_stages()
                time.sleep(ahead)  # pacing the replay, not synchronizing
        producer.flush(timeout_s=60)
    finally:
        producer.close()
    return len(events)


def run_pipeline(settings: Settings, *, drain_timeout_s: float = 180.0) -> RunSummary:
    """Run the whole pipeline once; see the module docstring.

    Raises StageFailed when the worker or the sink stops on its own. Whatever happens,
    everything started here is stopped in order: worker, sink, broker, ClickHouse.
    """
    t0 = time.time()
    with contextlib.closing(open_backend(settings)) as backend:
        apply_migrations(backend)
        with contextlib.ExitStack() as stages:
            bootstrap = stages.enter_context(kafka_for(settings))
            ensure_topics(bootstrap, topic_specs(settings))
            with interrupts_deferred():  # kafka-python's bootstrap would swallow an interrupt
                sink = EnrichedSink(sink_config(settings, bootstrap), ClickHouseWriter(backend))
            sinking = stages.enter_context(sink_thread(sink))
            worker = stages.enter_context(stream_worker(settings, bootstrap))

            def check_stages() -> None:
                raise_if_interrupted()
                check_worker(worker, settings)
                sinking.check()

            sent = replay_workload(settings, bootstrap, check_stages)
            deadline = time.monotonic() + drain_timeout_s
            while sink.rows_written < sent and time.monotonic() < deadline:
                check_stages()
                time.sleep(0.2)  # polling the sink's count against the deadline
            if sink.rows_written < sent:
                log.warning(
                    "only %d of %d events reached ClickHouse before the deadline",
                    sink.rows_written,
                    sent,
                )
        report = format_logins_per_hour(logins_per_hour(backend))
    first = sink.first_write_at - t0 if sink.first_write_at else None
    return RunSummary(sent, sink.rows_written, first, time.time() - t0, report)
