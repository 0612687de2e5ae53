"""ClickHouseWriter: enriched records to rows, one insert per table per batch."""

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from schemas.enriched import ENRICHED_COLUMNS, table_name
from sinks.backends import ClickHouseBackend


class RecordOutOfContract(ValueError):
    """An enriched record that cannot be a row of its table (names no value)."""


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


class ClickHouseWriter:
    """Writes batches of enriched records; one data part per table per call.

    Idempotent by construction of the tables (ReplacingMergeTree on event id), so a batch
    retried after a failure or replayed after a crash never double counts.
    """

    def __init__(self, backend: ClickHouseBackend) -> None:
        self.backend = backend

    def write(self, rows_by_type: Mapping[str, list[tuple[Any, ...]]]) -> int:
        """Insert rows grouped by event type; raises the backend's error on failure."""
        written = 0
        for event_type, rows in rows_by_type.items():
            if rows:
                columns = [name for name, _ in ENRICHED_COLUMNS[event_type]]
                self.backend.insert(table_name(event_type), columns, rows)
                written += len(rows)
        return written

    def write_records(self, records: Iterable[Mapping[str, Any]]) -> int:
        grouped: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for record in records:
            event_type, row = to_row(record)
            grouped[event_type].append(row)
        return self.write(grouped)
