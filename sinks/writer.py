"""ClickHouseWriter: enriched records to rows, one insert per table per batch, each event once.

Exactly once, on both backends (18.16 has no insert deduplication tokens), by three checks:

- Offsets. Every row carries the Kafka topic, partition and offset it was read from. After
  a batch's inserts succeed, the writer records the last offset per partition in
  ``tally_sink_offsets`` (with the first batch, then every few seconds). A sink that replays
  (it crashed between insert and commit) skips the records at or below it
  (``stored_offsets``). The record is written after every table's insert, so a crash
  between two tables' inserts leaves it unwritten and the replay goes to the next check.
- Event ids. Rows whose event id is already stored (the stream step re-sent an event after a
  crash, under a new offset; a table's insert succeeded before a crash) and repeats within the
  batch are dropped before the insert: one query per table per batch, within the batch's
  event-time range (the tables' sort key). A duplicate carries the same key as its first copy,
  so it reaches the same sink partition; writers of one table must not run concurrently on the
  same partition.
- Erasures. Rows of a pseudonym in ``tally_erasures`` are never stored again, so a replay of
  the topics or a backfill after ``tally erase`` does not bring them back.

An error retrying cannot fix (a type mismatch, a missing table or column) is told apart from
a transient one: the rows it concerns are returned as rejected, found by halving the insert,
and the rest is written. A transient error is raised for the caller to retry the batch.
"""

import operator
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from schemas.enriched import ENRICHED_COLUMNS, table_name
from sinks.backends import (
    ClickHouseBackend,
    ClickHouseError,
    ClickHouseUnavailableError,
    sql_string,
)
from sinks.migrations import ERASURES_TABLE, SINK_OFFSETS_TABLE, SOURCE_COLUMNS

Row = tuple[Any, ...]
SourceOffsets = dict[tuple[str, int], int]
"""The last offset of a batch per (topic, partition)."""


class RecordOutOfContract(ValueError):
    """An enriched record that cannot be a row of its table (names no value)."""


_TABLE_ERRORS: Final = frozenset({16, 60, 81})
"""No such column, table or database: every row of the table is refused, no halving."""
_ROW_ERRORS: Final = frozenset({
    6, 26, 27, 32, 38, 41, 43, 44, 53, 69, 70, 72, 117, 130, 349, 386,
})  # fmt: skip
"""Errors in the data (cannot parse, type mismatch, value out of range, NULL in a plain
column, ...): the same rows fail again however often they are retried."""


def is_permanent(error: Exception) -> bool:
    """Whether retrying the same insert could never succeed."""
    if isinstance(error, ClickHouseUnavailableError):
        return False
    if isinstance(error, ValueError):  # the backend could not encode a value for its column
        return True
    if isinstance(error, ClickHouseError):
        return error.code in _TABLE_ERRORS or error.code in _ROW_ERRORS
    return False


_VALUES_OF = {
    event_type: operator.itemgetter(*(name for name, _ in columns))
    for event_type, columns in ENRICHED_COLUMNS.items()
}
_DATETIMES_AT = {
    event_type: [n for n, (_, ch_type) in enumerate(columns) if ch_type.startswith("DateTime")]
    for event_type, columns in ENRICHED_COLUMNS.items()
}
ROW_COLUMNS: Final = {
    event_type: [name for name, _ in columns] + [name for name, _ in SOURCE_COLUMNS]
    for event_type, columns in ENRICHED_COLUMNS.items()
}


def to_row(record: Mapping[str, Any]) -> tuple[str, Row]:
    """The table and the row of one enriched record, columns in table order (without the
    source columns, which ``with_source`` adds)."""
    try:
        event_type = record["event_type"]
        values = list(_VALUES_OF[event_type](record))  # C speed: a fifth of a loop's time
        for at in _DATETIMES_AT[event_type]:
            values[at] = datetime.fromtimestamp(values[at], UTC)
        row = tuple(values)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        raise RecordOutOfContract("enriched record does not fit its table") from None
    return event_type, row


def with_source(row: Row, topic: str, partition: int, offset: int) -> Row:
    return (*row, topic, partition, offset)


def _position(event_type: str, name: str) -> int:
    return ROW_COLUMNS[event_type].index(name)


_ID_TIME_USER = {
    event_type: (
        _position(event_type, "event_id"),
        _position(event_type, "event_time"),
        _position(event_type, "user_pseudonym"),
    )
    for event_type in ENRICHED_COLUMNS
}
SOURCE_AT: Final = {
    event_type: (
        _position(event_type, "kafka_topic"),
        _position(event_type, "kafka_partition"),
        _position(event_type, "kafka_offset"),
    )
    for event_type in ENRICHED_COLUMNS
}


@dataclass
class WriteResult:
    written: int = 0
    rejected: list[tuple[str, Row]] = field(default_factory=list)
    """(event type, row) of the rows ClickHouse refused for good."""
    inserted: dict[str, list[Row]] = field(default_factory=dict)
    """The rows inserted, by event type."""


class ClickHouseWriter:
    """Writes batches of rows (with their source columns); one data part per table per call."""

    def __init__(self, backend: ClickHouseBackend, offsets_record_interval_s: float = 2.0) -> None:
        self.backend = backend
        self.offsets_record_interval_s = offsets_record_interval_s
        """Offsets are recorded with the first batch, then at most this often (a one-row
        insert costs as much as a third of a 5,000-row one); a replay of batches written
        since is caught by their event ids instead."""
        self._pending_offsets: SourceOffsets = {}
        self._offsets_recorded_at = -float("inf")
        self.duplicates_skipped = 0
        self.erased_skipped = 0
        self.written_by_type: Counter[str] = Counter()
        """Rows inserted, by event type (``session_summary`` for the stream's summaries)."""

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """The last offset per partition of ``topic`` whose batch is wholly stored."""
        rows = self.backend.query(
            f"SELECT kafka_partition, max(kafka_offset) FROM {SINK_OFFSETS_TABLE} "
            f"WHERE kafka_topic = {sql_string(topic)} GROUP BY kafka_partition"
        )
        return {int(partition): int(offset) for partition, offset in rows}

    def write(
        self, rows_by_type: Mapping[str, list[Row]], source_offsets: SourceOffsets | None = None
    ) -> WriteResult:
        """Insert the rows not stored yet, then record ``source_offsets`` as stored (with
        those of earlier calls not recorded yet; see ``offsets_record_interval_s``).

        Raises the backend's error when it may pass (ClickHouse unreachable, overloaded):
        retry the whole call, which skips what an earlier attempt stored.
        """
        result = WriteResult()
        erased = self._erased()
        for event_type, rows in rows_by_type.items():
            kept = self._not_erased(event_type, rows, erased)
            fresh = self._not_stored(event_type, kept)
            self.duplicates_skipped += len(kept) - len(fresh)
            if fresh:
                refused_before = len(result.rejected)
                written = self._insert(event_type, fresh, result.rejected)
                result.written += written
                self.written_by_type[event_type] += written
                refused = {id(row) for _, row in result.rejected[refused_before:]}
                result.inserted[event_type] = (
                    [row for row in fresh if id(row) not in refused] if refused else fresh
                )
        if source_offsets:
            self._pending_offsets.update(source_offsets)
        if self._pending_offsets and (
            time.monotonic() - self._offsets_recorded_at >= self.offsets_record_interval_s
        ):
            now = datetime.now(UTC)
            self.backend.insert(
                SINK_OFFSETS_TABLE,
                ["kafka_topic", "kafka_partition", "kafka_offset", "written_at"],
                [(topic, partition, offset, now)
                 for (topic, partition), offset in sorted(self._pending_offsets.items())],
            )  # fmt: skip
            self._pending_offsets = {}
            self._offsets_recorded_at = time.monotonic()
        return result

    def _insert(self, event_type: str, rows: list[Row], rejected: list[tuple[str, Row]]) -> int:
        """Insert, halving around rows ClickHouse refuses for good; returns rows written."""
        try:
            self.backend.insert(table_name(event_type), ROW_COLUMNS[event_type], rows)
            return len(rows)
        except (ClickHouseError, ValueError) as err:
            if not is_permanent(err):
                raise
            if len(rows) == 1 or (isinstance(err, ClickHouseError) and err.code in _TABLE_ERRORS):
                rejected.extend((event_type, row) for row in rows)
                return 0
        middle = len(rows) // 2
        return self._insert(event_type, rows[:middle], rejected) + self._insert(
            event_type, rows[middle:], rejected
        )

    def _erased(self) -> frozenset[str]:
        return frozenset(row[0] for row in self.backend.query(
            f"SELECT user_pseudonym FROM {ERASURES_TABLE}"
        ))  # fmt: skip

    def _not_erased(self, event_type: str, rows: list[Row], erased: frozenset[str]) -> list[Row]:
        if not erased:
            return rows
        user_at = _ID_TIME_USER[event_type][2]
        kept = [row for row in rows if row[user_at] not in erased]
        self.erased_skipped += len(rows) - len(kept)
        return kept

    def _not_stored(self, event_type: str, rows: list[Row]) -> list[Row]:
        id_at, time_at, _ = _ID_TIME_USER[event_type]
        seen: set[str] = set()
        unique = []
        for row in rows:
            if row[id_at] not in seen:
                seen.add(row[id_at])
                unique.append(row)
        if not unique:
            return []
        times = [int(row[time_at].timestamp()) for row in unique]
        stored = {
            event_id
            for (event_id,) in self.backend.query_with_strings(
                f"SELECT event_id FROM {table_name(event_type)} "
                f"WHERE event_time >= toDateTime({min(times)}) "
                f"AND event_time <= toDateTime({max(times)}) "
                "AND event_id IN (SELECT value FROM {strings})",
                [row[id_at] for row in unique],
            )
        }
        return [row for row in unique if row[id_at] not in stored]

    def write_records(
        self, records: Iterable[Mapping[str, Any]], topic: str = "", partition: int = 0
    ) -> int:
        """Write records without a Kafka source (tests, backfills): offsets read 0."""
        grouped: dict[str, list[Row]] = defaultdict(list)
        for record in records:
            event_type, row = to_row(record)
            grouped[event_type].append(with_source(row, topic, partition, 0))
        result = self.write(grouped)
        if result.rejected:
            raise RecordOutOfContract(f"{len(result.rejected)} rows refused by ClickHouse")
        return result.written
