"""Retention: drop event-level partitions older than N days and rollup partitions older than M
days, whole partitions at a time (``ALTER TABLE ... DROP PARTITION``: no rewrite, no TTL,
which 18.16 lacks). Event tables are partitioned by day, rollups by month; a month goes when
its last day is past the rollup retention."""

import calendar
import logging
from dataclasses import dataclass
from datetime import date, timedelta

from schemas.enriched import table_name
from sinks.backends import ClickHouseBackend
from sinks.migrations import SINK_OFFSETS_TABLE, STORED_TYPES
from sinks.rollups import ROLLUPS

log = logging.getLogger(__name__)

DEFAULT_EVENT_DAYS = 90
DEFAULT_ROLLUP_DAYS = 400


@dataclass(frozen=True)
class DroppedPartition:
    table: str
    partition: str


def _partitions(backend: ClickHouseBackend, tables: list[str]) -> list[tuple[str, str]]:
    listed = ", ".join(f"'{table}'" for table in tables)
    return [
        (str(table), str(partition))
        for table, partition in backend.query(
            "SELECT DISTINCT table, partition FROM system.parts WHERE active "
            f"AND database = currentDatabase() AND table IN ({listed}) ORDER BY table, partition"
        )
    ]


def _day_of(partition: str) -> date:
    return date(int(partition[:4]), int(partition[4:6]), int(partition[6:8]))


def _last_day_of_month(partition: str) -> date:
    year, month = int(partition[:4]), int(partition[4:6])
    return date(year, month, calendar.monthrange(year, month)[1])


def drop_expired_partitions(
    backend: ClickHouseBackend,
    today: date,
    event_days: int = DEFAULT_EVENT_DAYS,
    rollup_days: int = DEFAULT_ROLLUP_DAYS,
) -> list[DroppedPartition]:
    """Drop what is past retention as of ``today`` (UTC); returns what went."""
    if event_days < 1 or rollup_days < 1:
        raise ValueError("retention must be at least one day")
    event_cutoff = today - timedelta(days=event_days)
    rollup_cutoff = today - timedelta(days=rollup_days)
    expired = [
        (table, partition)
        for table, partition in _partitions(backend, [table_name(t) for t in STORED_TYPES])
        if _day_of(partition) < event_cutoff
    ]
    expired += [
        (table, partition)
        for table, partition in _partitions(backend, [SINK_OFFSETS_TABLE])
        if _last_day_of_month(partition) < event_cutoff
    ]
    expired += [
        (table, partition)
        for table, partition in _partitions(backend, [rollup.table for rollup in ROLLUPS])
        if _last_day_of_month(partition) < rollup_cutoff
    ]
    dropped = []
    for table, partition in expired:
        backend.execute(f"ALTER TABLE {table} DROP PARTITION {int(partition)}")
        log.info("retention: dropped partition %s of %s", partition, table)
        dropped.append(DroppedPartition(table, partition))
    return dropped
