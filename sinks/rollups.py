"""Hourly service-quality rollups: materialized views from the event tables into
AggregatingMergeTree tables of aggregate states, and the SQL that reads them back.

A materialized view sees each insert once, so the rollups count each event once only
because the writer never inserts a stored event id twice (``sinks.writer``). They hold no
ids: unique users are ``uniq`` states of pseudonyms (exact below 65,536 a group, and a hash
cannot be turned back into a pseudonym), and events whose consent keeps no pseudonym count
in every total but never in unique users. Erasing a user's events leaves the rollups as
they are; retention drops their partitions by month.

Everything here runs unchanged on ClickHouse 18.16 and 26.9: -State/-Merge/-MergeState
combinators, ``-If`` for nullable inputs (no Nullable inside an AggregateFunction type).
"""

from dataclasses import dataclass
from typing import Final

from schemas.enriched import table_name

DIMENSIONS: Final = (
    "app_id", "channel", "software_version", "os_family", "browser_family", "device_class",
    "country_code",
)  # fmt: skip
"""The columns every rollup and analyst view is broken down by."""
QUANTILE_LEVELS: Final = (0.5, 0.95, 0.99)
_LEVELS = ", ".join(str(level) for level in QUANTILE_LEVELS)


@dataclass(frozen=True)
class Measure:
    """One aggregate of a rollup: its state column and how to read it."""

    name: str
    state: str
    """The -State expression over the event table's columns."""
    state_type: str
    merge: str
    """The -Merge function that turns states of this measure into its value."""

    @property
    def merge_state(self) -> str:
        """The -MergeState function: states of this measure into one state (for ``other``)."""
        function, _, rest = self.merge.partition("(")
        return f"{function}State({rest}" if rest else f"{function}State"


def _count(name: str, condition: str | None = None) -> Measure:
    if condition is None:
        return Measure(name, "countState()", "AggregateFunction(count)", "countMerge")
    return Measure(
        name, f"countIfState({condition})", "AggregateFunction(countIf, UInt8)", "countIfMerge"
    )


def _users() -> Measure:
    return Measure(
        "users",
        "uniqIfState(user_pseudonym, user_pseudonym != '')",
        "AggregateFunction(uniqIf, String, UInt8)",
        "uniqIfMerge",
    )


def _quantiles(name: str, column: str, ch_type: str) -> Measure:
    """Quantiles of a Nullable column over the rows where it is set."""
    return Measure(
        name,
        f"quantilesIfState({_LEVELS})(ifNull({column}, 0), isNotNull({column}))",
        f"AggregateFunction(quantilesIf({_LEVELS}), {ch_type}, UInt8)",
        f"quantilesIfMerge({_LEVELS})",
    )


@dataclass(frozen=True)
class Rollup:
    """An hourly rollup of one event table."""

    name: str
    source_type: str
    keys: tuple[tuple[str, str, str], ...]
    """(column, expression over the event table, ClickHouse type) beyond hour and DIMENSIONS."""
    measures: tuple[Measure, ...]

    @property
    def table(self) -> str:
        return f"rollup_{self.name}_hourly"

    @property
    def view(self) -> str:
        return f"rollup_{self.name}_hourly_mv"

    @property
    def key_columns(self) -> tuple[str, ...]:
        return ("hour", *DIMENSIONS, *(column for column, _, _ in self.keys))


ROLLUPS: Final = (
    Rollup(
        "logins",
        "login",
        (("outcome", "outcome", "String"),
         ("failure_reason", "ifNull(failure_reason, '')", "String")),
        (_count("logins"), _count("failures", "outcome = 'failure'"), _users()),
    ),
    Rollup(
        "sessions",
        "session_summary",
        (("session_kind", "ifNull(session_kind, '')", "String"),
         ("end_reason", "end_reason", "String"),
         ("quality_class", "quality_class", "String"),
         ("quality_reason", "quality_reason", "String")),
        (
            _count("sessions"),
            _count("started", "isNotNull(session_kind)"),
            _count("normal", "end_reason = 'normal'"),
            _count("dropped", "end_reason = 'dropped'"),
            _count("errored", "end_reason = 'error'"),
            _count("timed_out", "end_reason = 'timeout'"),
            _count("poor", "quality_class = 'poor'"),
            _users(),
            _quantiles("duration_ms", "server_duration_ms", "UInt32"),
            _quantiles("rtt_ms", "rtt_p50_ms", "Float32"),
            _quantiles("jitter_ms", "jitter_p50_ms", "Float32"),
            _quantiles("loss_pct", "loss_p50_pct", "Float32"),
            _quantiles("mos", "mos_estimate", "Float32"),
        ),
    ),
    Rollup(
        "clients",
        "client_info",
        (("platform", "platform", "String"),),
        (_count("reports"), _users()),
    ),
)  # fmt: skip
"""Logins and failures by reason; sessions by how they ended and how the call went (from the
stream step's summaries); the software, OSes and browsers in use."""


def rollup_ddl(rollup: Rollup) -> list[str]:
    """The aggregate table and the materialized view that fills it."""
    columns = [
        "hour DateTime('UTC')",
        *(f"{name} String" for name in DIMENSIONS),
        *(f"{column} {ch_type}" for column, _, ch_type in rollup.keys),
        *(f"{measure.name} {measure.state_type}" for measure in rollup.measures),
    ]
    selected = [
        "toStartOfHour(event_time) AS hour",
        *DIMENSIONS,
        *(f"{expression} AS {column}" for column, expression, _ in rollup.keys),
        *(f"{measure.state} AS {measure.name}" for measure in rollup.measures),
    ]
    joined = ",\n    ".join(columns)
    return [
        f"CREATE TABLE IF NOT EXISTS {rollup.table} (\n    {joined}\n)\n"
        "ENGINE = AggregatingMergeTree()\n"
        "PARTITION BY toYYYYMM(hour)\n"
        f"ORDER BY ({', '.join(rollup.key_columns)})",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {rollup.view} TO {rollup.table} AS\n"
        f"SELECT {', '.join(selected)}\n"
        f"FROM {table_name(rollup.source_type)}\n"
        f"GROUP BY {', '.join(rollup.key_columns)}",
    ]


def rollups_ddl() -> list[str]:
    return [statement for rollup in ROLLUPS for statement in rollup_ddl(rollup)]
