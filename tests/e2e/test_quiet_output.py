"""A normal `tally run` prints no warning, error or traceback: its own broker's group
coordinator is still loading when the sink joins, and the sink waits for it instead of
letting kafka-python log a WARNING per refusal (sinks/consumer.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.commands import tally_environ

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

RUN_TIMEOUT_S = 240
NOISE = (" WARNING ", " ERROR ", "Traceback")


def test_a_normal_run_prints_no_warning(state_dir: Path) -> None:
    """A run on a broker of its own, started fresh (the offsets topic does not exist yet),
    writes every event and prints no WARNING or ERROR line and no traceback."""
    command = [sys.executable, "-m", "deploy.cli", "run", "--events", "300", "--duration", "3"]
    run = subprocess.run(
        command,
        env=tally_environ(state_dir),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "300 events sent, 300 rows written" in run.stdout
    noisy = [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "tally run printed:\n" + "\n".join(noisy[:10])
