"""Starting, watching and stopping a child process: the one home for pid files, locks,
process-group signals, waits and log tails.

Two kinds of child. One the command holds while it runs (:func:`spawn_child`, :func:`stop_child`:
a ``Popen``, such as a Tally service under the supervisor). And a detached service that
outlives the command, such as the Kafka broker or the ClickHouse server
(:func:`launch_detached`, :func:`service_pid`, :func:`stop_service`): no ``Popen`` is kept, and
any later command finds it again by its pid file and a marker in its /proc command line, so a
pid reused after a crash is never taken for it.

Every child runs in a session (and process group) of its own, so a terminal's Ctrl-C reaches
only the command, which then stops its children in order, and a stop reaches a child's own
children too. Every start holds SIGINT and SIGTERM (``deploy.interrupts``) while the child is
created.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.interrupts import interrupts_deferred

_log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.05
KILL_WAIT_S = 10.0
# What Popen's restore_signals resets: Python ignores these, and an ignored signal stays
# ignored across exec.
_DEFAULT_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ)
# posix_spawn cannot change directory: a shell does, then becomes the service (same pid). Its
# own command line holds every argument of the service's, so markers match from the start.
_IN_DIRECTORY = 'cd -- "$0" && exec "$@"'


class ProcessStopError(RuntimeError):
    """A child survived SIGKILL (for instance stuck in uninterruptible I/O)."""


def spawn_child(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdin from /dev/null, stdout and stderr appended to
    ``log_path``.

    Interrupts are held while the child starts. Called inside the caller's own
    ``interrupts_deferred`` block (which should also register the child's cleanup), an
    interrupt is raised when that block ends, with the child in the caller's hands; called
    bare, an interrupt stops the new child before it is raised, so none is orphaned.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child = None
    try:
        with interrupts_deferred(), log_path.open("ab") as log:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )
    except BaseException:
        if child is not None:
            stop_child(child, timeout_s=KILL_WAIT_S)
        raise
    return child


def stop_child(child: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM the child's process group, SIGKILL it after ``timeout_s``; returns the child's
    exit status. Anything left in its group afterwards is killed too."""
    if child.poll() is None:
        signal_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(child.pid, signal.SIGKILL)
            try:
                child.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired as timeout:
                raise ProcessStopError(f"pid {child.pid} survived SIGKILL") from timeout
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # a grandchild left in the group
    return int(child.returncode)


def signal_group(pid: int, signum: signal.Signals) -> None:
    """Signal ``pid``'s process group if it leads one, else ``pid`` alone; a gone process is
    not an error."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def exit_code(pid: int) -> int | None:
    """None while ``pid`` runs; its exit status once gone (reaped here if it is our child),
    or -1 when it was not our child and its status is unknown."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if process_exists(pid) else -1
    return os.waitstatus_to_exitcode(status) if reaped == pid else None


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def command_line(pid: int) -> list[bytes]:
    """The argv of ``pid`` as /proc shows it; empty when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Poll until ``pid`` is gone; returns whether it went within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while exit_code(pid) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)
    return True


def terminate_group(
    pid: int,
    timeout_s: float,
    *,
    name: str = "process",
    error: type[ProcessStopError] = ProcessStopError,
) -> None:
    """SIGTERM ``pid``'s group, SIGKILL after ``timeout_s`` (logged), and once ``pid`` is gone
    SIGKILL anything left in its group; raises ``error`` if ``pid`` survives SIGKILL."""
    signal_group(pid, signal.SIGTERM)
    if not wait_for_exit(pid, timeout_s):
        _log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout_s)
        signal_group(pid, signal.SIGKILL)
        if not wait_for_exit(pid, KILL_WAIT_S):
            raise error(f"{name} (pid {pid}) is still running after SIGKILL")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # a grandchild left in the group


def launch_detached(
    argv: Sequence[str],
    *,
    pid_file: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` as a service that outlives this command and return its pid, also
    written to ``pid_file``; stdin from /dev/null, stdout and stderr appended to ``log_path``.

    posix_spawn rather than Popen: no Popen object is left to warn that the service still
    runs, or to reap it behind :func:`exit_code`'s back. Interrupts are held while it starts,
    and one that arrives kills the service before it is raised; a caller that assigns the pid
    inside its own ``interrupts_deferred`` block gets the interrupt there instead, pid in hand,
    and stops the service itself.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = list(argv) if cwd is None else ["/bin/sh", "-c", _IN_DIRECTORY, str(cwd), *argv]
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
        *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()),
    ]
    pid = None
    try:
        with interrupts_deferred():
            pid = os.posix_spawnp(
                argv[0],
                argv,
                dict(os.environ if env is None else env),
                file_actions=actions,
                setsid=True,
                setsigdef=_DEFAULT_IN_CHILD,
            )
            write_atomically(pid_file, f"{pid}\n")
    except BaseException:
        if pid is not None:
            signal_group(pid, signal.SIGKILL)
            wait_for_exit(pid, KILL_WAIT_S)
            pid_file.unlink(missing_ok=True)
        raise
    return pid


def _inheritable_fds() -> list[int]:
    """Descriptors above stderr that a child would inherit (C libraries may open them without
    O_CLOEXEC): Popen closes them in the child, posix_spawn must be told to."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if int(name) > 2 and os.get_inheritable(int(name)):
                fds.append(int(name))
    return fds


def service_pid(pid_file: Path, markers: Sequence[str]) -> int | None:
    """The pid in ``pid_file`` if that process is alive and every marker is a whole argument
    of its command line; None otherwise. A live process whose command line cannot be read is
    trusted. Reaps the service if it is this process's child and has exited."""
    pid = read_pid(pid_file)
    if pid is None or exit_code(pid) is not None:
        return None
    argv = command_line(pid)
    if argv and not all(marker.encode() in argv for marker in markers):
        return None
    return pid


def stop_service(
    pid_file: Path,
    markers: Sequence[str],
    *,
    timeout_s: float,
    name: str,
    error: type[ProcessStopError] = ProcessStopError,
) -> int | None:
    """Stop the service that ``pid_file`` and ``markers`` name (see :func:`service_pid`) with
    :func:`terminate_group`, and remove its pid file; returns the pid it stopped, or None when
    none was running. Blocks until the service is gone; raises ``error`` if it survives
    SIGKILL. The caller holds the service's lock."""
    pid = service_pid(pid_file, markers)
    if pid is not None:
        terminate_group(pid, timeout_s, name=name, error=error)
    pid_file.unlink(missing_ok=True)
    return pid


def read_pid(pid_file: Path) -> int | None:
    """The pid ``pid_file`` holds; None when it is missing or holds no pid (0 or a negative
    number would name a whole process group to waitpid and kill)."""
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` whole, so a reader never sees half a file."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` non-empty lines of a log, indented under its name; '' if none."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = [line[:300] for line in text.splitlines() if line.strip()][-lines:]
    if not tail:
        return ""
    return f"\n  last lines of {path.name}:\n  " + "\n  ".join(tail)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes (a CLI, pytest workers, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
