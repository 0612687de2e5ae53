"""`tally bench`: the whole pipeline on this machine, driven through the collector.

It starts `tally up` (its own broker, collector, worker and sink) in a folder of its own, sends
the synthetic workload's event mix through the collector at a target rate or flat out
(producers/load.py), and measures:

- events/s: accepted by the collector, and end to end (until every stage has caught up);
- event-to-queryable latency: a login every 100 ms is a probe, watched in ClickHouse from its
  send time until a query finds it (to within the watch's interval);
- each stage's backlog over time, scraped from the stages' /metrics every second;
- the peak resident memory (VmHWM) of each process;
- a raw Kafka pass-through of as many events, produced and consumed back with kafka-python on
  the same broker in the same run: the baseline the pipeline's rate is a ratio of.

Writes bench.json and bench.png (matplotlib) to the output folder and prints the JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from kafka import KafkaConsumer, KafkaProducer
from tqdm import tqdm

from deploy.dashboard.pipeline import samples
from deploy.kafka import TopicSpec, ensure_topics
from deploy.services.ports import free_ports
from deploy.services.process import spawn_child, stop_child
from deploy.settings import Settings, load_settings, settings_environ
from deploy.up import up_state_file
from deploy.wiring import kafka_jars_dir, open_shared_reader
from producers.collector.apps import register_app
from producers.load import LoadGenerator, Probe, event_templates
from schemas.enriched import table_name
from schemas.events import EVENT_TYPES
from sinks.backends import ClickHouseBackend, ClickHouseError, sql_string

log = logging.getLogger(__name__)

APP: Final = "bench.load"
PROBE_WATCH_INTERVAL_S: Final = 0.2
MONITOR_INTERVAL_S: Final = 1.0
START_DEADLINE_S: Final = 180.0
DRAIN_DEADLINE_S: Final = 300.0
BASELINE_MAX_EVENTS: Final = 300_000
GOALS: Final = {"events_per_s": 20_000, "p99_s_at_5000": 2.0, "peak_rss_mb": 400}


@dataclass(frozen=True)
class BenchOptions:
    rate: float
    """Events/s to offer; 0: as fast as the collector answers."""
    seconds: float
    out_dir: Path
    connections: int = 8
    batch: int = 100
    templates: int = 20_000


@dataclass
class Timeline:
    """What the monitor saw each second: time since the start and each stage's figures."""

    at: list[float] = field(default_factory=list)
    collector_pending: list[float | None] = field(default_factory=list)
    worker_lag: list[float | None] = field(default_factory=list)
    sink_lag: list[float | None] = field(default_factory=list)
    rows_written: list[float | None] = field(default_factory=list)
    enriched: list[float | None] = field(default_factory=list)


def _scrape(url: str) -> dict[str, float] | None:
    """A /metrics page summed by sample name (labels folded), or None if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            text = page.read().decode()
    except OSError:
        return None
    totals: dict[str, float] = {}
    for name, _, value in samples(text):
        totals[name] = totals.get(name, 0.0) + value
    return totals


class Monitor(threading.Thread):
    """Scrapes the collector's, the worker's and the sink's /metrics every second."""

    def __init__(self, settings: Settings, start: float) -> None:
        super().__init__(name="bench-monitor", daemon=True)
        self.timeline = Timeline()
        self.stop = threading.Event()
        self._start = start
        self._urls = {
            "collector": f"http://127.0.0.1:{settings.collector_port}/metrics",
            "worker": f"http://127.0.0.1:{settings.worker_metrics_port}/metrics",
            "sink": f"http://127.0.0.1:{settings.sink_metrics_port}/metrics",
        }
        self.latest: dict[str, dict[str, float] | None] = {}

    def run(self) -> None:
        while not self.stop.wait(MONITOR_INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        seen = {name: _scrape(url) for name, url in self._urls.items()}
        self.latest = seen
        line = self.timeline
        line.at.append(time.monotonic() - self._start)
        line.collector_pending.append(_get(seen["collector"], "tally_collector_pending_events"))
        line.worker_lag.append(_get(seen["worker"], "tally_stream_consumer_lag"))
        line.sink_lag.append(_get(seen["sink"], "tally_sink_consumer_lag"))
        line.rows_written.append(_get(seen["sink"], "tally_sink_rows_written_total"))
        line.enriched.append(_get(seen["worker"], "tally_stream_events_enriched_total"))


def _get(page: dict[str, float] | None, name: str) -> float | None:
    return None if page is None else page.get(name)


class ProbeWatch(threading.Thread):
    """Looks for the probes in ClickHouse every 200 ms and notes when each is found."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="bench-probes", daemon=True)
        self.settings = settings
        self.probes: list[Probe] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def add(self, probe: Probe) -> None:
        with self.lock:
            self.probes.append(probe)

    def outstanding(self) -> list[Probe]:
        with self.lock:
            return [probe for probe in self.probes if probe.seen_s is None]

    def run(self) -> None:
        backend: ClickHouseBackend | None = None
        try:
            while not self.stop.wait(PROBE_WATCH_INTERVAL_S):
                waiting = self.outstanding()[:500]
                if not waiting:
                    continue
                try:
                    backend = backend or open_shared_reader(self.settings)
                    found = self._found(backend, waiting)
                except ClickHouseError:
                    if backend is not None:
                        backend.close()
                    backend = None
                    continue
                now = time.time()
                for probe in waiting:
                    if probe.event_id in found:
                        probe.seen_s = now
        finally:
            if backend is not None:
                backend.close()

    @staticmethod
    def _found(backend: ClickHouseBackend, waiting: list[Probe]) -> set[str]:
        since = int(min(probe.sent_s for probe in waiting)) - 5
        ids = ", ".join(sql_string(probe.event_id) for probe in waiting)
        rows = backend.query(
            f"SELECT toString(event_id) FROM {table_name('login')} "
            f"WHERE event_time >= toDateTime({since}) AND toString(event_id) IN ({ids})"
        )
        return {str(row[0]) for row in rows}


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _process_peaks(settings: Settings, up_pid: int) -> dict[str, float | None]:
    peaks: dict[str, float | None] = {"tally_up": _peak_rss_mb(up_pid)}
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        children = orjson.loads(up_state_file(settings).read_bytes())["children"]
        for name, child in children.items():
            if child.get("pid"):
                peaks[name] = _peak_rss_mb(child["pid"])
    with contextlib.suppress(OSError, ValueError, StopIteration):
        pid_file = next((settings.state_dir / "kafka").rglob("broker.pid"))
        peaks["kafka_broker_jvm"] = _peak_rss_mb(int(pid_file.read_text().split()[0]))
    peaks["load_generator"] = _peak_rss_mb(os.getpid())
    return peaks


def _stored_rows(settings: Settings) -> int | None:
    try:
        backend = open_shared_reader(settings)
    except ClickHouseError:
        return None
    try:
        return sum(
            int(backend.query(f"SELECT count() FROM {table_name(event_type)}")[0][0])
            for event_type in EVENT_TYPES
        )
    except ClickHouseError:
        return None
    finally:
        backend.close()


def kafka_pass_through(bootstrap: str, bodies: list[bytes], per_body: int) -> dict[str, Any]:
    """Produce ``bodies`` of ``per_body`` events each (as the collector frames a request:
    one message) with acks=all and lz4, and consume them all back: the floor for moving these
    events through Kafka on this machine."""
    topic = f"bench.passthrough.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [TopicSpec(topic, 3, None)])
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=f"bench-{uuid.uuid4().hex[:8]}")  # fmt: skip
    consumer.poll(timeout_ms=2000)
    start = time.perf_counter()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             compression_type="lz4")  # fmt: skip
    for body in bodies:
        producer.send(topic, body)
    producer.flush(timeout=120)
    produced = time.perf_counter() - start
    seen = 0
    deadline = time.monotonic() + 120
    while seen < len(bodies) and time.monotonic() < deadline:
        seen += sum(len(batch) for batch in consumer.poll(timeout_ms=500).values())
    elapsed = time.perf_counter() - start
    producer.close()
    consumer.close()
    return {
        "events": len(bodies) * per_body,
        "events_per_message": per_body,
        "consumed": seen * per_body,
        "seconds": round(elapsed, 2),
        "produce_seconds": round(produced, 2),
        "events_per_s": round(seen * per_body / elapsed),
    }


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3)


def bench_environ(settings: Settings, work: Path) -> dict[str, str]:
    """The child `tally up`'s settings: this one's, in a folder of its own, with free ports,
    every stage's metrics served, no dashboard and no per-key rate limit."""
    kafka, controller, collector, worker, sink = free_ports(5)
    overrides = {
        "TALLY_STATE_DIR": str(work / "state"),
        "TALLY_KAFKA_JARS_DIR": str(kafka_jars_dir(settings)),
        "TALLY_KAFKA_PORT": str(kafka), "TALLY_KAFKA_CONTROLLER_PORT": str(controller),
        "TALLY_COLLECTOR_PORT": str(collector), "TALLY_WORKER_METRICS_PORT": str(worker),
        "TALLY_SINK_METRICS_PORT": str(sink), "TALLY_DASHBOARD_PORT": "0",
        "TALLY_COLLECTOR_SECRET_RATE_PER_KEY": "1000000",
        "TALLY_COLLECTOR_SECRET_RATE_BURST": "1000000",
        "TALLY_COLLECTOR_APPS_FILE": str(work / "state" / "apps.json"),
        "TALLY_CLICKHOUSE_DATABASE": f"{settings.clickhouse_database}_bench",
    }  # fmt: skip
    environ = {**os.environ, **settings_environ(settings), **overrides}
    for name in ("TALLY_KAFKA_BOOTSTRAP", "TALLY_HMAC_KEY_FILE", "TALLY_DAILY_KEYS_FILE"):
        environ.pop(name, None)
    return environ


def _wait(condition: Any, what: str, up: Any, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if up.poll() is not None:
            raise RuntimeError(f"tally up exited with {up.returncode} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.2)  # polled against the deadline


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            return bool(page.status == 200)
    except OSError:
        return False


def run_bench(settings: Settings, options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; see the module docstring. Returns what bench.json holds."""
    work = options.out_dir
    work.mkdir(parents=True, exist_ok=True)
    environ = bench_environ(settings, work)
    child_settings = load_settings(environ)
    keys = register_app(child_settings.collector_apps_path, APP, [])
    templates = event_templates(APP, options.templates)
    up = spawn_child([sys.executable, "-m", "deploy.cli", "up"], log_path=work / "up.log",
                     env=environ)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{child_settings.collector_port}"
        _wait(lambda: _answers(f"{base}/readyz"), "the collector is ready", up, START_DEADLINE_S)
        _wait(lambda: _stored_rows(child_settings) is not None, "ClickHouse answers", up,
              START_DEADLINE_S)  # fmt: skip
        result = _measure(child_settings, options, templates, keys.secret_key, up)
        result["processes_peak_rss_mb"] = _process_peaks(child_settings, up.pid)
        bootstrap = f"127.0.0.1:{child_settings.kafka_port}"
        generator = LoadGenerator(templates, batch=options.batch)
        count = min(result["events"]["accepted"], BASELINE_MAX_EVENTS) // options.batch or 10
        bodies = [generator.body(int(time.time() * 1000)) for _ in range(count)]
        result["kafka_pass_through"] = kafka_pass_through(bootstrap, bodies, options.batch)
    finally:
        stop_child(up, timeout_s=120)
    end_to_end = result["events_per_s"]["end_to_end"]
    baseline = result["kafka_pass_through"]["events_per_s"]
    result["ratio_to_kafka_pass_through"] = round(end_to_end / baseline, 3) if baseline else None
    python_peaks = [v for k, v in result["processes_peak_rss_mb"].items()
                    if k != "kafka_broker_jvm" and v is not None]  # fmt: skip
    p99 = result["latency_s"]["p99"]
    result["goals"] = {
        f"end_to_end_events_per_s>={GOALS['events_per_s']}": end_to_end >= GOALS["events_per_s"],
        f"python_peak_rss_mb<{GOALS['peak_rss_mb']}": bool(python_peaks)
        and max(python_peaks) < GOALS["peak_rss_mb"],
        f"p99_s<{GOALS['p99_s_at_5000']} (judged at --rate 5000)": (
            None if options.rate != 5000 or p99 is None else p99 < GOALS["p99_s_at_5000"]
        ),
    }
    (work / "bench.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    from deploy.bench_plot import plot_bench

    plot_bench(result, work / "bench.png")
    result["files"] = {"json": str(work / "bench.json"), "png": str(work / "bench.png")}
    return result


def _measure(
    settings: Settings, options: BenchOptions, templates: Any, key: str, up: Any
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{settings.collector_port}/v1/events"
    generator = LoadGenerator(templates, batch=options.batch)
    start = time.monotonic()
    monitor = Monitor(settings, start)
    watch = ProbeWatch(settings)
    monitor.start()
    watch.start()
    expected = int(options.rate * options.seconds) if options.rate else None
    with tqdm(
        total=expected, unit="ev", unit_scale=True, desc="sending", leave=False, disable=None
    ) as bar:
        stats = asyncio.run(generator.run(
            url, key, rate=options.rate, seconds=options.seconds,
            connections=options.connections, on_probe=watch.add, on_progress=bar.update,
        ))  # fmt: skip
    sent_s = time.monotonic() - start
    stored_before = _stored_rows(settings)

    def caught_up() -> bool:
        latest = monitor.latest
        lags = [_get(latest.get("worker"), "tally_stream_consumer_lag"),
                _get(latest.get("sink"), "tally_sink_consumer_lag"),
                _get(latest.get("collector"), "tally_collector_pending_events")]  # fmt: skip
        return not watch.outstanding() and all(lag == 0 for lag in lags)

    with tqdm(
        total=len(watch.probes), desc="draining (probes found)", leave=False, disable=None
    ) as bar:

        def drained() -> bool:
            bar.n = len(watch.probes) - len(watch.outstanding())
            bar.refresh()
            return caught_up()

        _wait(drained, "every stage caught up", up, DRAIN_DEADLINE_S)
    drained_s = time.monotonic() - start
    monitor.stop.set()
    watch.stop.set()
    monitor.join()
    watch.join()
    latencies = [p.seen_s - p.sent_s for p in watch.probes if p.seen_s is not None]
    rows = _stored_rows(settings)
    return {
        "options": {
            "rate": options.rate,
            "seconds": options.seconds,
            "connections": options.connections,
            "events_per_request": options.batch,
            "backend": settings.clickhouse_backend,
        },
        "events": {
            "sent": stats.sent_events,
            "accepted": stats.accepted_events,
            "refused_requests": stats.refused_requests,
            "failed_requests": stats.failed_requests,
            "rows_stored_at_send_end": stored_before,
            "rows_stored": rows,
        },
        "seconds": {"sending": round(sent_s, 2), "until_caught_up": round(drained_s, 2)},
        "events_per_s": {
            "accepted_by_collector": round(stats.accepted_events / sent_s),
            "end_to_end": round(stats.accepted_events / drained_s),
        },
        "latency_s": {
            "probes": len(watch.probes),
            "found": len(latencies),
            "p50": _percentile(latencies, 0.50),
            "p95": _percentile(latencies, 0.95),
            "p99": _percentile(latencies, 0.99),
            "max": _percentile(latencies, 1.0),
            "resolution_s": PROBE_WATCH_INTERVAL_S,
        },
        "probes": [
            [round(p.sent_s - watch.probes[0].sent_s, 3), round(p.seen_s - p.sent_s, 3)]
            for p in watch.probes
            if p.seen_s is not None
        ],
        "accepted_per_second": [stats.sent_per_second.get(s, 0) for s in range(int(sent_s) + 1)],
        "timeline": monitor.timeline.__dict__,
    }
