"""`tally up` as an operator runs it: services restarted after a SIGKILL with no event lost or
counted twice, `tally status` and `tally report` while it runs on embedded ClickHouse, an
orderly stop, and nothing left behind at any moment an interrupt arrives."""

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from deploy.services.ports import free_ports
from deploy.settings import Settings, load_settings
from deploy.wiring import open_reader, topic_names
from producers.sdk import TallyProducer
from producers.workload import generate_workload
from schemas.enriched import table_name
from schemas.events import EVENT_TYPES
from sinks.backends import ClickHouseError
from tests.e2e.commands import (
    processes_under,
    start_tally_up,
    stop_and_wait,
    tally_environ,
)
from tests.integration.test_alert_rules import exposed_names, metric_names_in_rules
from tests.sink_records import assert_each_event_once, rollups_differing

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

DEADLINE_S = 120.0
STOP_DEADLINE_S = 60.0


def up_environ(state_dir: Path) -> dict[str, str]:
    """With the worker's and the sink's metrics served, on ports taken free once per folder."""
    ports = state_dir.parent / "metrics-ports"
    if not ports.exists():
        ports.parent.mkdir(parents=True, exist_ok=True)
        ports.write_text(" ".join(map(str, free_ports(2))))
    worker_port, sink_port = ports.read_text().split()
    return tally_environ(
        state_dir, TALLY_SINK_BATCH_INTERVAL_S="0.3", TALLY_WORKER_METRICS_PORT=worker_port,
        TALLY_SINK_METRICS_PORT=sink_port,
    )  # fmt: skip


def scraped_metric_names(settings: Settings) -> set[str]:
    """Every sample name on the collector's, the worker's and the sink's /metrics."""
    names: set[str] = set()
    for port in (settings.collector_port, settings.worker_metrics_port, settings.sink_metrics_port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            names |= exposed_names(page.read().decode())
    return names


def start_up(state_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    return start_tally_up(state_dir, up_environ(state_dir))


def poll(condition: Callable[[], bool], what: str, up: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert up.poll() is None, f"tally up exited with {up.returncode} waiting until {what}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def service_pid(state_dir: Path, name: str) -> int | None:
    try:
        state = orjson.loads((state_dir / "run" / "up.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    child = state["children"].get(name, {})
    return child.get("pid") if child.get("running") else None


def stored(settings: Settings) -> tuple[int, int] | None:
    """(rows, distinct event ids) over every table, counted without FINAL, through the sink;
    None while the sink does not answer."""
    try:
        backend = open_reader(settings)
    except ClickHouseError:
        return None
    try:
        rows = distinct = 0
        for event_type in EVENT_TYPES:
            count, unique = backend.query(
                f"SELECT count(), uniqExact(event_id) FROM {table_name(event_type)}"
            )[0]
            rows, distinct = rows + count, distinct + unique
        return rows, distinct
    except ClickHouseError:
        return None
    finally:
        backend.close()


def rollups_match(settings: Settings) -> bool:
    """Whether every table holds each event once and every rollup equals a recomputation
    from the event-level rows; False while the sink does not answer."""
    try:
        backend = open_reader(settings)
    except ClickHouseError:
        return False
    try:
        assert_each_event_once(backend)
        return not rollups_differing(backend)
    except ClickHouseError:
        return False
    finally:
        backend.close()


def tally(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], env=up_environ(state_dir),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_services_restart_after_sigkill_and_every_event_lands_once(state_dir: Path):
    """SIGKILL the worker, then the sink, while events flow: both come back, every event sent
    is in ClickHouse exactly once (count = distinct ids = sent, without FINAL), status and
    report work meanwhile, and SIGTERM stops worker, sink and broker in that order."""
    up, output = start_up(state_dir)
    settings = load_settings(up_environ(state_dir))
    try:
        poll(lambda: "tally up: running" in output.read_text(), "it runs", up)
        bootstrap = f"127.0.0.1:{settings.kafka_port}"
        events = generate_workload(
            seed=7, clients=200, events=1500, end_ms=int(time.time() * 1000), span_ms=1_200_000
        )  # 20 minutes of client time: within the allowed lateness, however slow the restarts
        producer = TallyProducer(bootstrap, topic_names(settings))
        sent = 0
        for name in ("worker", "sink", None):
            for event in events[sent : sent + 500]:
                producer.emit(event)
            producer.flush(timeout_s=30)
            sent += 500
            poll(
                lambda s=sent: (stored(settings) or (0, 0))[1] >= s - 250, f"{sent - 250} rows", up
            )
            if name is None:
                break
            victim = service_pid(state_dir, name)
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            poll(lambda n=name, v=victim: service_pid(state_dir, n) not in (None, v),
                 f"{name} is restarted", up)  # fmt: skip
        producer.close()
        poll(lambda: stored(settings) == (sent, sent), f"exactly {sent} rows", up)
        # Summaries still come as sessions time out: compare once a moment is consistent.
        poll(lambda: rollups_match(settings), "every rollup equals its recomputation", up)

        status = tally(state_dir, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        shown = orjson.loads(status.stdout)
        restarts = {s["name"]: s["restarts"] for s in shown["services"]}
        assert restarts == {"sink": 1, "worker": 1, "collector": 0, "dashboard": 0}
        sessions = {e.session_id for e in events[:sent] if e.session_id}
        assert shown["rows"].pop("session_summary_events") <= len(sessions)
        assert sum(shown["rows"].values()) == sent
        report = tally(state_dir, "report")
        assert report.returncode == 0 and "total" in report.stdout, report.stderr
        unexposed = metric_names_in_rules() - scraped_metric_names(settings)
        assert not unexposed, f"alerts.yml names metrics no stage exposes: {unexposed}"
        assert "Service quality" in report.stdout and "sessions" in report.stdout
        as_json = tally(state_dir, "report", "--format", "json")
        assert orjson.loads(as_json.stdout)["now"]["logins"] > 0, as_json.stderr
    finally:
        stop_and_wait(up, signal.SIGTERM, STOP_DEADLINE_S)
    log = output.read_text()
    assert up.returncode == 0, log[-3000:]
    stops = [log.index(line) for line in ("stopped worker", "stopped sink", "stopped Kafka")]
    assert stops == sorted(stops), log[-3000:]
    assert not processes_under(state_dir)
    after = tally(state_dir, "status")
    assert after.returncode == 1 and "tally up is not running" in after.stdout


def test_interrupts_at_random_moments_leave_no_process(state_dir: Path):
    """Ten runs of `tally up`, each sent SIGINT or SIGTERM after a seeded random delay of 0 to
    14 s (start-up, steady state), half of them signalled again during the stop: each stops
    by its deadline and leaves no process."""
    rng = random.Random(1129)
    for attempt in range(10):
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay, again = rng.uniform(0, 14), rng.random() < 0.5
        up, output = start_up(state_dir)
        try:
            time.sleep(delay)  # the moment of the interrupt is what this test varies
            up.send_signal(signum)
            if again:
                time.sleep(rng.uniform(0, 1.5))  # a second signal during the stop
                up.send_signal(signal.SIGTERM)
            up.wait(timeout=STOP_DEADLINE_S)
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
        log = output.read_text()
        # 0 once it stopped what it started; 128 + the signal when it came before anything
        # was started; killed by the signal itself before the handlers were installed.
        assert up.returncode in (0, 128 + signum, -signum), (attempt, delay, log[-3000:])
        left = processes_under(state_dir)
        assert not left, (attempt, delay, left, log[-3000:])


def test_migrations_that_cannot_reach_clickhouse_stop_it_with_one_reason(state_dir: Path):
    """The migrations run in a child of `tally up` (so the engine never loads in the
    supervisor); when ClickHouse cannot be reached they fail, and `tally up` exits 1 naming
    the cause, having started nothing."""
    port = free_ports(1)[0]  # nothing listens there
    environ = {**tally_environ(state_dir), "TALLY_CLICKHOUSE_BACKEND": "server",
               "TALLY_CLICKHOUSE_PORT": str(port)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "up"], env=environ, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "tally up: migrations failed" in done.stderr
    assert f"cannot reach ClickHouse at 127.0.0.1:{port}" in done.stderr
    assert not processes_under(state_dir)
