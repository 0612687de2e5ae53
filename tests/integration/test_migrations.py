"""Migrations on both ClickHouse backends: tables agree with the schemas column for column."""

from schemas.enriched import ENRICHED_COLUMNS, table_name
from sinks.backends import ClickHouseBackend
from sinks.migrations import (
    MIGRATIONS,
    SOURCE_COLUMNS,
    STORED_TYPES,
    apply_migrations,
    table_columns,
)


def test_tables_match_the_declarations(backend: ClickHouseBackend):
    """After migrating, every event table has exactly the declared columns and types, then
    the Kafka source of the row."""
    assert apply_migrations(backend) == [m.version for m in MIGRATIONS]
    for event_type in STORED_TYPES:
        assert table_columns(backend, table_name(event_type)) == [
            *ENRICHED_COLUMNS[event_type],
            *SOURCE_COLUMNS,
        ]


def test_migrating_twice_changes_nothing(backend: ClickHouseBackend):
    """A second run applies nothing and records each migration once."""
    apply_migrations(backend)
    assert apply_migrations(backend) == []
    assert backend.query("SELECT count() FROM tally_migrations") == [(len(MIGRATIONS),)]


def test_a_table_from_before_a_new_version_gains_its_columns(backend: ClickHouseBackend):
    """Tables made before quality_sample v2 get its optional columns, in declared order."""
    old = [(n, t) for n, t in ENRICHED_COLUMNS["quality_sample"] if n not in ("mos", "codec")]
    columns = ", ".join(f"{n} {t}" for n, t in old)
    backend.execute(
        f"CREATE TABLE {table_name('quality_sample')} ({columns}) ENGINE = ReplacingMergeTree() "
        "PARTITION BY toYYYYMMDD(event_time) ORDER BY (event_time, event_id)"
    )
    apply_migrations(backend)
    assert table_columns(backend, table_name("quality_sample")) == [
        *ENRICHED_COLUMNS["quality_sample"],
        *SOURCE_COLUMNS,
    ]
