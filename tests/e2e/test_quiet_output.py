"""A normal `tally run` prints no warning, error or traceback: its own broker's group
coordinator is still loading when the sink joins, and the sink waits for it instead of
letting kafka-python log a WARNING per refusal (sinks/consumer.py)."""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafka_fixtures import KAFKA_JARS_DIR
from tests.services import free_ports

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

RUN_TIMEOUT_S = 240
NOISE = (" WARNING ", " ERROR ", "Traceback")


def _environ(state_dir: Path) -> dict[str, str]:
    """The run's settings: its own state folder, broker ports taken free, the shared jars."""
    port, controller_port = free_ports(2)
    return {
        **os.environ,
        "TALLY_STATE_DIR": str(state_dir),
        "TALLY_KAFKA_PORT": str(port),
        "TALLY_KAFKA_CONTROLLER_PORT": str(controller_port),
        "TALLY_KAFKA_JARS_DIR": str(KAFKA_JARS_DIR),
        "TALLY_SESSION_TIMEOUT_S": "6",
    }


def _kill_leftovers(state_dir: Path) -> None:
    """Leave nothing to the next test, whatever this one found."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                environ = (proc / "environ").read_bytes()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(state_dir).encode() in environ + cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    _kill_leftovers(state)


def test_a_normal_run_prints_no_warning(state_dir: Path) -> None:
    """A run on a broker of its own, started fresh (the offsets topic does not exist yet),
    writes every event and prints no WARNING or ERROR line and no traceback."""
    command = [sys.executable, "-m", "deploy.cli", "run", "--events", "300", "--duration", "3"]
    run = subprocess.run(
        command,
        env=_environ(state_dir),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "300 events sent, 300 rows written" in run.stdout
    noisy = [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "tally run printed:\n" + "\n".join(noisy[:10])
