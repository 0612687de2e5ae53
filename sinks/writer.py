"""ClickHouseWriter: enriched records to rows, one insert per table per batch."""

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from schemas.enriched import ENRICHED_COLUMNS, table_name
from sinks.backends import ClickHouseBackend


class RecordOutOfContract(ValueError):
    """An enriched record that cannot be a row of its table (names no value)."""


def _quoted(value: str) -> str:
    """A ClickHouse string literal (event ids are validated UUIDs; quote them all the same)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _converter(ch_type: str) -> Any:
    if ch_type.startswith("DateTime"):
        return lambda v: datetime.fromtimestamp(v, UTC)
    return None


_CONVERTERS = {
    event_type: [(name, _converter(ch_type)) for name, ch_type in columns]
    for event_type, columns in ENRICHED_COLUMNS.items()
}


def to_row(record: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """The table and the row of one enriched record, columns in table order."""
    try:
        converters = _CONVERTERS[record["event_type"]]
        row = tuple(
            convert(record[name]) if convert else record[name] for name, convert in converters
        )
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        raise RecordOutOfContract("enriched record does not fit its table") from None
    return record["event_type"], row


_ID_AND_TIME = {
    event_type: (
        [n for n, _ in columns].index("event_id"),
        [n for n, _ in columns].index("event_time"),
    )
    for event_type, columns in ENRICHED_COLUMNS.items()
}


class ClickHouseWriter:
    """Writes batches of enriched records; one data part per table per call.

    Idempotent by event id: rows whose event id is already stored (a batch retried after a
    failure, replayed after a crash, or an event the stream step re-sent) and repeats within
    the batch are dropped before the insert, so plain ``count()`` and every materialized
    view count each event once. One query per table per batch finds the stored ids, within
    the batch's event-time range (the tables' sort key). A duplicate carries the same key as
    its first copy, so it reaches the same sink partition; writers of one table must not run
    concurrently on the same partition.
    """

    def __init__(self, backend: ClickHouseBackend) -> None:
        self.backend = backend
        self.duplicates_skipped = 0
        self.written_by_type: Counter[str] = Counter()
        """Rows inserted, by event type (``session_summary`` for the stream's summaries)."""

    def write(self, rows_by_type: Mapping[str, list[tuple[Any, ...]]]) -> int:
        """Insert the rows not stored yet, grouped by event type; returns how many were
        inserted. Raises the backend's error on failure (nothing of that table is written)."""
        written = 0
        for event_type, rows in rows_by_type.items():
            fresh = self._not_stored(event_type, rows)
            self.duplicates_skipped += len(rows) - len(fresh)
            if fresh:
                columns = [name for name, _ in ENRICHED_COLUMNS[event_type]]
                self.backend.insert(table_name(event_type), columns, fresh)
                written += len(fresh)
                self.written_by_type[event_type] += len(fresh)
        return written

    def _not_stored(self, event_type: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        id_at, time_at = _ID_AND_TIME[event_type]
        seen: set[str] = set()
        unique = []
        for row in rows:
            if row[id_at] not in seen:
                seen.add(row[id_at])
                unique.append(row)
        if not unique:
            return []
        times = [int(row[time_at].timestamp()) for row in unique]
        ids = ", ".join(_quoted(row[id_at]) for row in unique)
        stored = {
            event_id
            for (event_id,) in self.backend.query(
                f"SELECT event_id FROM {table_name(event_type)} "
                f"WHERE event_time >= toDateTime({min(times)}) "
                f"AND event_time <= toDateTime({max(times)}) AND event_id IN ({ids})"
            )
        }
        return [row for row in unique if row[id_at] not in stored]

    def write_records(self, records: Iterable[Mapping[str, Any]]) -> int:
        grouped: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for record in records:
            event_type, row = to_row(record)
            grouped[event_type].append(row)
        return self.write(grouped)
