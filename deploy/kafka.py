"""Bring up the single-node Kafka broker that development, tests and benchmarks run against.

Kafka comes from Maven Central as plain jars (``deploy/kafka/pom.xml``; there is no Docker here)
and runs as one KRaft node, broker and controller in one JVM, on loopback only. The JVM is
detached in its own process group, so it outlives the command that started it and is stopped as a
whole. Everything it writes lives under ``<state_dir>/kafka``: the rendered ``server.properties``,
the data directory, ``broker.pid`` and ``logs/`` (``server.log`` from log4j, ``console.log`` for
what the JVM prints before logging is up).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from kafka.admin import AlterConfigOp, ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from deploy.interrupts import interrupts_deferred

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
_KILL_WAIT_S = 10.0
_PROBE_TIMEOUT_S = 2.0
_POLL_INTERVAL_S = 0.2
_MAX_CAUSE_CHARS = 400
# Maven colours its output even in batch mode on some versions.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class KafkaStartError(RuntimeError):
    """The broker, its jars or its storage could not be brought up; the message is one line."""


class KafkaStopError(RuntimeError):
    """The broker JVM survived SIGKILL."""


class TopicMismatchError(RuntimeError):
    """A topic on the cluster breaks its spec and was not corrected; the message is one line
    naming the topic, what the cluster has, what the spec says and what to do."""


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker: where clients connect, its JVM's pid and its log4j log."""

    bootstrap: str
    pid: int
    log_path: Path


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create; ``retention_ms`` None keeps the broker default, -1 keeps forever."""

    name: str
    partitions: int
    retention_ms: int | None

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"topic {self.name!r}: partitions must be at least 1")
        if self.retention_ms is not None and self.retention_ms != -1 and self.retention_ms <= 0:
            raise ValueError(f"topic {self.name!r}: retention_ms must be positive, -1 or None")


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
    with _locked(jars_dir.parent / f".{jars_dir.name}.lock"):
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
    with _locked(layout.lock_file):
        pid = _broker_pid(layout)
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
                pid = _launch(layout, java, classpath)
            _wait_until_answering(layout, pid, bootstrap, cluster_id, deadline, log_offsets)
        except BaseException:
            if pid is not None:
                _terminate(pid, _KILL_WAIT_S)
            layout.pid_file.unlink(missing_ok=True)
            raise
    _log.info(
        "started Kafka broker (pid %d) on %s in %.1f s", pid, bootstrap, time.monotonic() - started
    )
    return KafkaBroker(bootstrap=bootstrap, pid=pid, log_path=layout.server_log)


def running_kafka(state_dir: Path) -> KafkaBroker | None:
    """The broker started from ``state_dir`` if its JVM is alive (it may not answer yet)."""
    layout = _Layout.under(state_dir)
    pid = _broker_pid(layout)
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
    with _locked(layout.lock_file):
        pid = _broker_pid(layout)
        if pid is None:
            return False
        _terminate(pid, timeout_s)
        layout.pid_file.unlink(missing_ok=True)
    _log.info("stopped Kafka broker (pid %d)", pid)
    return True


def ensure_topics(bootstrap: str, topics: Sequence[TopicSpec], *, timeout_s: float = 30.0) -> None:
    """Create the missing topics, hold every topic to its spec, and wait until each has a leader.

    New topics get the spec's partitions, replication factor 1 and ``retention.ms`` when set.
    Then every topic, new or found (made by hand, by an auto-creating producer, by another
    tool), is compared on the cluster with its spec. Where the spec limits retention, an
    effective ``retention.ms`` that is longer (the broker default when the topic sets none;
    -1 is forever) is lowered to the spec's, and a ``cleanup.policy`` without ``delete``
    (compaction only never deletes by time) is set to ``delete``; both through an incremental
    alter, which leaves the topic's other configs as they are, and each logged at INFO. A
    shorter retention is kept, and so are more partitions than the spec asks for (logged).
    Blocks at most about ``timeout_s``. Raises TopicMismatchError, after every correction it
    could make, when a topic has fewer partitions than its spec, or its configs cannot be read
    or corrected; kafka.errors.KafkaError otherwise (KafkaTimeoutError when the topics are not
    ready in time).
    """
    if not topics:
        return
    deadline = time.monotonic() + timeout_s
    timeout_ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms
    )
    try:
        existing = set(admin.list_topics())
        missing = {
            spec.name: _creation_request(spec) for spec in topics if spec.name not in existing
        }
        if missing:
            response = admin.create_topics(missing, timeout_ms=timeout_ms, raise_errors=False)
            for result in response["topics"]:
                error = for_code(result["error_code"])
                if result["error_code"] != 0 and error is not TopicAlreadyExistsError:
                    raise error(f"cannot create topic {result['name']}: {result['error_message']}")
        admin.wait_for_topics([spec.name for spec in topics], timeout_ms=_remaining_ms(deadline))
        _hold_to_specs(admin, bootstrap, topics, deadline)
    finally:
        admin.close()


def _creation_request(spec: TopicSpec) -> dict[str, object]:
    configs = {}
    if spec.retention_ms is not None:
        configs[_RETENTION] = str(spec.retention_ms)
        if spec.retention_ms != -1:
            configs[_SEGMENT] = str(segment_ms_for(spec.retention_ms))
    return {"num_partitions": spec.partitions, "replication_factor": 1, "configs": configs}


_RETENTION = "retention.ms"
_SEGMENT = "segment.ms"
_CLEANUP_POLICY = "cleanup.policy"
_DELETE_POLICY = "delete"
_BROKER_CONFIG_SOURCES = frozenset(
    {
        "DEFAULT_CONFIG",
        "STATIC_BROKER_CONFIG",
        "DYNAMIC_BROKER_CONFIG",
        "DYNAMIC_DEFAULT_BROKER_CONFIG",
    }
)
_DURATION_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1_000, "s"))


@dataclass(frozen=True)
class _TopicConfigs:
    """What the cluster reports for one topic: effective values, whoever set them."""

    partitions: int
    retention_ms: int
    retention_from_broker: bool
    cleanup_policy: str
    segment_ms: int

    @property
    def deletes_by_time(self) -> bool:
        return _DELETE_POLICY in (part.strip() for part in self.cleanup_policy.split(","))

    def retention(self) -> str:
        origin = "the broker default" if self.retention_from_broker else "set on the topic"
        return f"{_RETENTION}={self.retention_ms} ({_duration(self.retention_ms)}, {origin})"


def _hold_to_specs(
    admin: KafkaAdminClient, bootstrap: str, topics: Sequence[TopicSpec], deadline: float
) -> None:
    """Compare each topic with its spec, correct what is safe to correct, refuse the rest."""
    found = _topic_configs(admin, [spec.name for spec in topics])
    problems: list[str] = []
    corrections: list[tuple[TopicSpec, _TopicConfigs, dict[str, str]]] = []
    for spec in topics:
        configs = found.get(spec.name)
        if configs is None:
            problems.append(
                f"cannot read the partitions and configs of topic {spec.name} on {bootstrap}, "
                "so its retention cannot be checked; allow Tally's client DESCRIBE and "
                "DESCRIBE_CONFIGS on it"
            )
            continue
        if configs.partitions < spec.partitions:
            problems.append(
                f"topic {spec.name} has {_count(configs.partitions, 'partition')}, "
                f"fewer than the {spec.partitions} its spec asks for; add partitions "
                f"(kafka-topics.sh --bootstrap-server {bootstrap} --alter --topic {spec.name} "
                f"--partitions {spec.partitions}) and start again"
            )
        elif configs.partitions > spec.partitions:
            _log.info(
                "topic %s has %s, more than the %d of its spec; keeping them",
                spec.name,
                _count(configs.partitions, "partition"),
                spec.partitions,
            )
        wanted = _corrections(spec, configs)
        if wanted:
            corrections.append((spec, configs, wanted))
    if corrections:
        problems.extend(_apply(admin, bootstrap, corrections, deadline))
    if problems:
        raise TopicMismatchError("; ".join(problems))


def _corrections(spec: TopicSpec, configs: _TopicConfigs) -> dict[str, str]:
    """The configs to set so that ``configs`` keeps records no longer than ``spec`` allows."""
    if spec.retention_ms is None or spec.retention_ms == -1:
        return {}  # the spec sets no limit to hold the topic to
    wanted = {}
    if configs.retention_ms == -1 or configs.retention_ms > spec.retention_ms:
        wanted[_RETENTION] = str(spec.retention_ms)
    if not configs.deletes_by_time:
        wanted[_CLEANUP_POLICY] = _DELETE_POLICY
    if configs.segment_ms > segment_ms_for(spec.retention_ms):
        wanted[_SEGMENT] = str(segment_ms_for(spec.retention_ms))
    return wanted


def segment_ms_for(retention_ms: int) -> int:
    """Kafka deletes whole segments, and only once a segment's newest record has expired: with
    the default 7-day segments a quiet topic keeps records for retention plus up to 7 days.
    Segments of a 24th of the retention keep every record at most about 1/24 past it."""
    return max(retention_ms // 24, 60_000)


def _apply(
    admin: KafkaAdminClient,
    bootstrap: str,
    corrections: list[tuple[TopicSpec, _TopicConfigs, dict[str, str]]],
    deadline: float,
) -> list[str]:
    """Set each topic's wanted configs incrementally, log each change, and wait until the
    cluster reports them. Returns a problem line for every topic refused or not shown in time.
    """
    resources = [
        ConfigResource(
            ConfigResourceType.TOPIC,
            spec.name,
            {key: (AlterConfigOp.SET, value) for key, value in wanted.items()},
        )
        for spec, _, wanted in corrections
    ]
    try:
        # incremental=True: never the legacy AlterConfigs, which resets every config not sent.
        results = admin.alter_configs(resources, incremental=True, raise_on_unknown=False)
        outcomes = {name: str(result) for name, result in results.get("topic", {}).items()}
    except KafkaError as exc:
        outcomes = {spec.name: f"{type(exc).__name__}: {exc}" for spec, _, _ in corrections}
    problems = []
    accepted = {}
    for spec, configs, wanted in corrections:
        name = spec.name
        outcome = outcomes.get(name, "no answer for this topic")
        if outcome != "OK":
            problems.append(_refusal(bootstrap, spec, configs, wanted, outcome))
            continue
        accepted[name] = wanted
        if _RETENTION in wanted:
            _log.info(
                "topic %s: lowered %s to %s (%s, its spec)",
                name,
                configs.retention(),
                wanted[_RETENTION],
                _duration(int(wanted[_RETENTION])),
            )
        if _CLEANUP_POLICY in wanted:
            _log.info(
                "topic %s: set %s from %r to %r, so records are deleted by time",
                name,
                _CLEANUP_POLICY,
                configs.cleanup_policy,
                _DELETE_POLICY,
            )
        if _SEGMENT in wanted:
            _log.info(
                "topic %s: lowered %s from %s to %s, so records go soon after they expire",
                name,
                _SEGMENT,
                _duration(configs.segment_ms),
                _duration(int(wanted[_SEGMENT])),
            )
    return problems + _await_configs(admin, accepted, deadline)


def _refusal(
    bootstrap: str, spec: TopicSpec, configs: _TopicConfigs, wanted: dict[str, str], why: str
) -> str:
    settings = " ".join(f"{key}={value}" for key, value in wanted.items())
    limit = _duration(spec.retention_ms or 0)
    policy = f"{_CLEANUP_POLICY}={configs.cleanup_policy or '(empty)'}, which never deletes by time"
    if _RETENTION not in wanted and _CLEANUP_POLICY not in wanted:
        found = (
            f"{_SEGMENT}={configs.segment_ms} ({_duration(configs.segment_ms)}), so expired "
            f"records wait that long to be deleted, though its spec allows {limit}"
        )
    elif _RETENTION not in wanted:
        found = f"{policy}, though its spec allows {limit}"
    elif _CLEANUP_POLICY not in wanted:
        found = f"{configs.retention()}, longer than the {limit} its spec allows"
    else:
        found = f"{configs.retention()}, longer than the {limit} its spec allows, and {policy}"
    return (
        f"topic {spec.name} has {found}, and the cluster refused to correct it "
        f"({' '.join(why.split())}); set {settings} on it "
        f"(kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics "
        f"--entity-name {spec.name} --add-config {settings.replace(' ', ',')}) or allow "
        "Tally's client ALTER_CONFIGS on it, and start again"
    )


def _await_configs(
    admin: KafkaAdminClient, accepted: dict[str, dict[str, str]], deadline: float
) -> list[str]:
    """Poll until the cluster reports the accepted configs; a problem line per topic if not."""
    pending = dict(accepted)
    while pending:
        found = _described_configs(admin, list(pending))
        pending = {
            name: wanted
            for name, wanted in pending.items()
            if any(found.get(name, {}).get(key) != value for key, value in wanted.items())
        }
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL_S)
    return [
        f"topic {name}: the cluster accepted "
        + " ".join(f"{key}={value}" for key, value in wanted.items())
        + " but does not report it in time; check the topic's configs and start again"
        for name, wanted in pending.items()
    ]


def _topic_configs(admin: KafkaAdminClient, names: list[str]) -> dict[str, _TopicConfigs | None]:
    """Each topic's partition count and effective retention configs; None where unreadable."""
    partitions = {
        topic["name"]: len(topic["partitions"])
        for topic in admin.describe_topics(names)
        if topic.get("error_code", 0) == 0
    }
    described = _described_configs(admin, names, values_only=False)
    found: dict[str, _TopicConfigs | None] = {}
    for name in names:
        configs = described.get(name, {})
        retention = configs.get(_RETENTION, {})
        policy = configs.get(_CLEANUP_POLICY, {})
        segment = configs.get(_SEGMENT, {})
        try:
            found[name] = _TopicConfigs(
                partitions=partitions[name],
                retention_ms=int(retention["value"]),
                retention_from_broker=retention.get("config_source") in _BROKER_CONFIG_SOURCES,
                cleanup_policy=str(policy["value"]),
                segment_ms=int(segment["value"]),
            )
        except (KeyError, TypeError, ValueError):
            found[name] = None  # describe_configs leaves a refused topic empty, not an error
    return found


def _described_configs(
    admin: KafkaAdminClient, names: list[str], *, values_only: bool = True
) -> dict[str, dict[str, Any]]:
    """The effective retention.ms and cleanup.policy of each topic, as the cluster reports them."""
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, [_RETENTION, _CLEANUP_POLICY, _SEGMENT])
        for name in names
    ]
    described = admin.describe_configs(resources, config_filter="all").get("topic", {})
    if not values_only:
        return {name: dict(configs) for name, configs in described.items()}
    return {
        name: {key: config.get("value") for key, config in configs.items()}
        for name, configs in described.items()
    }


def _duration(ms: int) -> str:
    """``ms`` as people say it: 24 h, 7 d, forever."""
    if ms == -1:
        return "forever"
    for unit_ms, unit in _DURATION_UNITS:
        if ms > 0 and ms % unit_ms == 0 and (unit != "d" or ms >= 2 * unit_ms):
            return f"{ms // unit_ms} {unit}"
    return f"{ms} ms"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _remaining_ms(deadline: float) -> int:
    return max(int((deadline - time.monotonic()) * 1000), 1)


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
    layout.properties.write_text(rendered, encoding="utf-8")


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


def _launch(layout: _Layout, java: str, classpath: str) -> int:
    """Start the JVM in a new session, so the broker outlives us and is signalled as a group.

    posix_spawn rather than subprocess.Popen: no Popen object is left to warn that it still runs.
    """
    argv = [
        java,
        *_JVM_OPTIONS,
        *_log_options(layout),
        "-cp",
        classpath,
        _BROKER_MAIN,
        str(layout.properties),
    ]
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (
            os.POSIX_SPAWN_OPEN,
            1,
            str(layout.console_log),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o644,
        ),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(java, argv, os.environ, file_actions=file_actions, setsid=True)
    layout.pid_file.write_text(f"{pid}\n", encoding="ascii")
    return pid


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
        exit_code = _exit_code(pid)
        if exit_code is not None:
            how = f" with code {exit_code}" if exit_code >= 0 else ""
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


def _terminate(pid: int, timeout_s: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    if _wait_for_exit(pid, timeout_s):
        return
    _log.warning("Kafka broker (pid %d) ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
    _signal_group(pid, signal.SIGKILL)
    if not _wait_for_exit(pid, _KILL_WAIT_S):
        raise KafkaStopError(f"Kafka broker (pid {pid}) is still running after SIGKILL")


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _exit_code(pid) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _exit_code(pid: int) -> int | None:
    """None while ``pid`` runs; its exit code once gone, or -1 if it was not our child."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if _process_exists(pid) else -1
    return os.waitstatus_to_exitcode(status) if reaped == pid else None


def _process_exists(pid: int) -> bool:
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
    return state != "Z"


def _broker_pid(layout: _Layout) -> int | None:
    """The pid in ``broker.pid`` if that process runs and is this state directory's broker."""
    try:
        pid = int(layout.pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    if _exit_code(pid) is not None:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid
    if _BROKER_MAIN.encode() in argv and str(layout.properties).encode() in argv:
        return pid
    return None


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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise starts and stops of one broker across processes (e.g. pytest-xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
