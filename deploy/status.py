"""`tally status`: what runs, how far behind each consumer group is, what ClickHouse holds,
and why events were refused in the last hour.

It reads; it starts nothing. Under `tally up` on embedded ClickHouse the rows are counted
through the sink that owns the data (deploy/wiring.py ``open_reader``).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from deploy.services.process import process_exists
from deploy.settings import Settings
from deploy.up import up_state_file
from deploy.wiring import open_reader, sink_config, stream_config, topic_names
from schemas.enriched import table_name
from schemas.events import EVENT_TYPES
from schemas.summaries import OUTPUT_MODELS
from sinks.backends import ClickHouseError

_KAFKA_TIMEOUT_MS = 5_000
HOUR_S = 3600


@dataclass
class ServiceState:
    name: str
    pid: int | None
    running: bool
    uptime_s: float | None
    restarts: int
    log: str


@dataclass
class Status:
    up_running: bool
    services: list[ServiceState] = field(default_factory=list)
    lag: dict[tuple[str, str], int | None] = field(default_factory=dict)
    """(group, topic) -> messages not yet committed; None when the group has no offsets."""
    rows: dict[str, int] | None = None
    dead_last_hour: Counter[str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def gather_status(settings: Settings, bootstrap: str | None) -> Status:
    """Everything `tally status` shows; each part that cannot be read becomes a problem."""
    status = Status(up_running=False)
    _read_services(settings, status)
    if bootstrap is None:
        status.problems.append("no Kafka cluster: tally up is not running and none is configured")
    else:
        _read_lag(settings, bootstrap, status)
        _read_dead_letters(settings, bootstrap, status)
    _read_rows(settings, status)
    return status


def _read_services(settings: Settings, status: Status) -> None:
    state_file = up_state_file(settings)
    if not state_file.exists():
        status.problems.append("tally up is not running")
        return
    state = orjson.loads(state_file.read_bytes())
    status.up_running = process_exists(state["supervisor_pid"]) and not state["stopping"]
    if not status.up_running:
        status.problems.append("tally up is not running")
        return
    now = time.time()
    for name, child in state["children"].items():
        running = bool(child["running"]) and child["pid"] and process_exists(child["pid"])
        status.services.append(
            ServiceState(
                name,
                child["pid"],
                bool(running),
                now - child["started_at"] if running and child["started_at"] else None,
                child["restarts"],
                child["log"],
            )
        )
        if not running:
            status.problems.append(f"{name} is not running; see {child['log']}")


def _read_lag(settings: Settings, bootstrap: str, status: Status) -> None:
    groups = [stream_config(settings, bootstrap).app_id, sink_config(settings, bootstrap).group_id]
    names = topic_names(settings)
    watched = {groups[0]: names.raw, groups[1]: names.enriched}
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=_KAFKA_TIMEOUT_MS)
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            request_timeout_ms=_KAFKA_TIMEOUT_MS,
            enable_auto_commit=False,
        )
    except KafkaError as err:
        status.problems.append(f"Kafka at {bootstrap} does not answer: {err}")
        return
    try:
        offsets = admin.list_group_offsets({group: None for group in watched})
        for group, topic in watched.items():
            committed = offsets.get(group, {})
            partitions = [
                TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
            ]
            ends = consumer.end_offsets(partitions)
            mine = {tp: meta.offset for tp, meta in committed.items() if tp.topic == topic}
            if not mine:
                status.lag[(group, topic)] = None
                continue
            status.lag[(group, topic)] = sum(
                ends[tp] - max(mine.get(tp, 0), 0) for tp in partitions
            )
    except KafkaError as err:
        status.problems.append(f"cannot read consumer lag: {err}")
    finally:
        admin.close()
        consumer.close()


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


def _read_dead_letters(settings: Settings, bootstrap: str, status: Status) -> None:
    """Reasons of the dead letters of the last hour, read from the dead-letter topic."""
    topic = topic_names(settings).dead
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = _partitions(consumer, topic)
        if not partitions:
            status.dead_last_hour = Counter()
            return
        consumer.assign(partitions)
        since_ms = int((time.time() - HOUR_S) * 1000)
        starts = consumer.offsets_for_times({tp: since_ms for tp in partitions})
        ends = consumer.end_offsets(partitions)
        for tp in partitions:
            found = starts.get(tp)
            consumer.seek(tp, found.offset if found else ends[tp])
        reasons: Counter[str] = Counter()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            consumer.position(tp) < ends[tp] for tp in partitions
        ):
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                        reasons[str(orjson.loads(record.value)["reason"])] += 1
        status.dead_last_hour = reasons
    except KafkaError as err:
        status.problems.append(f"cannot read dead letters: {err}")
    finally:
        consumer.close()


def _read_rows(settings: Settings, status: Status) -> None:
    try:
        backend = open_reader(settings)
    except ClickHouseError as err:
        status.problems.append(f"cannot reach ClickHouse: {err}")
        return
    try:
        status.rows = {
            table_name(t): int(backend.query(f"SELECT count() FROM {table_name(t)}")[0][0])
            for t in (*EVENT_TYPES, *OUTPUT_MODELS)
        }
    except ClickHouseError as err:
        status.problems.append(f"cannot count ClickHouse rows: {err}")
    finally:
        backend.close()


def format_status(status: Status) -> str:
    lines = []
    if status.services:
        lines.append(f"{'service':<10} {'pid':>8} {'state':<8} {'uptime':>9} {'restarts':>8}")
        for s in status.services:
            uptime = f"{s.uptime_s:.0f} s" if s.uptime_s is not None else "-"
            state = "running" if s.running else "down"
            lines.append(f"{s.name:<10} {s.pid or '-':>8} {state:<8} {uptime:>9} {s.restarts:>8}")
    if status.lag:
        lines.append("")
        lines.append("consumer lag (messages not yet committed)")
        for (group, topic), lag in status.lag.items():
            shown = "no offsets yet" if lag is None else str(lag)
            lines.append(f"  {group} on {topic}: {shown}")
    if status.rows is not None:
        lines.append("")
        lines.append("rows in ClickHouse")
        lines.extend(f"  {table}: {n}" for table, n in status.rows.items())
    if status.dead_last_hour is not None:
        lines.append("")
        total = sum(status.dead_last_hour.values())
        lines.append(f"dead letters in the last hour: {total}")
        lines.extend(f"  {reason}: {n}" for reason, n in status.dead_last_hour.most_common())
    if status.problems:
        lines.append("")
        lines.extend(f"problem: {problem}" for problem in status.problems)
    return "\n".join(lines)


def status_as_json(status: Status) -> dict[str, Any]:
    return {
        "up_running": status.up_running,
        "services": [s.__dict__ for s in status.services],
        "lag": [{"group": g, "topic": t, "lag": n} for (g, t), n in status.lag.items()],
        "rows": status.rows,
        "dead_last_hour": dict(status.dead_last_hour or {}),
        "problems": status.problems,
    }
