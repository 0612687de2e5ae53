"""Start and stop Debian's ClickHouse server (18.16) for development and CI.

Everything the server writes (data, tmp, user files, format schemas, logs, pid file, rendered
configs) lives under one state folder, so a checkout owns its server and can throw it away.
The server listens on 127.0.0.1 only and runs in UTC. Running it as root needs nothing extra
on 18.16: the check that the data's owner matches the effective user arrived in later releases.

Layout of a state folder::

    config.xml, users.xml        rendered from deploy/clickhouse/
    clickhouse-server.pid        pid of the server (also the id of its process group)
    data/ tmp/ user_files/ format_schemas/
    log/clickhouse-server.log, log/clickhouse-server.err.log, log/stdout.log

Launching, finding, waiting for and stopping the server go through ``deploy.services.process``;
this module keeps what is ClickHouse's own: finding the binary, the rendered configs, the
``tally`` user's password, the readiness probe and its error messages.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

from clickhouse_driver import Client
from clickhouse_driver.errors import Error as DriverError

from deploy.interrupts import interrupts_deferred
from deploy.services.process import (
    KILL_WAIT_S,
    ProcessStopError,
    exit_code,
    file_lock,
    launch_detached,
    log_tail,
    service_pid,
    stop_service,
    terminate_group,
    write_atomically,
)

HOST = "127.0.0.1"
_TEMPLATES = Path(__file__).resolve().parent / "clickhouse"
# Debian installs the server in /usr/sbin, which is not on every user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
_POLL_INTERVAL_S = 0.1
_NAME = "clickhouse-server"
ANALYST_DATABASE = "tally_analyst"
"""The database of the analyst views (`sinks.analyst_views`) beside the default `tally`: the
only one the `analyst` user may read."""


class ClickHouseStartError(RuntimeError):
    """The server could not be started or did not become ready; the message names the log."""


class ClickHouseStopError(ProcessStopError):
    """The server's processes survived SIGKILL (for instance stuck in uninterruptible I/O)."""


@dataclass(frozen=True)
class ClickHouseServer:
    """A running server: where to reach it, and its pid (also its process-group id)."""

    host: str
    tcp_port: int
    http_port: int
    pid: int
    log_path: Path


@dataclass(frozen=True)
class _Layout:
    state_dir: Path

    @property
    def config(self) -> Path:
        return self.state_dir / "config.xml"

    @property
    def users(self) -> Path:
        return self.state_dir / "users.xml"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "clickhouse-server.pid"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / ".lock"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def server_log(self) -> Path:
        return self.log_dir / "clickhouse-server.log"

    @property
    def error_log(self) -> Path:
        return self.log_dir / "clickhouse-server.err.log"

    @property
    def stdout_log(self) -> Path:
        return self.log_dir / "stdout.log"

    def directories(self) -> dict[str, Path]:
        return {
            "data_dir": self.state_dir / "data",
            "tmp_dir": self.state_dir / "tmp",
            "user_files_dir": self.state_dir / "user_files",
            "format_schemas_dir": self.state_dir / "format_schemas",
            "log_dir": self.log_dir,
        }

    def markers(self) -> list[str]:
        """The argument that tells this folder's server from any other process in /proc."""
        return [f"--config-file={self.config}"]


def find_clickhouse_server_command() -> list[str]:
    """Return the argv prefix that runs the server: `clickhouse-server` or `clickhouse server`.

    Raises ClickHouseStartError, saying what to install, when neither is present.
    """
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS])
    for name, *args in (("clickhouse-server",), ("clickhouse", "server")):
        found = shutil.which(name, path=search_path)
        if found is not None:
            return [found, *args]
    raise ClickHouseStartError(
        "clickhouse-server not found (looked on PATH and in /usr/sbin, /usr/bin); "
        "install it with `apt-get install clickhouse-server`"
    )


def running_clickhouse_server(state_dir: Path) -> ClickHouseServer | None:
    """Return the server started from state_dir if it is alive and answers `SELECT 1`."""
    layout = _Layout(state_dir.resolve())
    return _running(layout)


def start_clickhouse_server(
    state_dir: Path,
    *,
    tcp_port: int = 19000,
    http_port: int = 18123,
    timeout_s: float = 60.0,
) -> ClickHouseServer:
    """Start a server whose files all live under state_dir, or reuse the one already there.

    Idempotent: a live server started from state_dir is returned as is (same pid); one still
    starting is waited for. Blocks until the server answers `SELECT 1` on the native port, at
    most timeout_s. The server runs detached in its own process group and outlives this
    process; stop it with stop_clickhouse_server. Raises ClickHouseStartError (one line naming
    the log) if the binary is missing, a port is taken, the server exits early or times out;
    a server that did not come up is killed, never left behind.
    """
    for port in (tcp_port, http_port):
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
    layout = _Layout(state_dir.resolve())
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(layout.lock_file):
        pid = service_pid(layout.pid_file, layout.markers())
        if pid is not None:
            ports = _configured_ports(layout)
            if ports != (tcp_port, http_port):
                raise ClickHouseStartError(
                    f"a ClickHouse server from {layout.state_dir} already runs on ports "
                    f"{ports} (tcp, http), not {(tcp_port, http_port)}; stop it first"
                )
            _wait_ready(pid, layout, tcp_port, time.monotonic() + timeout_s)
            return _server(pid, layout, tcp_port, http_port)
        layout.pid_file.unlink(missing_ok=True)
        command = find_clickhouse_server_command()
        for port in (tcp_port, http_port):
            if _port_in_use(port):
                raise ClickHouseStartError(
                    f"port {port} on {HOST} is already in use by another process; "
                    "stop it or choose other ports"
                )
        _render_config(layout, tcp_port, http_port)
        pid = None
        try:
            with interrupts_deferred():  # the server is under this cleanup from its first instant
                pid = launch_detached(
                    [*command, *layout.markers()],
                    pid_file=layout.pid_file,
                    log_path=layout.stdout_log,
                    env={**os.environ, "TZ": "UTC"},
                    cwd=layout.state_dir,
                )
            _wait_ready(pid, layout, tcp_port, time.monotonic() + timeout_s)
        except BaseException:
            if pid is not None:
                terminate_group(pid, KILL_WAIT_S, name=_NAME, error=ClickHouseStopError)
            layout.pid_file.unlink(missing_ok=True)
            raise
        return _server(pid, layout, tcp_port, http_port)


def stop_clickhouse_server(state_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop the server started from state_dir; return whether one was running.

    Sends SIGTERM to the server's process group, waits up to timeout_s for a clean shutdown,
    then SIGKILLs the group. Returns once the server has exited, after SIGKILLing anything
    else left in its group. Raises ClickHouseStopError if the server survives SIGKILL.
    """
    layout = _Layout(state_dir.resolve())
    if not layout.state_dir.is_dir():
        return False
    with file_lock(layout.lock_file):
        pid = stop_service(
            layout.pid_file,
            layout.markers(),
            timeout_s=timeout_s,
            name=_NAME,
            error=ClickHouseStopError,
        )
    return pid is not None


def _running(layout: _Layout) -> ClickHouseServer | None:
    pid = service_pid(layout.pid_file, layout.markers())
    if pid is None:
        return None
    tcp_port, http_port = _configured_ports(layout)
    if not _answers(tcp_port):
        return None
    return _server(pid, layout, tcp_port, http_port)


def _server(pid: int, layout: _Layout, tcp_port: int, http_port: int) -> ClickHouseServer:
    return ClickHouseServer(HOST, tcp_port, http_port, pid, layout.server_log)


def _render_config(layout: _Layout, tcp_port: int, http_port: int) -> None:
    dirs = layout.directories()
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    values = {name: escape(str(path)) for name, path in dirs.items()}
    values |= {
        "host": HOST,
        "tcp_port": str(tcp_port),
        "http_port": str(http_port),
        "users_config": escape(str(layout.users)),
    }
    template = Template((_TEMPLATES / "config.xml").read_text(encoding="utf-8"))
    write_atomically(layout.config, template.substitute(values))
    users = Template((_TEMPLATES / "users.xml").read_text(encoding="utf-8"))
    write_atomically(
        layout.users,
        users.substitute(
            tally_password_sha256=_sha256_hex(tally_user_password(layout.state_dir)),
            analyst_password_sha256=_sha256_hex(analyst_user_password(layout.state_dir)),
            analyst_database=ANALYST_DATABASE,
        ),
    )


def _sha256_hex(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def tally_user_password(state_dir: Path) -> str:
    """The password of the server's ``tally`` user, made on first use (file mode 0600)."""
    return _password(state_dir, "tally-password")


def analyst_user_password(state_dir: Path) -> str:
    """The password of the server's ``analyst`` user (the analyst views only), made on first
    use (file mode 0600)."""
    return _password(state_dir, "analyst-password")


def _password(state_dir: Path, name: str) -> str:
    path = state_dir.resolve() / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _configured_ports(layout: _Layout) -> tuple[int, int]:
    root = ElementTree.parse(layout.config).getroot()
    return int(root.findtext("tcp_port", "0")), int(root.findtext("http_port", "0"))


def _wait_ready(pid: int, layout: _Layout, tcp_port: int, deadline: float) -> None:
    """Poll `SELECT 1` until the server answers."""
    while True:
        code = exit_code(pid)
        if code is not None:
            layout.pid_file.unlink(missing_ok=True)
            status = "" if code == -1 else f" with code {code}"  # -1: not this process's child
            raise ClickHouseStartError(
                f"clickhouse-server exited during start-up{status}; see {layout.error_log} "
                f"and {layout.stdout_log}{_log_tail(layout)}"
            )
        if _answers(tcp_port):
            return
        if time.monotonic() >= deadline:
            raise ClickHouseStartError(
                f"clickhouse-server did not answer on {HOST}:{tcp_port} in time; "
                f"see {layout.error_log}{_log_tail(layout)}"
            )
        time.sleep(_POLL_INTERVAL_S)


def _answers(tcp_port: int) -> bool:
    # A bare connect first: the driver logs a traceback for every refused connection.
    if not _port_in_use(tcp_port):
        return False
    client = Client(
        HOST, port=tcp_port, connect_timeout=1, send_receive_timeout=5, sync_request_timeout=1
    )
    try:
        return bool(client.execute("SELECT 1") == [(1,)])
    except (DriverError, OSError, EOFError):
        return False
    finally:
        client.disconnect()


def _port_in_use(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _log_tail(layout: _Layout) -> str:
    """The tail of the server's error log, or of its stdout when that log is empty."""
    return log_tail(layout.error_log) or log_tail(layout.stdout_log)
