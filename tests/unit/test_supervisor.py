"""The supervisor of `tally up` on real (tiny) child processes: restarts with backoff, gives up
on a crash loop with one line, stops in reverse order, and reports what runs."""

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from deploy.services.process import process_exists
from deploy.services.supervisor import ChildSpec, CrashLoop, RestartPolicy, Supervisor

FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, max_restarts=3, window_s=30)
DEADLINE_S = 20.0


def child(tmp_path: Path, name: str, script: str) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", script], tmp_path / f"{name}.log")


SLEEPER = "import time; print('up', flush=True); time.sleep(600)"


def watch_until(supervisor: Supervisor, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        supervisor.watch()
        time.sleep(0.02)


def test_a_killed_child_is_restarted_and_the_log_line_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A child killed with SIGKILL comes back with a new pid; the warning names the child,
    its exit status and its log file; the state file counts the restart."""
    caplog.set_level(logging.INFO, logger="deploy.services.supervisor")
    state_file = tmp_path / "up.json"
    with Supervisor([child(tmp_path, "worker", SLEEPER)], FAST, state_file) as supervisor:
        first = supervisor.pid("worker")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        watch_until(supervisor, lambda: supervisor.pid("worker") not in (None, first), "restart")
        state = orjson.loads(state_file.read_bytes())
    assert f"worker (pid {first}) exited with status -9; restarting in" in caplog.text
    assert str(tmp_path / "worker.log") in caplog.text
    assert state["children"]["worker"]["restarts"] == 1
    assert state["children"]["worker"]["last_exit_status"] == -9
    assert state["children"]["worker"]["running"] is True


def test_a_child_that_keeps_dying_stops_the_supervisor_with_one_line(tmp_path: Path):
    """A child exiting at once is restarted max_restarts times, then CrashLoop names it, its
    last status and its log, and nothing is left running."""
    sleeper = child(tmp_path, "sink", SLEEPER)
    crasher = child(tmp_path, "worker", "import sys; sys.exit(3)")
    survivor = None
    with pytest.raises(CrashLoop) as caught, Supervisor([sleeper, crasher], FAST) as supervisor:
        survivor = supervisor.pid("sink")
        watch_until(supervisor, lambda: False, "a crash loop")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("worker died 4 times within 30 s (last exit status 3)")
    assert str(tmp_path / "worker.log") in message
    assert survivor is not None and not process_exists(survivor)


def test_backoff_doubles_between_quick_deaths(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Each quick death doubles the wait before the next start, up to the maximum."""
    caplog.set_level(logging.WARNING, logger="deploy.services.supervisor")
    policy = RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, max_restarts=3, window_s=30)
    with pytest.raises(CrashLoop), Supervisor([child(tmp_path, "w", "pass")], policy) as sup:
        watch_until(sup, lambda: False, "a crash loop")
    waits = [m.split("restarting in ")[1].split(" s;")[0] for m in caplog.messages]
    assert waits == ["0.1", "0.2", "0.3"]


def test_children_stop_in_reverse_order_of_start(tmp_path: Path):
    """The last child started is stopped first (the worker before the sink before the broker),
    each by SIGTERM to its group; its log says when it got the signal."""
    stamp = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print(time.monotonic_ns(), flush=True); time.sleep(0.1); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    specs = [child(tmp_path, name, stamp) for name in ("sink", "worker")]
    with Supervisor(specs, FAST) as supervisor:
        for spec in specs:
            watch_until(supervisor, lambda s=spec: "up" in _read(s.log_path), f"{spec.name} runs")
    stopped_at = {s.name: int(_read(s.log_path).split()[-1]) for s in specs}
    assert stopped_at["worker"] < stopped_at["sink"]


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path):
    """A child that ignores SIGTERM is killed after its stop timeout; stop still returns."""
    stubborn = ChildSpec(
        "stubborn",
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('up', flush=True); time.sleep(600)"],
        tmp_path / "stubborn.log",
        stop_timeout_s=0.5,
    )  # fmt: skip
    with Supervisor([stubborn], FAST) as supervisor:
        pid = supervisor.pid("stubborn")
        watch_until(supervisor, lambda: "up" in _read(stubborn.log_path), "it runs")
    assert pid is not None and not process_exists(pid)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
