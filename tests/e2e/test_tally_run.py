"""`tally run`, the main job, as a user runs it from the command line: its report, what it
leaves behind (nothing), what it prints (no raw value, even at DEBUG), and how it stops on
Ctrl-C, SIGTERM or a failed stage."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from deploy.run import WORKLOAD_SPAN_MS
from producers.workload import generate_workload, sender_of
from tests.e2e.commands import as_from_a_terminal, processes_under, tally_environ

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

RUN_TIMEOUT_S = 240
STOP_DEADLINE_S = 60
CLIENTS = 300
END_MS = 1_800_000_000_000  # the counts of a seeded workload do not depend on when it ends


def _tally_run(env: dict, events: int, seed: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "deploy.cli", "run", "--events", str(events),
               "--clients", str(CLIENTS), "--duration", "3", "--seed", str(seed)]  # fmt: skip
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )


def _logins(events: int, seed: int) -> tuple[int, int]:
    """Logins and failed logins in the seeded workload: the run must report exactly these."""
    workload = generate_workload(
        seed=seed, clients=CLIENTS, events=events, end_ms=END_MS, span_ms=WORKLOAD_SPAN_MS
    )
    logins = [e for e in workload if e.event_type == "login"]
    return len(logins), sum(1 for e in logins if getattr(e, "outcome", "") == "failure")


def _ways_in(events: int, seed: int) -> tuple[int, int]:
    """The workload's client events (sent over HTTP) and server events (through Kafka)."""
    workload = generate_workload(
        seed=seed, clients=CLIENTS, events=events, end_ms=END_MS, span_ms=WORKLOAD_SPAN_MS
    )
    over_http = sum(1 for e in workload if sender_of(e) == "client")
    return over_http, len(workload) - over_http


def _raw_values(events: int, seed: int) -> set[str]:
    """The raw ids, IPs and referrer paths of the seeded workload."""
    workload = generate_workload(
        seed=seed, clients=CLIENTS, events=events, end_ms=END_MS, span_ms=WORKLOAD_SPAN_MS
    )
    values = {e.user_id for e in workload if e.user_id} | {e.ip for e in workload if e.ip}
    values |= {e.session_id for e in workload if e.session_id}
    values |= {"/blog/post", "id=7", "/a/b", "q=video"}
    return values


def _report(stdout: str) -> tuple[list[tuple[datetime, int, int]], int, int]:
    """The hour rows and the total line of the printed report."""
    hours = [
        (datetime.strptime(hour, "%Y-%m-%d %H:%M"), int(logins), int(failed))
        for hour, logins, failed in re.findall(
            r"^(\d{4}-\d\d-\d\d \d\d:00)\s+(\d+)\s+(\d+)", stdout, re.MULTILINE
        )
    ]
    total = re.search(r"^total\s+(\d+)\s+(\d+)$", stdout, re.MULTILINE)
    assert total, stdout
    return hours, int(total.group(1)), int(total.group(2))


def test_tally_run_twice_reports_exact_counts_and_leaves_nothing(state_dir: Path):
    """The first run fetches the broker jars and reports every hour from the first login to
    the last with exactly the workload's logins; a second run (another seed, at DEBUG) reuses
    the jars untouched and adds exactly its own logins; neither prints a raw value nor
    leaves a process."""
    jars = state_dir / "kafka-jars"
    first = _tally_run(tally_environ(state_dir, jars_dir=None), 300, seed=1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fetched Kafka broker jars" in first.stderr
    assert "Logins per hour, read back from ClickHouse" in first.stdout
    assert "Service quality" in first.stdout and "call quality" in first.stdout
    hours, total, failed = _report(first.stdout)
    assert (total, failed) == _logins(300, seed=1)
    assert sum(n for _, n, _ in hours) == total
    assert [h for h, _, _ in hours] == [
        hours[0][0] + timedelta(hours=n) for n in range(len(hours))
    ], "hours are missing from the report"
    assert "300 events sent, 300 rows written" in first.stdout
    ways_in = re.search(
        r"ways in: (\d+) client events over HTTP \(the collector accepted (\d+)\), (\d+) server "
        r"events through the Kafka SDK",
        first.stdout,
    )
    assert ways_in, first.stdout
    over_http, accepted, over_kafka = map(int, ways_in.groups())
    assert (over_http, over_kafka) == _ways_in(300, seed=1)
    assert accepted >= over_http, "the collector did not accept every client event"
    first_row = re.search(r"first row after ([0-9.]+) s", first.stdout)
    assert first_row, first.stdout
    print(f"tally run: first row in ClickHouse after {first_row.group(1)} s")
    assert not processes_under(state_dir)
    kafka_jar = next(jars.glob("kafka_2.13-*.jar"))
    fetched_at = kafka_jar.stat().st_mtime_ns

    second = _tally_run(
        tally_environ(state_dir, jars_dir=None, TALLY_LOG_LEVEL="DEBUG"), 200, seed=2
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing cached Kafka broker jars" in second.stderr
    assert kafka_jar.stat().st_mtime_ns == fetched_at
    assert _report(second.stdout)[1] == total + _logins(200, seed=2)[0]
    assert not processes_under(state_dir)

    worker_log = (state_dir / "logs" / "worker.log").read_text()
    assert "DEBUG sinks.consumer" in second.stderr and "[DEBUG]" in worker_log, "not at DEBUG"
    printed = first.stdout + first.stderr + second.stdout + second.stderr + worker_log
    leaked = {v for v in _raw_values(300, 1) | _raw_values(200, 2) if v in printed}
    assert not leaked, f"raw values in tally run's output or logs: {sorted(leaked)[:5]}"


def _start_run(state_dir: Path, seed: int = 42) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "deploy.cli", "run", "--events", "5000", "--duration",
               "120", "--seed", str(seed)]  # fmt: skip
    return subprocess.Popen(
        command, env=tally_environ(state_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, preexec_fn=as_from_a_terminal,
    )  # fmt: skip


def _read_until(run: subprocess.Popen[str], marker: str) -> str:
    """Output up to and including the first line holding ``marker`` (the run's own timeout
    bounds the wait: the pipe ends when the process does)."""
    assert run.stdout is not None
    seen = []
    for line in run.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never printed:\n{''.join(seen)[-3000:]}")


def _stop_and_check(run: subprocess.Popen[str], state_dir: Path, signum: int) -> str:
    """Signal the run, then require it to exit by the deadline having stopped everything."""
    run.send_signal(signum)
    try:
        rest = run.communicate(timeout=STOP_DEADLINE_S)[0]
    except subprocess.TimeoutExpired as timeout:
        run.send_signal(signal.SIGUSR1)  # every thread's stack, to see where it hangs
        try:
            rest = run.communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:
            run.kill()
            rest = run.communicate()[0]
        message = f"tally run did not stop within {STOP_DEADLINE_S} s:\n{rest}"
        raise AssertionError(message) from timeout
    left = processes_under(state_dir)
    assert not left, f"left running after {signal.Signals(signum).name}: {left}\n{rest[-2000:]}"
    return rest


@pytest.mark.parametrize("moment", ["worker just started", "mid-replay"])
def test_ctrl_c_stops_everything(state_dir: Path, moment: str):
    """Ctrl-C right after the worker starts, and again in the middle of the replay, stops the
    worker, the sink and the broker, and exits 130 saying so."""
    run = _start_run(state_dir)
    try:
        _read_until(run, "stream worker started")
        if moment == "mid-replay":
            _read_until(run, "replaying 5000 events")
            time.sleep(3)  # the moment under test: three seconds into a two-minute replay
        assert processes_under(state_dir), "nothing was started"
        rest = _stop_and_check(run, state_dir, signal.SIGINT)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, rest[-2000:]
    assert "interrupted; everything started was stopped" in rest


def test_interrupts_at_random_moments_leave_no_process(state_dir: Path):
    """Twenty runs, each sent SIGINT or SIGTERM after a seeded random delay of 0 to 10 s
    (start-up, broker start, worker start, replay), each stop within its deadline and
    leave no process behind."""
    rng = random.Random(20261129)
    for attempt in range(20):
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0, 10)
        run = _start_run(state_dir, seed=attempt)
        try:
            time.sleep(delay)  # the moment of the interrupt is what this test varies
            rest = _stop_and_check(run, state_dir, signum)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        # Before the handlers are installed Python dies of the signal itself; after, it
        # exits 128 + the signal once everything is stopped.
        assert run.returncode in (128 + signum, -signum), (attempt, delay, rest[-2000:])
        if run.returncode == 128 + signum:
            assert "everything started was stopped" in rest


def test_a_dead_worker_stops_the_run_with_a_clear_error(state_dir: Path):
    """If the stream worker dies mid-run, tally run stops everything and says which stage
    failed and where its log is, instead of waiting out its deadline."""
    run = _start_run(state_dir)
    try:
        started = _read_until(run, "stream worker started")
        pid = int(re.search(r"stream worker started \(pid (\d+)", started).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        rest = run.communicate(timeout=STOP_DEADLINE_S)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, rest[-2000:]
    assert "the stream worker exited with status -9" in rest
    assert "worker.log" in rest
    assert not processes_under(state_dir)
