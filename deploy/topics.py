"""Topics held to their spec, on Tally's own broker or on any cluster it is pointed at.

``ensure_topics`` creates the topics Tally uses that are missing and then compares every one,
new or found, with its ``TopicSpec`` as the cluster reports it: a retention longer than the
spec allows is lowered (the raw topic keeps raw ids and IPs for 24 h at most), a compacted-only
topic is set to delete by time, segments are cut short enough that expired records go soon, and
a topic that cannot be corrected (too few partitions, no right to alter it) raises
``TopicMismatchError`` with one line saying what to run. ``deploy.kafka`` re-exports the three
public names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafka.admin import AlterConfigOp, ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from deploy.interrupts import interrupts_deferred

_log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.2
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


class TopicMismatchError(RuntimeError):
    """A topic on the cluster breaks its spec and was not corrected; the message is one line
    naming the topic, what the cluster has, what the spec says and what to do."""


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create; ``retention_ms`` None keeps the broker default, -1 keeps forever.
    ``compacted``: keep the newest record of each key (a table's changelog), made with
    ``cleanup.policy=compact`` and no time limit."""

    name: str
    partitions: int
    retention_ms: int | None
    compacted: bool = False

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"topic {self.name!r}: partitions must be at least 1")
        if self.retention_ms is not None and self.retention_ms != -1 and self.retention_ms <= 0:
            raise ValueError(f"topic {self.name!r}: retention_ms must be positive, -1 or None")
        if self.compacted and self.retention_ms is not None:
            raise ValueError(f"topic {self.name!r}: a compacted topic keeps no time limit")


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

    Interrupts are held meanwhile (at most about ``timeout_s``): kafka-python runs its event
    loop in the calling thread and swallows an exception a signal handler raises into it.
    """
    with interrupts_deferred():
        _ensure_topics(bootstrap, topics, timeout_s)


def _ensure_topics(bootstrap: str, topics: Sequence[TopicSpec], timeout_s: float) -> None:
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
    if spec.compacted:
        configs[_CLEANUP_POLICY] = "compact"
    if spec.retention_ms is not None:
        configs[_RETENTION] = str(spec.retention_ms)
        if spec.retention_ms != -1:
            configs[_SEGMENT] = str(segment_ms_for(spec.retention_ms))
    return {"num_partitions": spec.partitions, "replication_factor": 1, "configs": configs}


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
