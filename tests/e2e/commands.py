"""What the end-to-end tests share: a `tally` command's environment on a state folder of its
own, and the processes started for that folder (to find leftovers, and to kill them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from deploy.services.ports import free_ports
from tests.kafka_fixtures import KAFKA_JARS_DIR


def tally_environ(
    state_dir: Path, *, jars_dir: Path | None = KAFKA_JARS_DIR, **extra: str
) -> dict[str, str]:
    """Settings for a command on ``state_dir``, with broker, collector and dashboard ports
    taken free once per folder (a broker's storage keeps its controller's address, so a folder keeps
    its ports)."""
    ports = state_dir.parent / "ports"
    if not ports.exists():
        ports.parent.mkdir(parents=True, exist_ok=True)
        ports.write_text(" ".join(map(str, free_ports(4))))
    port, controller_port, collector_port, dashboard_port = ports.read_text().split()
    env = {
        **os.environ,
        "TALLY_STATE_DIR": str(state_dir),
        "TALLY_KAFKA_PORT": port,
        "TALLY_KAFKA_CONTROLLER_PORT": controller_port,
        "TALLY_COLLECTOR_PORT": collector_port,
        "TALLY_DASHBOARD_PORT": dashboard_port,
        "TALLY_SESSION_TIMEOUT_S": "6",
        **extra,
    }
    if jars_dir is not None:
        env["TALLY_KAFKA_JARS_DIR"] = str(jars_dir)
    return env


def _started_for(state_dir: Path) -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (str(state_dir) in cmdline or str(state_dir).encode() in environ):
            found.append((int(proc.name), cmdline))
    return found


def processes_under(state_dir: Path) -> list[str]:
    """Command lines of live processes started for this state folder."""
    return [cmdline for _, cmdline in _started_for(state_dir)]


def kill_leftovers(state_dir: Path) -> None:
    """Leave nothing to the next test, whatever this one found."""
    for pid, _ in _started_for(state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def as_from_a_terminal() -> None:
    """For ``preexec_fn``: the child starts with SIGINT and SIGTERM at their default action,
    as from a terminal. A shell's background job (CI's runner, ``nohup``, ``cmd &``) starts
    with SIGINT ignored, and Python keeps it ignored until `tally` installs its handler, so
    a Ctrl-C in that first second would be lost and the test would wait for a stop that
    never comes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_and_wait(process: subprocess.Popen[bytes], signum: int, timeout_s: float) -> None:
    """Send ``signum`` and wait up to ``timeout_s`` for the exit; past that, kill it (and
    the wait's TimeoutExpired fails the test)."""
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_tally_up(
    state_dir: Path, environ: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """`tally up` on ``state_dir`` as from a terminal, its output in a file beside the folder."""
    state_dir.mkdir(parents=True, exist_ok=True)
    output = state_dir.parent / "up.out"
    with output.open("ab") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "up"], env=environ, stdout=out,
            stderr=subprocess.STDOUT, preexec_fn=as_from_a_terminal,
        )  # fmt: skip
    return up, output
