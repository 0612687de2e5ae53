"""Bring up the single-node Kafka broker that development, tests and benchmarks run against.

Kafka comes from Maven Central as plain jars (``deploy/kafka/pom.xml``; there is no Docker here)
and runs as one KRaft node, broker and controller in one JVM, on loopback only. The JVM is
detached in its own process group, so it outlives the command that started it and is stopped as a
whole. Everything it writes lives under ``<state_dir>/kafka``: the rendered ``server.properties``,
the data directory, ``broker.pid`` and ``logs/`` (``server.log`` from log4j, ``console.log`` for
what the JVM prints before logging is up).

Launching, finding, waiting for and stopping the JVM go through ``deploy.services.process``;
this module keeps what is Kafka's own: the jars, the rendered config, the storage format, the
readiness probe and its error messages. Topic management lives in ``deploy.topics``, whose
public names are re-exported here.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from string import Template

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from deploy.interrupts import interrupts_deferred
from deploy.services.process import (
    KILL_WAIT_S,
    ProcessStopError,
    exit_code,
    file_lock,
    launch_detached,
    service_pid,
    stop_service,
    terminate_group,
    write_atomically,
)
from deploy.topics import TopicMismatchError, TopicSpec, ensure_topics  # re-exported

__all__ = [
    "KafkaBroker",
    "KafkaStartError",
    "KafkaStopError",
    "TopicMismatchError",
    "TopicSpec",
    "ensure_topics",
    "fetch_broker_jars",
    "running_kafka",
    "start_kafka",
    "stop_kafka",
]

_log = logging.getLogger(__name__)

_ASSETS = Path(__file__).resolve().with_name("kafka")
_POM = _ASSETS / "pom.xml"
_LOG4J_CONFIG = _ASSETS / "log4j2.yaml"
_PROPERTIES_TEMPLATE = _ASSETS / "server.properties.template"

_BROKER_MAIN = "kafka.Kafka"
_STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"
# Two cores and a few other services share the machine; Kafka's own default is a 1 GB heap.
_JVM_OPTIONS = (
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
_HOST = "127.0.0.1"
_MAVEN_TIMEOUT_S = 900.0
_NAME = "Kafka broker"
_PROBE_TIMEOUT_S = 2.0
_POLL_INTERVAL_S = 0.2
_MAX_CAUSE_CHARS = 400
# Maven colours its output even in batch mode on some versions.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class KafkaStartError(RuntimeError):
    """The broker, its jars or its storage could not be brought up; the message is one line."""


class KafkaStopError(ProcessStopError):
    """The broker JVM survived SIGKILL."""


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker: where clients connect, its JVM's pid and its log4j log."""

    bootstrap: str
    pid: int
    log_path: Path


@dataclass(frozen=True)
class _Layout:
    """Where a broker keeps its files under one state directory."""

    root: Path

    @classmethod
    def under(cls, state_dir: Path) -> _Layout:
        return cls(state_dir.resolve() / "kafka")

    @property
    def properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def meta_properties(self) -> Path:
        return self.data_dir / "meta.properties"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def console_log(self) -> Path:
        return self.logs_dir / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "broker.pid"

    @property
    def lock_file(self) -> Path:
        return self.root / "broker.lock"


def fetch_broker_jars(jars_dir: Path) -> bool:
    """Make sure ``jars_dir`` holds the broker jars that ``deploy/kafka/pom.xml`` names.

    Maven runs only when the Kafka jar of the pom's version is missing. It fills a temporary
    sibling folder that then replaces ``jars_dir`` whole, so an interrupted download never leaves
    a half-filled cache that later runs would trust, and a version bump never mixes jars.
    Blocks while another process fetches into the same folder. Returns whether Maven ran.
    Raises KafkaStartError when Maven is missing, fails or times out.
    """
    kafka_jar = _kafka_jar_name()
    if (jars_dir / kafka_jar).is_file():
        return False
    jars_dir = jars_dir.resolve()
    with file_lock(jars_dir.parent / f".{jars_dir.name}.lock"):
        if (jars_dir / kafka_jar).is_file():
            return False
        maven = shutil.which("mvn")
        if maven is None:
            raise KafkaStartError("cannot fetch the Kafka jars: Maven (mvn) is not on PATH")
        staging = Path(tempfile.mkdtemp(prefix=f".{jars_dir.name}-", dir=jars_dir.parent))
        try:
            _run_maven(maven, staging)
            if not (staging / kafka_jar).is_file():
                raise KafkaStartError(f"Maven succeeded but did not produce {kafka_jar}")
            if jars_dir.exists():
                shutil.rmtree(jars_dir)
            staging.rename(jars_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _log.info("fetched the Kafka broker jars into %s", jars_dir)
    return True


def start_kafka(
    state_dir: Path,
    jars_dir: Path,
    *,
    port: int = 9092,
    controller_port: int = 9093,
    timeout_s: float = 90.0,
) -> KafkaBroker:
    """Return the broker of ``state_dir``, starting it if it is not running.

    A broker already started from ``state_dir`` is reused once it answers (it may still be
    starting). Otherwise the jars are fetched if missing (not counted in ``timeout_s``), the
    storage is formatted on first use, and the JVM is launched and polled until it serves
    cluster metadata. Blocks at most ``timeout_s`` for formatting and start-up. Raises
    KafkaStartError, naming the log file, if the broker exits or does not answer in time; a JVM
    this call launched is then killed rather than left behind.
    """
    layout = _Layout.under(state_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    bootstrap = f"{_HOST}:{port}"
    with file_lock(layout.lock_file):
        pid = service_pid(layout.pid_file, _markers(layout))
        if pid is not None:
            return _reuse(layout, pid, port, timeout_s)
        fetch_broker_jars(jars_dir)
        started = time.monotonic()
        deadline = started + timeout_s
        java = _java()
        classpath = f"{jars_dir.resolve()}{os.sep}*"
        for wanted in (port, controller_port):
            _ensure_port_free(wanted)
        layout.data_dir.mkdir(parents=True, exist_ok=True)
        layout.logs_dir.mkdir(parents=True, exist_ok=True)
        _render_properties(layout, port, controller_port)
        cluster_id = _format_storage_once(layout, java, classpath, deadline)
        log_offsets = {path: _size(path) for path in (layout.server_log, layout.console_log)}
        pid = None
        try:
            with interrupts_deferred():  # the JVM is under this cleanup from its first instant
                pid = launch_detached(
                    _broker_command(layout, java, classpath),
                    pid_file=layout.pid_file,
                    log_path=layout.console_log,
                )
            _wait_until_answering(layout, pid, bootstrap, cluster_id, deadline, log_offsets)
        except BaseException:
            if pid is not None:
                terminate_group(pid, KILL_WAIT_S, name=_NAME, error=KafkaStopError)
            layout.pid_file.unlink(missing_ok=True)
            raise
    _log.info(
        "started Kafka broker (pid %d) on %s in %.1f s", pid, bootstrap, time.monotonic() - started
    )
    return KafkaBroker(bootstrap=bootstrap, pid=pid, log_path=layout.server_log)


def running_kafka(state_dir: Path) -> KafkaBroker | None:
    """The broker started from ``state_dir`` if its JVM is alive (it may not answer yet)."""
    layout = _Layout.under(state_dir)
    pid = service_pid(layout.pid_file, _markers(layout))
    if pid is None:
        return None
    return KafkaBroker(f"{_HOST}:{_configured_port(layout)}", pid, layout.server_log)


def stop_kafka(state_dir: Path, timeout_s: float = 60.0) -> bool:
    """Stop the broker started from ``state_dir``; returns whether one was running.

    SIGTERM goes to the broker's process group so it shuts down in order (closing its logs
    cleanly, which keeps the next start fast); after ``timeout_s`` the group is killed. Blocks
    until the JVM is gone. Raises KafkaStopError if it survives SIGKILL.
    """
    layout = _Layout.under(state_dir)
    if not layout.root.is_dir():
        return False
    with file_lock(layout.lock_file):
        pid = stop_service(
            layout.pid_file,
            _markers(layout),
            timeout_s=timeout_s,
            name=_NAME,
            error=KafkaStopError,
        )
    if pid is None:
        return False
    _log.info("stopped Kafka broker (pid %d)", pid)
    return True


def _kafka_jar_name() -> str:
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ElementTree.parse(_POM).findtext("m:properties/m:kafka.version", None, namespace)
    if not version:
        raise KafkaStartError(f"{_POM} does not set the kafka.version property")
    return f"kafka_2.13-{version.strip()}.jar"


def _run_maven(maven: str, jars_dir: Path) -> None:
    command = [
        maven,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(_POM),
        "package",
        f"-Djars.dir={jars_dir}",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_MAVEN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaStartError(
            f"Maven did not fetch the Kafka jars within {_MAVEN_TIMEOUT_S:.0f} s"
        ) from exc
    if result.returncode != 0:
        raise KafkaStartError(
            f"Maven could not fetch the Kafka jars (exit {result.returncode}): "
            + _maven_errors(result.stdout + "\n" + result.stderr)
        )


def _maven_errors(output: str) -> str:
    """Maven's last few meaningful error lines, joined into one."""
    boilerplate = ("-> [Help", "Re-run Maven", "For more information", "[Help ", "To see the full")
    plain = _ANSI_ESCAPE.sub("", output)
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    errors = [
        message
        for line in lines
        if line.startswith("[ERROR]")
        and (message := line.removeprefix("[ERROR]").strip())
        and not message.startswith(boilerplate)
    ]
    return " | ".join((errors or lines or ["no output"])[-3:])[:_MAX_CAUSE_CHARS]


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KafkaStartError("cannot start Kafka: java is not on PATH (Kafka 4 needs Java 17+)")
    return java


def _log_options(layout: _Layout) -> list[str]:
    """Point every log the JVM may write, crash reports included, into the logs folder."""
    return [
        f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={layout.logs_dir}",
        f"-XX:ErrorFile={layout.logs_dir / 'hs_err_pid%p.log'}",
    ]


def _ensure_port_free(port: int) -> None:
    """Fail with a clear line now rather than with a bind error deep in the broker log."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            raise KafkaStartError(
                f"cannot start Kafka: {_HOST}:{port} is already in use ({exc.strerror})"
            ) from exc


def _render_properties(layout: _Layout, port: int, controller_port: int) -> None:
    template = Template(_PROPERTIES_TEMPLATE.read_text(encoding="utf-8"))
    rendered = template.substitute(
        port=port, controller_port=controller_port, data_dir=layout.data_dir
    )
    write_atomically(layout.properties, rendered)


def _format_storage_once(layout: _Layout, java: str, classpath: str, deadline: float) -> str:
    """Format the data directory unless it already is; returns the cluster id it carries."""
    if layout.meta_properties.is_file():
        cluster_id = _read_properties(layout.meta_properties).get("cluster.id")
        if not cluster_id:
            raise KafkaStartError(
                f"{layout.meta_properties} has no cluster.id; delete {layout.root}"
            )
        return cluster_id
    cluster_id = _new_cluster_id()
    command = [
        java,
        *_JVM_OPTIONS,
        *_log_options(layout),
        "-cp",
        classpath,
        _STORAGE_TOOL_MAIN,
        "format",
        "--config",
        str(layout.properties),
        "--cluster-id",
        cluster_id,
    ]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=max(deadline - time.monotonic(), 1.0),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaStartError(f"formatting Kafka storage in {layout.data_dir} timed out") from exc
    if result.returncode != 0:
        output = (result.stdout + "\n" + result.stderr).strip().splitlines() or ["no output"]
        raise KafkaStartError(
            f"formatting Kafka storage in {layout.data_dir} failed (exit {result.returncode}): "
            + output[-1].strip()[:_MAX_CAUSE_CHARS]
        )
    _log.info("formatted Kafka storage in %s (cluster id %s)", layout.data_dir, cluster_id)
    return cluster_id


def _new_cluster_id() -> str:
    """A random id in Kafka's own form: 16 bytes, URL-safe base64, no padding, no leading '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):
            return cluster_id


def _broker_command(layout: _Layout, java: str, classpath: str) -> list[str]:
    return [java, *_JVM_OPTIONS, *_log_options(layout), "-cp", classpath, *_markers(layout)]


def _markers(layout: _Layout) -> list[str]:
    """The broker's last arguments, which tell its JVM from any other process in /proc."""
    return [_BROKER_MAIN, str(layout.properties)]


def _reuse(layout: _Layout, pid: int, port: int, timeout_s: float) -> KafkaBroker:
    running_port = _configured_port(layout)
    if running_port != port:
        raise KafkaStartError(
            f"the Kafka broker of {layout.root} (pid {pid}) runs on port {running_port}, "
            f"not {port}; stop it first"
        )
    bootstrap = f"{_HOST}:{port}"
    cluster_id = _read_properties(layout.meta_properties).get("cluster.id", "")
    log_offsets = {path: _size(path) for path in (layout.server_log, layout.console_log)}
    _wait_until_answering(
        layout, pid, bootstrap, cluster_id, time.monotonic() + timeout_s, log_offsets
    )
    _log.info("reusing running Kafka broker (pid %d) on %s", pid, bootstrap)
    return KafkaBroker(bootstrap=bootstrap, pid=pid, log_path=layout.server_log)


def _wait_until_answering(
    layout: _Layout,
    pid: int,
    bootstrap: str,
    cluster_id: str,
    deadline: float,
    log_offsets: dict[Path, int],
) -> None:
    """Poll until the broker on ``bootstrap`` serves metadata for ``cluster_id``."""
    while True:
        code = exit_code(pid)
        if code is not None:
            how = f" with code {code}" if code >= 0 else ""
            raise KafkaStartError(
                f"Kafka broker (pid {pid}) exited{how} before it answered on {bootstrap}: "
                f"{_cause(log_offsets)}; see {layout.server_log}"
            )
        answered = _cluster_id_at(bootstrap, deadline)
        if answered == cluster_id:
            return
        if answered is not None:
            raise KafkaStartError(
                f"{bootstrap} is served by another Kafka cluster ({answered}), "
                f"not the one in {layout.root}"
            )
        if time.monotonic() >= deadline:
            raise KafkaStartError(
                f"Kafka broker (pid {pid}) did not answer on {bootstrap} in time; "
                f"see {layout.server_log}"
            )
        time.sleep(_POLL_INTERVAL_S)


def _cluster_id_at(bootstrap: str, deadline: float) -> str | None:
    """The cluster id the broker on ``bootstrap`` reports, or None if it does not answer yet."""
    host, _, port = bootstrap.rpartition(":")
    timeout_s = min(_PROBE_TIMEOUT_S, max(deadline - time.monotonic(), 0.1))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError:
        return None
    timeout_ms = int(timeout_s * 1000)
    # kafka-python runs its event loop here and would swallow an interrupt raised into it.
    with interrupts_deferred():
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap,
                bootstrap_timeout_ms=timeout_ms,
                request_timeout_ms=timeout_ms,
            )
        except (KafkaError, OSError):
            return None
        try:
            cluster = admin.describe_cluster()
        except (KafkaError, OSError):
            return None
        finally:
            admin.close()
    if not cluster.get("brokers") or not cluster.get("cluster_id"):
        return None
    return str(cluster["cluster_id"])


def _cause(log_offsets: dict[Path, int]) -> str:
    """The first error this run wrote to its logs, in one line."""
    for path, offset in log_offsets.items():
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for index, line in enumerate(lines):
            if " ERROR " in line or " FATAL " in line or line.startswith("Error"):
                detail = lines[index + 1] if index + 1 < len(lines) else ""
                if detail.startswith("["):
                    detail = ""
                return " ".join(filter(None, (line, detail)))[:_MAX_CAUSE_CHARS]
        if lines and path.name == "console.log":
            return lines[-1][:_MAX_CAUSE_CHARS]
    return "no error in its logs"


def _configured_port(layout: _Layout) -> int:
    listeners = _read_properties(layout.properties).get("listeners", "")
    match = re.search(r"PLAINTEXT://[^,]*:(\d+)", listeners)
    if match is None:
        raise KafkaStartError(f"{layout.properties} has no PLAINTEXT listener")
    return int(match.group(1))


def _read_properties(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
