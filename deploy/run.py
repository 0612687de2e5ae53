"""`tally run`: the whole pipeline on a synthetic workload, ending in a report.

Brings up what is not configured elsewhere (a local Kafka broker, embedded ClickHouse),
starts the Faust worker and the HTTP collector as child processes and the sink in a thread,
replays the workload through the real ways in, waits until ClickHouse holds it, prints the
report and stops everything it started, on completion, error or Ctrl-C alike.

The ways in are those of production: the clients' events go over HTTP to the collector with
their app's key (the Python SDK's HTTP transport), the auth server's login outcomes over
Kafka (the SDK's Kafka transport). The apps are registered in a registry of the run's own,
never the operator's. The synthetic clients sit behind a loopback "proxy" that names each
client's public address in X-Forwarded-For, which the run's collector is told to trust.
"""

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from deploy.interrupts import interrupts_deferred, raise_if_interrupted
from deploy.kafka import ensure_topics, fetch_broker_jars, start_kafka, stop_kafka
from deploy.services.process import spawn_child, stop_child
from deploy.settings import Settings, settings_environ
from deploy.wiring import kafka_jars_dir, open_backend, sink_config, topic_names, topic_specs
from producers.collector.apps import register_app
from producers.sdk import TallyClient, TallyHttpClient, TallyProducer
from producers.workload import APP_IDS, generate_workload, sender_of
from schemas.events import Envelope
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.report import format_logins_per_hour, format_report, logins_per_hour, quality_report
from sinks.writer import ClickHouseWriter

log = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 15.0
WORKER_READY_TIMEOUT_S = 120.0
WORKER_READY = "stream worker ready"
"""A Faust worker stops in a few seconds; one stuck (stopping while it joins its group) is
killed after this. Safe: what it took but did not commit is replayed, and stored once."""
WORKLOAD_SPAN_MS = 6 * 3_600_000
"""The replayed events' client times spread over the six hours before the run."""
WORKLOAD_ORIGINS = {"browser": ["https://chat.conferendo.example"], "desktop": []}
"""The origins each synthetic app's pages are served from (desktop apps have none)."""
REPLAY_FLUSH_TIMEOUT_S = 60.0
COLLECTOR_READY_TIMEOUT_S = 60.0
COLLECTOR_STOP_TIMEOUT_S = 35.0
"""The collector lets the requests in hand finish for up to 30 s after SIGTERM."""


@dataclass
class RunSummary:
    events_sent: int
    rows_written: int
    sent_over_http: int
    """Client events, sent over HTTP to the collector (the rest went through the Kafka SDK)."""
    collector_accepted: int
    """What the collector's /metrics counted as accepted: every HTTP event, once or more."""
    seconds_to_first_row: float | None
    seconds_total: float
    report: str
    """Logins per hour."""
    quality_report: str
    """The service-quality report of the last 24 h (``tally report``)."""


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
    logged_before = log_path.stat().st_size if log_path.exists() else 0
    try:
        with interrupts_deferred():  # the worker is under the finally below before any raise
            worker = spawn_child(
                [sys.executable, "-m", "deploy.cli", "worker"], log_path=log_path, env=env
            )
        log.info("stream worker started (pid %d, log %s)", worker.pid, log_path)
        # The caller goes on once the worker has its partitions and has recovered its
        # tables. (Its log says so at INFO: a quieter log level skips the wait.)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        logs_ready = logging.getLevelName(settings.log_level.upper()) <= logging.INFO
        while logs_ready and WORKER_READY not in _log_since(log_path, logged_before):
            raise_if_interrupted()
            check_worker(worker, settings)
            if time.monotonic() > deadline:
                raise StageFailed(f"the stream worker was not ready within "
                                  f"{WORKER_READY_TIMEOUT_S:.0f} s; see {log_path}")  # fmt: skip
            time.sleep(0.1)  # polling the worker's log against the deadline
        yield worker
    finally:
        if worker is not None:
            stop_child(worker, timeout_s=WORKER_STOP_TIMEOUT_S)


@dataclass(frozen=True)
class RunCollector:
    """The run's own collector: its process, its address, and the write key of each app."""

    process: subprocess.Popen[bytes]
    endpoint: str
    keys: dict[str, str]


def run_collector_environ(settings: Settings, bootstrap: str) -> dict[str, str]:
    """The collector's settings for a run: the run's own app registry, trust in the loopback
    "proxy" in front of the synthetic clients, and no rate limit on that one proxy."""
    return {
        **os.environ,
        **settings_environ(settings),
        "TALLY_KAFKA_BOOTSTRAP": bootstrap,
        "TALLY_COLLECTOR_APPS_FILE": str(run_apps_file(settings)),
        "TALLY_COLLECTOR_TRUSTED_PROXIES": "127.0.0.1/32,::1/128",
    }


def run_apps_file(settings: Settings) -> Path:
    return settings.state_dir / "run" / "run-apps.json"


@contextlib.contextmanager
def collector_process(settings: Settings, bootstrap: str) -> Iterator[RunCollector]:
    """The HTTP collector in a child process, with the workload's apps registered afresh,
    yielded once it answers ready (Kafka reachable); stopped on exit."""
    apps_file = run_apps_file(settings)
    apps_file.unlink(missing_ok=True)
    keys = {
        app_id: register_app(apps_file, app_id, WORKLOAD_ORIGINS[kind]).write_key
        for kind, app_id in APP_IDS.items()
    }
    log_path = settings.state_dir / "logs" / "collector.log"
    collector: subprocess.Popen[bytes] | None = None
    try:
        with interrupts_deferred():
            collector = spawn_child(
                [sys.executable, "-m", "deploy.cli", "collector"],
                log_path=log_path,
                env=run_collector_environ(settings, bootstrap),
            )
        endpoint = f"http://{settings.collector_host}:{settings.collector_port}"
        wait_until_ready(collector, endpoint, log_path)
        log.info("collector ready at %s (pid %d, log %s)", endpoint, collector.pid, log_path)
        yield RunCollector(collector, endpoint, keys)
    finally:
        if collector is not None:
            stop_child(collector, timeout_s=COLLECTOR_STOP_TIMEOUT_S)


def wait_until_ready(collector: subprocess.Popen[bytes], endpoint: str, log_path: Path) -> None:
    """Poll ``/readyz`` until it answers 200; StageFailed if the collector exits or the
    deadline passes first."""
    deadline = time.monotonic() + COLLECTOR_READY_TIMEOUT_S
    while True:
        raise_if_interrupted()
        check_collector(collector, log_path)
        try:
            with urllib.request.urlopen(f"{endpoint}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass  # not listening yet, or 503 until Kafka answers
        if time.monotonic() > deadline:
            raise StageFailed(f"the collector was not ready within 60 s; see {log_path}")
        time.sleep(0.2)  # polling readiness against the deadline


def collector_accepted_events(endpoint: str) -> int:
    """The events the collector has accepted since it started, from its /metrics."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as answer:
        families = text_string_to_metric_families(answer.read().decode())
    for family in families:
        if family.name == "tally_collector_events_accepted":
            return int(
                sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
            )
    return 0


def check_collector(collector: subprocess.Popen[bytes], log_path: Path) -> None:
    """Raise StageFailed if the collector has exited."""
    code = collector.poll()
    if code is not None:
        raise StageFailed(f"the collector exited with status {code}; see {log_path}")


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


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log_file:
            log_file.seek(offset)
            return log_file.read().decode("utf-8", "replace")
    except OSError:
        return ""


def check_worker(worker: subprocess.Popen[bytes], settings: Settings) -> None:
    """Raise StageFailed if the stream worker has exited."""
    code = worker.poll()
    if code is not None:
        raise StageFailed(
            f"the stream worker exited with status {code}; see "
            f"{settings.state_dir / 'logs' / 'worker.log'}"
        )


class WorkloadSenders:
    """The replay's senders, as in production: the auth server's Kafka SDK for login
    outcomes, and for the clients the HTTP SDK, one per app and public address (the clients
    behind one address reach the collector through one proxy connection, as behind a NAT).

    A client's address travels only in the proxy's X-Forwarded-For, never in its events.
    """

    def __init__(self, settings: Settings, bootstrap: str, collector: RunCollector) -> None:
        self._collector = collector
        self._http: dict[tuple[str, str | None], TallyHttpClient] = {}
        self.sent_over_http = 0
        self._server = TallyProducer(  # its Kafka client is built in its sender thread
            bootstrap, topic_names(settings), compression_type=settings.kafka_compression_type
        )

    def emit(self, event: Envelope) -> None:
        if sender_of(event) == "server":
            self._server.emit(event)
            return
        key = (event.app_id, event.ip)
        client = self._http.get(key)
        if client is None:
            headers = {"X-Forwarded-For": event.ip} if event.ip else {}
            client = TallyHttpClient(
                self._collector.endpoint, self._collector.keys[event.app_id], headers=headers
            )
            self._http[key] = client
        client.emit(event.model_copy(update={"ip": None}))
        self.sent_over_http += 1

    def flush(self, timeout_s: float) -> bool:
        """Wait until every sender has delivered what it was given; False past the deadline."""
        deadline = time.monotonic() + timeout_s
        senders: list[TallyClient] = [self._server, *self._http.values()]
        return all(s.flush(max(deadline - time.monotonic(), 0.1)) for s in senders)

    def close(self) -> None:
        for sender in [self._server, *self._http.values()]:
            sender.close(timeout_s=0)


def replay_settings(settings: Settings) -> Settings:
    """The worker's settings for a replay: hours of client time arrive within seconds, as a
    backfill does, so the allowed lateness covers the whole span (else sessions that began
    hours "ago" would be refused as too late)."""
    span_s = WORKLOAD_SPAN_MS / 1000
    return replace(settings, allowed_lateness_s=max(settings.allowed_lateness_s, span_s + 3600))


def replay_workload(
    settings: Settings,
    bootstrap: str,
    collector: RunCollector,
    check_stages: Callable[[], None] = lambda: None,
) -> tuple[int, int]:
    """Send the seeded workload through the real ways in, paced over ``workload_duration_s``,
    with a progress bar; ``check_stages`` runs while it waits, so a failed stage stops the
    replay. Returns the events sent, and how many of them went over HTTP."""
    events = generate_workload(
        seed=settings.workload_seed,
        clients=settings.workload_clients,
        events=settings.workload_events,
        end_ms=int(time.time() * 1000),
        span_ms=WORKLOAD_SPAN_MS,
    )
    senders = WorkloadSenders(settings, bootstrap, collector)
    started = time.monotonic()
    pace = settings.workload_duration_s / len(events)
    log.info("replaying %d events over %.0f s", len(events), settings.workload_duration_s)
    try:
        progress = tqdm(events, desc="events", unit="ev", file=sys.stderr, disable=None)
        for n, event in enumerate(progress):
            raise_if_interrupted()
            senders.emit(event)
            ahead = started + n * pace - time.monotonic()
            if ahead > 0:
                check_stages()
                time.sleep(ahead)  # pacing the replay, not synchronizing
        deadline = time.monotonic() + REPLAY_FLUSH_TIMEOUT_S
        while not senders.flush(0.5):
            check_stages()
            if time.monotonic() > deadline:
                raise StageFailed("the collector and Kafka did not take the workload in time")
    finally:
        senders.close()
    return len(events), senders.sent_over_http


def run_pipeline(settings: Settings, *, drain_timeout_s: float = 180.0) -> RunSummary:
    """Run the whole pipeline once; see the module docstring.

    Raises StageFailed when the worker or the sink stops on its own. Whatever happens,
    everything started here is stopped in order: worker, sink, broker, ClickHouse.
    """
    t0 = time.time()
    with contextlib.closing(open_backend(settings)) as backend:
        apply_migrations(backend, settings.analyst_min_users)
        with contextlib.ExitStack() as stages:
            bootstrap = stages.enter_context(kafka_for(settings))
            ensure_topics(bootstrap, topic_specs(settings))
            with interrupts_deferred():  # kafka-python's bootstrap would swallow an interrupt
                sink = EnrichedSink(sink_config(settings, bootstrap), ClickHouseWriter(backend))
            sinking = stages.enter_context(sink_thread(sink))
            worker = stages.enter_context(stream_worker(replay_settings(settings), bootstrap))
            collector = stages.enter_context(collector_process(settings, bootstrap))

            def check_stages() -> None:
                raise_if_interrupted()
                check_worker(worker, settings)
                check_collector(collector.process, settings.state_dir / "logs" / "collector.log")
                sinking.check()

            sent, over_http = replay_workload(settings, bootstrap, collector, check_stages)
            accepted = collector_accepted_events(collector.endpoint)
            deadline = time.monotonic() + drain_timeout_s
            while sink.event_rows_written < sent and time.monotonic() < deadline:
                check_stages()
                time.sleep(0.2)  # polling the sink's count against the deadline
            if sink.event_rows_written < sent:
                log.warning(
                    "only %d of %d events reached ClickHouse before the deadline",
                    sink.event_rows_written,
                    sent,
                )
        report = format_logins_per_hour(logins_per_hour(backend))
        quality = format_report(quality_report(backend, datetime.now(UTC)))
    first = sink.first_write_at - t0 if sink.first_write_at else None
    return RunSummary(
        sent, sink.event_rows_written, over_http, accepted, first, time.time() - t0, report,
        quality,
    )  # fmt: skip
