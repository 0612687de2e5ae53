"""`tally run`, the main job, as a user runs it: twice, from the command line."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafka_fixtures import KAFKA_JARS_DIR

RUN_TIMEOUT_S = 240


def _tally_run(state_dir: Path, events: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TALLY_STATE_DIR": str(state_dir),
        "TALLY_KAFKA_JARS_DIR": str(KAFKA_JARS_DIR),
        "TALLY_KAFKA_PORT": "29092",
        "TALLY_KAFKA_CONTROLLER_PORT": "29093",
        "TALLY_SESSION_TIMEOUT_S": "6",
    }
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "run", "--events", str(events), "--duration", "3"],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip


def _total_logins(stdout: str) -> int:
    match = re.search(r"^total\s+(\d+)\s+(\d+)$", stdout, re.MULTILINE)
    assert match, stdout
    return int(match.group(1))


def _processes_under(state_dir: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if str(state_dir) in cmdline or str(state_dir).encode() in environ:
                found.append(cmdline)
    return found


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_tally_run_twice_reuses_jars_and_data(tmp_path: Path):
    """The run ends in a table of non-zero logins per hour and leaves no process; a second
    run reuses the cached jars and adds to the data of the first."""
    state = tmp_path / "state"
    first = _tally_run(state, 300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Logins per hour, read back from ClickHouse" in first.stdout
    hours = re.findall(r"^\d{4}-\d\d-\d\d \d\d:00\s+(\d+)", first.stdout, re.MULTILINE)
    assert hours and all(int(n) > 0 for n in hours)
    assert "300 events sent, 300 rows written" in first.stdout
    first_row = re.search(r"first row after ([0-9.]+) s", first.stdout)
    assert first_row, first.stdout
    print(f"tally run: first row in ClickHouse after {first_row.group(1)} s")
    assert not _processes_under(state)

    second = _tally_run(state, 200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing cached Kafka broker jars" in second.stderr
    assert "fetched Kafka broker jars" not in second.stderr
    assert _total_logins(second.stdout) > _total_logins(first.stdout)
    assert not _processes_under(state)


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_ctrl_c_stops_everything(tmp_path: Path):
    """Ctrl-C in the middle of the replay stops the worker, the sink and the broker."""
    state = tmp_path / "state"
    env = {**os.environ, "TALLY_STATE_DIR": str(state),
           "TALLY_KAFKA_JARS_DIR": str(KAFKA_JARS_DIR), "TALLY_KAFKA_PORT": "29092",
           "TALLY_KAFKA_CONTROLLER_PORT": "29093"}  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "run", "--events", "5000", "--duration", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert run.stdout is not None
    try:
        for line in run.stdout:  # ends when the process does: no deadline needed beyond timeout
            if "stream worker started" in line:
                break
        assert _processes_under(state), "nothing was started"
        run.send_signal(signal.SIGINT)
        rest = run.communicate(timeout=90)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, rest[-2000:]
    assert "interrupted; everything started was stopped" in rest
    assert not _processes_under(state)
