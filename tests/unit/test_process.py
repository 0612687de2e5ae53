"""The shared way to start, watch and stop a child (deploy/services/process.py), on real
short-lived processes: no service needed."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from deploy import interrupts
from deploy.interrupts import Interrupted
from deploy.services import process
from deploy.services.process import (
    command_line,
    exit_code,
    launch_detached,
    log_tail,
    process_exists,
    read_pid,
    service_pid,
    signal_group,
    spawn_child,
    stop_child,
    stop_service,
)

_WAIT_S = 10.0


def _until(condition: Callable[[], bool], what: str, timeout_s: float = _WAIT_S) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.02)


def _logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.is_file() and text in log.read_text()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Popen children a test starts; whatever a failed test left is stopped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        stop_child(child, timeout_s=1.0)


@pytest.fixture
def service_pids() -> Iterator[list[int]]:
    """Pids of detached services a test starts; whatever a failed test left is killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if exit_code(pid) is None:
            signal_group(pid, signal.SIGKILL)
            _until(lambda pid=pid: exit_code(pid) is not None, f"pid {pid} reaped")


def test_spawn_child_logs_its_output_in_a_session_of_its_own(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """spawn_child appends stdout and stderr to the log and starts the child in a new session."""
    log = tmp_path / "logs" / "child.log"
    child = spawn_child(["sh", "-c", "echo out; echo err >&2; exec sleep 30"], log_path=log)
    children.append(child)

    _until(_logged(log, "err"), "both streams in the log")
    assert os.getsid(child.pid) == child.pid != os.getsid(0)
    assert os.getpgid(child.pid) == child.pid
    assert log.read_text().split() == ["out", "err"]


def test_stop_child_kills_a_child_that_ignores_sigterm(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """A child that ignores SIGTERM is SIGKILLed once the timeout has passed, not later."""
    log = tmp_path / "child.log"
    script = "trap '' TERM; echo ready; while :; do sleep 1; done"
    child = spawn_child(["sh", "-c", script], log_path=log)
    children.append(child)
    _until(_logged(log, "ready"), "the child ignores SIGTERM")

    started = time.monotonic()
    status = stop_child(child, timeout_s=0.5)

    assert status == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 0.5 + 5.0


def test_stop_child_leaves_no_grandchild(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """A grandchild in the child's group is gone after stop_child, though it ignores SIGTERM."""
    log = tmp_path / "child.log"
    script = "(trap '' TERM; exec sleep 300) & echo $!; wait"
    child = spawn_child(["sh", "-c", script], log_path=log)
    children.append(child)
    _until(lambda: log.read_text().strip().isdigit(), "the grandchild's pid in the log")
    grandchild = int(log.read_text())
    _until(lambda: b"sleep" in command_line(grandchild), "the grandchild ignores SIGTERM")

    stop_child(child, timeout_s=5.0)

    _until(lambda: not process_exists(grandchild), "the grandchild is gone")


def test_a_zombie_is_not_alive_and_exit_code_reaps_it(
    tmp_path: Path, service_pids: list[int]
) -> None:
    """A zombie is not alive; exit_code reaps it for its status, then a gone pid's is -1."""
    pid = launch_detached(
        ["sh", "-c", "exit 7"], pid_file=tmp_path / "pid", log_path=tmp_path / "log"
    )
    service_pids.append(pid)
    _until(lambda: _is_zombie(pid), "the child is a zombie")

    assert not process_exists(pid)
    assert exit_code(pid) == 7
    assert not Path(f"/proc/{pid}").exists()
    assert not process_exists(pid)
    assert exit_code(pid) == -1


def test_a_running_process_has_no_exit_code(tmp_path: Path, service_pids: list[int]) -> None:
    """exit_code is None, and process_exists true, for a child and for a non-child alive."""
    pid = launch_detached(["sleep", "30"], pid_file=tmp_path / "pid", log_path=tmp_path / "log")
    service_pids.append(pid)

    assert exit_code(pid) is None and process_exists(pid)
    assert exit_code(os.getppid()) is None and process_exists(os.getppid())


def test_log_tail_shows_the_last_non_empty_lines(tmp_path: Path) -> None:
    """log_tail gives the last five non-empty lines under the log's name, each cut to 300."""
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {n}\n\n" for n in range(10)) + "x" * 400 + "\n   \n")

    tail = log_tail(log)

    assert tail.splitlines() == [
        "",
        "  last lines of server.log:",
        *(f"  line {n}" for n in range(6, 10)),
        "  " + "x" * 300,
    ]
    assert log_tail(tmp_path / "missing.log") == ""
    (tmp_path / "blank.log").write_text("\n  \n")
    assert log_tail(tmp_path / "blank.log") == ""


def test_a_detached_service_is_found_by_its_marker_and_stopped(
    tmp_path: Path, service_pids: list[int]
) -> None:
    """A detached service runs in its own session and folder, found by marker, stopped whole."""
    marker = f"tally-test-{uuid.uuid4().hex}"
    pid_file, log = tmp_path / "service.pid", tmp_path / "logs" / "service.log"
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = "pwd -P; (trap '' TERM; exec sleep 300) & echo $!; wait"
    pid = launch_detached(
        ["sh", "-c", script, marker], pid_file=pid_file, log_path=log, cwd=workdir
    )
    service_pids.append(pid)
    _until(lambda: len(log.read_text().split()) == 2, "the service's directory and child logged")
    directory, sleeper = log.read_text().split()
    _until(lambda: b"sleep" in command_line(int(sleeper)), "its child ignores SIGTERM")

    assert read_pid(pid_file) == pid
    assert os.getsid(pid) == pid != os.getsid(0)
    assert directory == str(workdir.resolve())
    assert service_pid(pid_file, [marker]) == pid
    assert service_pid(pid_file, [marker, "not-an-argument"]) is None

    assert stop_service(pid_file, [marker], timeout_s=5.0, name="test service") == pid
    assert not process_exists(pid)
    _until(lambda: not process_exists(int(sleeper)), "its child is gone")
    assert not pid_file.exists()
    assert stop_service(pid_file, [marker], timeout_s=5.0, name="test service") is None


def test_a_pid_file_naming_no_live_service_is_not_trusted(
    tmp_path: Path, service_pids: list[int]
) -> None:
    """A pid file holding garbage, 0, a gone pid, or another process's pid names no service."""
    pid_file = tmp_path / "service.pid"
    other = launch_detached(["sleep", "30"], pid_file=pid_file, log_path=tmp_path / "log")
    service_pids.append(other)
    assert service_pid(pid_file, ["tally-test-marker"]) is None  # alive, but not the service

    gone = launch_detached(["true"], pid_file=pid_file, log_path=tmp_path / "log")
    service_pids.append(gone)
    _until(lambda: exit_code(gone) is not None, "the process is gone")
    for text in (f"{gone}\n", "0\n", "-1\n", "not a pid\n"):
        pid_file.write_text(text)
        assert service_pid(pid_file, []) is None, text


def test_stop_service_escalates_to_sigkill_and_logs_it(
    tmp_path: Path, service_pids: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """A service that ignores SIGTERM is killed after the timeout, with a warning naming it."""
    marker = f"tally-test-{uuid.uuid4().hex}"
    pid_file, log = tmp_path / "service.pid", tmp_path / "service.log"
    script = "trap '' TERM; echo ready; while :; do sleep 1; done"
    pid = launch_detached(["sh", "-c", script, marker], pid_file=pid_file, log_path=log)
    service_pids.append(pid)
    _until(_logged(log, "ready"), "the service ignores SIGTERM")

    assert stop_service(pid_file, [marker], timeout_s=0.5, name="stubborn service") == pid

    assert not process_exists(pid)
    assert any(
        record.levelno == logging.WARNING
        and record.getMessage().startswith(f"stubborn service (pid {pid}) ignored SIGTERM")
        for record in caplog.records
    )


def test_an_interrupt_while_launching_leaves_no_service(
    tmp_path: Path, handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while a service starts is raised once the service is killed and unrecorded."""
    pid_file = tmp_path / "service.pid"
    launched: list[int] = []
    write_atomically = process.write_atomically

    def write_then_interrupt(path: Path, text: str) -> None:
        launched.append(int(text))
        write_atomically(path, text)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(process, "write_atomically", write_then_interrupt)

    with pytest.raises(Interrupted):
        launch_detached(["sleep", "30"], pid_file=pid_file, log_path=tmp_path / "log")

    (pid,) = launched
    assert not process_exists(pid)
    assert not pid_file.exists()


class _SignallingEnv(Mapping[str, str]):
    """An environment that sends SIGTERM to this process while the child's env is built:
    an interrupt arriving while spawn_child starts the child."""

    def __init__(self) -> None:
        self._env = dict(os.environ)

    def __getitem__(self, key: str) -> str:
        return self._env[key]

    def __len__(self) -> int:
        return len(self._env)

    def __iter__(self) -> Iterator[str]:
        os.kill(os.getpid(), signal.SIGTERM)
        return iter(self._env)


def test_an_interrupt_while_spawning_bare_stops_the_new_child(
    tmp_path: Path, handlers: None
) -> None:
    """Called without an outer deferral, spawn_child stops the child it just started before
    raising the interrupt, so no child is orphaned."""
    marker = f"30.{uuid.uuid4().int % 10**9}"  # a sleep only this test starts
    with pytest.raises(Interrupted):
        spawn_child(["sleep", marker], log_path=tmp_path / "log", env=_SignallingEnv())
    alive = [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and marker.encode() in command_line(int(entry.name))
    ]
    assert alive == []


def test_inside_a_deferral_the_caller_gets_the_child_before_the_interrupt(
    tmp_path: Path, handlers: None, children: list[subprocess.Popen[bytes]]
) -> None:
    """Inside the caller's deferral the child reaches the caller, who registers its cleanup;
    the interrupt is raised when the caller's block ends."""
    env = _SignallingEnv()
    with pytest.raises(Interrupted), interrupts.interrupts_deferred():
        children.append(spawn_child(["sleep", "30"], log_path=tmp_path / "log", env=env))
    (child,) = children
    assert child.poll() is None
