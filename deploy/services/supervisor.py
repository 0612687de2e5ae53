"""The supervisor of ``tally up``: keeps a few child processes running, restarts one that dies
with backoff, gives up on one that keeps dying, and stops them all in order.

It knows nothing of Kafka or ClickHouse: a child is an argv, an environment and a log file.
In production systemd (or Kubernetes) supervises each service instead (deploy/systemd/).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from deploy.interrupts import interrupts_deferred
from deploy.services.process import spawn_child, stop_child, write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """How a child that dies is restarted, and when the supervisor gives up on it."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    """More restarts than this within ``window_s`` is a crash loop: the supervisor stops."""
    window_s: float = 60.0
    healthy_after_s: float = 30.0
    """A child that ran this long before dying starts again from the initial backoff."""


DEFAULT_RESTART_POLICY = RestartPolicy()


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    stop_timeout_s: float = 30.0


class CrashLoop(RuntimeError):
    """A child died more often than the restart policy allows; the message is one line."""


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    backoff_s: float = 0.0
    last_status: int | None = None
    deaths: deque[float] = field(default_factory=deque)


class Supervisor:
    """Runs children in the given order and stops them in the reverse order.

    Use as a context manager: leaving it stops every child (SIGTERM to its group, SIGKILL
    after the child's stop timeout), whatever ended the block. ``watch`` polls; it is meant to
    be called in a loop by the owner, which also handles signals. ``state_file`` (JSON) is
    rewritten whenever a child starts or dies, for ``tally status``.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        policy: RestartPolicy = DEFAULT_RESTART_POLICY,
        state_file: Path | None = None,
    ) -> None:
        self.policy = policy
        self.state_file = state_file
        self.started_at = time.time()
        self._children = [_Child(spec) for spec in specs]

    def __enter__(self) -> Supervisor:
        try:
            for child in self._children:
                self._start(child)
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    def pid(self, name: str) -> int | None:
        """The pid of the named child while it runs."""
        for child in self._children:
            if child.spec.name == name and child.process and child.process.poll() is None:
                return child.process.pid
        return None

    def watch(self) -> None:
        """Restart children that died once their backoff has passed. Raises CrashLoop when
        one died more than ``max_restarts`` times within ``window_s``."""
        now = time.monotonic()
        for child in self._children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.restarts += 1
                    self._start(child)
                continue
            if child.process is None or child.process.poll() is None:
                continue
            self._died(child, now)

    def stop_all(self) -> None:
        """Stop every child, last started first."""
        for child in reversed(self._children):
            child.restart_at = None
            if child.process is not None and child.process.poll() is None:
                status = stop_child(child.process, child.spec.stop_timeout_s)
                log.info("stopped %s (exit status %d)", child.spec.name, status)
        self._write_state(stopping=True)

    def _start(self, child: _Child) -> None:
        with interrupts_deferred():  # the child is ours before an interrupt is raised
            child.process = spawn_child(
                child.spec.argv, log_path=child.spec.log_path, env=child.spec.env
            )
        child.started_at = time.monotonic()
        log.info(
            "started %s (pid %d, log %s)", child.spec.name, child.process.pid, child.spec.log_path
        )
        self._write_state()

    def _died(self, child: _Child, now: float) -> None:
        assert child.process is not None
        status = child.process.returncode
        child.last_status = status
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > self.policy.window_s:
            child.deaths.popleft()
        if len(child.deaths) > self.policy.max_restarts:
            self._write_state()
            raise CrashLoop(
                f"{child.spec.name} died {len(child.deaths)} times within "
                f"{self.policy.window_s:.0f} s (last exit status {status}); "
                f"see {child.spec.log_path}"
            )
        if now - child.started_at >= self.policy.healthy_after_s:
            child.backoff_s = self.policy.initial_backoff_s
        else:
            child.backoff_s = min(
                max(child.backoff_s * 2, self.policy.initial_backoff_s), self.policy.max_backoff_s
            )
        child.restart_at = now + child.backoff_s
        log.warning(
            "%s (pid %d) exited with status %d; restarting in %.1f s; see %s",
            child.spec.name,
            child.process.pid,
            status,
            child.backoff_s,
            child.spec.log_path,
        )
        self._write_state()

    def _write_state(self, *, stopping: bool = False) -> None:
        if self.state_file is None:
            return
        now_mono, now = time.monotonic(), time.time()
        children: dict[str, Any] = {}
        for child in self._children:
            running = child.process is not None and child.process.poll() is None
            children[child.spec.name] = {
                "pid": child.process.pid if running and child.process else None,
                "running": running,
                "started_at": now - (now_mono - child.started_at) if running else None,
                "restarts": child.restarts,
                "last_exit_status": child.last_status,
                "log": str(child.spec.log_path),
            }
        state = {
            "supervisor_pid": os.getpid(),
            "started_at": self.started_at,
            "stopping": stopping,
            "children": children,
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_file, orjson.dumps(state, option=orjson.OPT_INDENT_2).decode())
