"""Numbered ClickHouse migrations, applied in order and recorded in ``tally_migrations``.

DDL is rendered from ``schemas.enriched.ENRICHED_COLUMNS``, so a table cannot drift from its
event declaration. The SQL runs unchanged on ClickHouse 18.16 (Debian's server) and on the
current engine in chdb: no TTL, no codecs, no LowCardinality, no DateTime64.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.enriched import ENRICHED_COLUMNS, table_name
from schemas.events import EVENT_TYPES
from sinks.backends import ClickHouseBackend

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "tally_migrations"


def event_table_ddl(event_type: str) -> str:
    """One table per event type. ReplacingMergeTree keyed by event id makes every write
    idempotent: a replayed event collapses into its first copy (read with FINAL)."""
    columns = ",\n    ".join(f"{name} {ch_type}" for name, ch_type in ENRICHED_COLUMNS[event_type])
    return (
        f"CREATE TABLE IF NOT EXISTS {table_name(event_type)} (\n    {columns}\n)\n"
        "ENGINE = ReplacingMergeTree()\n"
        "PARTITION BY toYYYYMMDD(event_time)\n"
        "ORDER BY (event_time, event_id)"
    )


def table_columns(backend: ClickHouseBackend, table: str) -> list[tuple[str, str]]:
    """(name, type) of a table's columns in order, the same way on 18.16 and 26.9."""
    return [
        (name, ch_type)
        for name, ch_type in backend.query(
            "SELECT name, type FROM system.columns "
            f"WHERE database = currentDatabase() AND table = '{table}'"
        )
    ]


def add_declared_columns(backend: ClickHouseBackend) -> list[str]:
    """ALTERs adding the columns a later schema version declared (always optional, so
    Nullable) to tables made before it. Evolution only adds; nothing is dropped here."""
    statements = []
    for event_type in EVENT_TYPES:
        table = table_name(event_type)
        existing = {name for name, _ in table_columns(backend, table)}
        for name, ch_type in ENRICHED_COLUMNS[event_type]:
            if name not in existing:
                statements.append(f"ALTER TABLE {table} ADD COLUMN {name} {ch_type}")
    return statements


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: Callable[[ClickHouseBackend], list[str]]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "event_tables", lambda _: [event_table_ddl(t) for t in EVENT_TYPES]),
    Migration(2, "quality_sample_v2", add_declared_columns),
    Migration(3, "session_summary", lambda _: [event_table_ddl("session_summary")]),
)


def applied_versions(backend: ClickHouseBackend) -> set[int]:
    backend.execute(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
        "(version UInt32, name String, applied_at DateTime('UTC')) "
        "ENGINE = MergeTree() ORDER BY version"
    )
    return {row[0] for row in backend.query(f"SELECT version FROM {MIGRATIONS_TABLE}")}


def apply_migrations(backend: ClickHouseBackend) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied now.

    Every statement is idempotent (IF NOT EXISTS), so a run interrupted between a statement
    and its record is safely applied again.
    """
    done = applied_versions(backend)
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements(backend):
            backend.execute(statement)
        backend.insert(
            MIGRATIONS_TABLE,
            ["version", "name", "applied_at"],
            [(migration.version, migration.name, datetime.now(UTC))],
        )
        log.info("applied ClickHouse migration %04d_%s", migration.version, migration.name)
        applied.append(migration.version)
    return applied
