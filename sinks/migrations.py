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
from schemas.summaries import OUTPUT_MODELS
from sinks.analyst_views import (
    ANALYST_VIEWS,
    MIRROR_CLUSTER,
    analyst_views_ddl,
    server_mirror_ddl,
)
from sinks.backends import ClickHouseBackend
from sinks.rollups import rollups_ddl

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "tally_migrations"
DEFAULT_MIN_USERS = 10
STORED_TYPES = (*EVENT_TYPES, *OUTPUT_MODELS)
"""Every type with an event-level table: the clients' events and the stream's summaries."""
SOURCE_COLUMNS = (
    ("kafka_topic", "String"),
    ("kafka_partition", "UInt32"),
    ("kafka_offset", "UInt64"),
)
"""Where the sink read each row: an audit trail from a row back to its enriched record."""
SINK_OFFSETS_TABLE = "tally_sink_offsets"
"""The enriched offsets whose records are all stored, one row per partition per batch."""
ERASURES_TABLE = "tally_erasures"
"""Pseudonyms erased (``tally erase``), whose rows the writer never stores again."""


def event_table_ddl(event_type: str) -> str:
    """One table per event type. The writer inserts each event id once (``sinks.writer``),
    so plain ``count()`` and materialized views count each event once; ReplacingMergeTree
    keyed by event id is the second line of defence (read with FINAL)."""
    declared = ENRICHED_COLUMNS[event_type]
    columns = ",\n    ".join(f"{name} {ch_type}" for name, ch_type in declared)
    return (
        f"CREATE TABLE IF NOT EXISTS {table_name(event_type)} (\n    {columns}\n)\n"
        "ENGINE = ReplacingMergeTree()\n"
        "PARTITION BY toYYYYMMDD(event_time)\n"
        "ORDER BY (event_time, event_id)"
    )


def add_source_columns(backend: ClickHouseBackend) -> list[str]:
    """The Kafka source of each row, on tables made before the sink recorded it (older rows
    read topic '' and offset 0)."""
    statements = []
    for event_type in STORED_TYPES:
        table = table_name(event_type)
        existing = {name for name, _ in table_columns(backend, table)}
        for name, ch_type in SOURCE_COLUMNS:
            if name not in existing:
                statements.append(f"ALTER TABLE {table} ADD COLUMN {name} {ch_type}")
    return statements


def sink_bookkeeping_ddl() -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {SINK_OFFSETS_TABLE} (kafka_topic String, "
        "kafka_partition UInt32, kafka_offset UInt64, written_at DateTime('UTC')) "
        "ENGINE = MergeTree() PARTITION BY toYYYYMM(written_at) "
        "ORDER BY (kafka_topic, kafka_partition, kafka_offset)",
        f"CREATE TABLE IF NOT EXISTS {ERASURES_TABLE} (user_pseudonym String, "
        "erased_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY user_pseudonym",
    ]


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
    Migration(4, "sink_source_and_bookkeeping", lambda b: [*add_source_columns(b),
                                                           *sink_bookkeeping_ddl()]),
    Migration(5, "hourly_rollups", lambda _: rollups_ddl()),
)  # fmt: skip


def applied_versions(backend: ClickHouseBackend) -> set[int]:
    backend.execute(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
        "(version UInt32, name String, applied_at DateTime('UTC')) "
        "ENGINE = MergeTree() ORDER BY version"
    )
    return {row[0] for row in backend.query(f"SELECT version FROM {MIGRATIONS_TABLE}")}


def apply_migrations(backend: ClickHouseBackend, min_users: int = DEFAULT_MIN_USERS) -> list[int]:
    """Apply the migrations not yet recorded, then make the analyst views afresh for
    ``min_users``; returns the versions applied now.

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
    for statement in analyst_views_ddl(min_users):
        backend.execute(statement)
    if backend.name == "server":
        _mirror_analyst_views(backend)
    return applied


def _mirror_analyst_views(backend: ClickHouseBackend) -> None:
    """The analyst user's copy of the views, where the server has the loopback cluster."""
    clusters = backend.query(
        f"SELECT count() FROM system.clusters WHERE cluster = '{MIRROR_CLUSTER}'"
    )
    if not clusters[0][0]:
        log.warning(
            "the server defines no cluster %s in remote_servers: the analyst database is "
            "not made (deploy/clickhouse/config.xml shows the definition)",
            MIRROR_CLUSTER,
        )
        return
    described = {
        view.name: [(row[0], row[1]) for row in backend.query(f"DESCRIBE TABLE {view.name}")]
        for view in ANALYST_VIEWS
    }
    for statement in server_mirror_ddl(backend.database, described):
        backend.execute(statement)
