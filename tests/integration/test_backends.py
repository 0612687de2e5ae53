"""The ClickHouse backend contract, run on embedded chdb (26.9) and the Debian server (18.16).

Every statement here is written once and must run unchanged on both versions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from math import inf, isnan, nan
from pathlib import Path
from typing import Any

import pytest

from deploy.clickhouse import ClickHouseServer, tally_user_password
from sinks.backends import ClickHouseBackend, ClickHouseError, EmbeddedClickHouse, ServerClickHouse
from tests.clickhouse_fixtures import CLICKHOUSE_STATE_DIR, unique_database_name

pytestmark = pytest.mark.clickhouse

EVENTS_DDL = """
CREATE TABLE events (
    t DateTime('UTC'),
    day Date,
    event_id String,
    user_id String,
    country Nullable(String),
    duration_ms UInt32,
    score Float64,
    kind Enum8('login' = 1, 'logout' = 2, 'quality' = 3)
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(t)
ORDER BY (t, event_id)
"""

DAILY_USERS_DDL = """
CREATE TABLE daily_users (
    day Date,
    kind Enum8('login' = 1, 'logout' = 2, 'quality' = 3),
    users AggregateFunction(uniq, String),
    events AggregateFunction(count)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY (day, kind)
"""

DAILY_USERS_MV_DDL = """
CREATE MATERIALIZED VIEW daily_users_mv TO daily_users AS
SELECT day, kind, uniqState(user_id) AS users, countState() AS events
FROM events
GROUP BY day, kind
"""

COLUMNS = ("t", "day", "event_id", "user_id", "country", "duration_ms", "score", "kind")


def _event(
    event_id: str,
    user_id: str,
    when: datetime,
    *,
    country: str | None = "NL",
    duration_ms: int = 120,
    score: float = 4.5,
    kind: str = "login",
) -> tuple[Any, ...]:
    return (when, when.date(), event_id, user_id, country, duration_ms, score, kind)


DAY_1 = datetime(2026, 11, 27, 9, 30, 15, tzinfo=UTC)
DAY_2 = datetime(2026, 11, 28, 23, 59, 59, tzinfo=UTC)
ROWS = [
    _event("e1", "u1", DAY_1, country=None, duration_ms=0, score=0.0),
    _event("e2", "u2", DAY_1, duration_ms=4_294_967_295, score=-1.25, kind="logout"),
    _event("e3", "u1", DAY_2, country="DE", score=3.0, kind="quality"),
]


def _events_table(backend: ClickHouseBackend, rows: Sequence[Sequence[Any]] = ROWS) -> None:
    backend.execute(EVENTS_DDL)
    backend.insert("events", COLUMNS, rows)


def test_rows_read_back_with_the_python_types_they_were_written_with(
    backend: ClickHouseBackend,
) -> None:
    """Inserted rows come back equal, with the same Python types, on either backend."""
    _events_table(backend)

    got = backend.query(f"SELECT {', '.join(COLUMNS)} FROM events ORDER BY event_id")

    assert got == ROWS
    for got_row, want_row in zip(got, ROWS, strict=True):
        assert [type(value) for value in got_row] == [type(value) for value in want_row]
    assert all(row[0].tzinfo is UTC for row in got)
    assert got[0][4] is None


def test_functions_over_utc_datetimes_agree(backend: ClickHouseBackend) -> None:
    """Day and partition functions see DateTime('UTC') values in UTC on both backends."""
    _events_table(backend)

    got = backend.query(
        "SELECT event_id, toYYYYMMDD(t), toDate(t), toHour(t), toUnixTimestamp(t) "
        "FROM events ORDER BY event_id"
    )

    assert got == [
        ("e1", 20261127, date(2026, 11, 27), 9, int(DAY_1.timestamp())),
        ("e2", 20261127, date(2026, 11, 27), 9, int(DAY_1.timestamp())),
        ("e3", 20261128, date(2026, 11, 28), 23, int(DAY_2.timestamp())),
    ]


def test_a_duplicate_insert_collapses_under_final(backend: ClickHouseBackend) -> None:
    """Re-inserting the same rows leaves one copy of each when read with FINAL."""
    _events_table(backend)
    backend.insert("events", COLUMNS, ROWS)

    assert backend.query("SELECT count() FROM events FINAL") == [(len(ROWS),)]
    final = backend.query(f"SELECT {', '.join(COLUMNS)} FROM events FINAL ORDER BY event_id")
    assert final == ROWS


def test_materialized_view_rolls_up_into_aggregating_merge_tree(
    backend: ClickHouseBackend,
) -> None:
    """A view feeds uniqState/countState rollups that uniqMerge with HAVING reads back."""
    backend.execute(EVENTS_DDL)
    backend.execute(DAILY_USERS_DDL)
    backend.execute(DAILY_USERS_MV_DDL)
    backend.insert("events", COLUMNS, ROWS)
    backend.insert(
        "events",
        COLUMNS,
        [_event("e4", "u3", DAY_1), _event("e5", "u2", DAY_1), _event("e6", "u3", DAY_2)],
    )

    # Aliasing uniqMerge(users) as `users` would shadow the column inside HAVING: 18.16 then
    # sees an aggregate within an aggregate (code 184) and 26.9 a UInt64 given to -Merge (43).
    got = backend.query(
        "SELECT day, uniqMerge(users) AS unique_users, countMerge(events) AS event_count "
        "FROM daily_users GROUP BY day HAVING uniqMerge(users) >= 2 ORDER BY day"
    )

    assert got == [(date(2026, 11, 27), 3, 4), (date(2026, 11, 28), 2, 2)]
    assert backend.query(
        "SELECT day, uniqMerge(users) FROM daily_users GROUP BY day HAVING uniqMerge(users) >= 3"
    ) == [(date(2026, 11, 27), 3)]


def test_drop_partition_removes_one_day(backend: ClickHouseBackend) -> None:
    """ALTER TABLE ... DROP PARTITION deletes exactly the rows of that day."""
    _events_table(backend)

    backend.execute("ALTER TABLE events DROP PARTITION 20261127")

    assert backend.query("SELECT event_id FROM events ORDER BY event_id") == [("e3",)]


def test_insert_of_no_rows_is_a_no_op(backend: ClickHouseBackend) -> None:
    """An empty batch inserts nothing and does not fail."""
    _events_table(backend, rows=[])

    assert backend.query("SELECT count() FROM events") == [(0,)]


def test_a_row_of_the_wrong_width_is_rejected_before_sending(backend: ClickHouseBackend) -> None:
    """A row with fewer values than columns raises ValueError naming the row."""
    backend.execute(EVENTS_DDL)

    with pytest.raises(ValueError, match="row 1 has 2 values"):
        backend.insert("events", COLUMNS, [ROWS[0], ("e9", "u9")])


def test_wider_types_read_back_alike(backend: ClickHouseBackend) -> None:
    """UUID, arrays, LowCardinality, 64-bit extremes and special floats match on both."""
    backend.execute(
        "CREATE TABLE wide (id UUID, tags Array(String), marks Array(Nullable(UInt8)), "
        "browser LowCardinality(String), big UInt64, small Int64, ratio Float32, "
        "peak Float64, dip Float64, on UInt8) ENGINE = MergeTree() ORDER BY id"
    )
    event_uuid = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    backend.insert(
        "wide",
        ["id", "tags", "marks", "browser", "big", "small", "ratio", "peak", "dip", "on"],
        [(event_uuid, ["a", "b"], [1, None], "Firefox", 2**64 - 1, -(2**63), 0.1, inf, nan, True)],
    )

    [row] = backend.query("SELECT * FROM wide")

    assert row[:8] == (
        uuid.UUID(event_uuid),
        ["a", "b"],
        [1, None],
        "Firefox",
        2**64 - 1,
        -(2**63),
        0.10000000149011612,
        inf,
    )
    assert isnan(row[8])
    assert row[9] == 1


PORTABLE_EXPRESSIONS = {
    "utc": "toDateTime('2026-11-28 12:00:00', 'UTC')",
    "berlin": "toDateTime('2026-11-28 12:00:00', 'Europe/Berlin')",
    "zoneless": "toDateTime('2026-11-28 12:00:00')",
    "date": "toDate('2026-11-28')",
    "null": "CAST(NULL AS Nullable(UInt32))",
    "float32": "toFloat32(0.1)",
    "decimal": "toDecimal64(2.5, 3)",
    "tuple": "tuple(1, 'x', toDate('2026-11-28'))",
    "datetimes": "[toDateTime('2026-11-28 12:00:00', 'UTC')]",
    "fixed": "toFixedString('ab', 4)",
    "uuid": "toUUID('6ba7b810-9dad-11d1-80b4-00c04fd430c8')",
    "enum": "CAST('b' AS Enum8('a' = 1, 'b' = 2))",
    "int8": "toInt8(-1)",
    "uint64": "toUInt64(18446744073709551615)",
    "nullable_array": "[NULL, 1]",
}


def test_backends_return_identical_values_for_the_same_select(
    clickhouse_server: ClickHouseServer, tmp_path: Path
) -> None:
    """One SELECT over many types gives equal values of equal Python types on both backends."""
    select = "SELECT " + ", ".join(f"{sql} AS {name}" for name, sql in PORTABLE_EXPRESSIONS.items())
    database = unique_database_name()
    with EmbeddedClickHouse(tmp_path / "chdb", database=database) as embedded:
        [from_embedded] = embedded.query(select)
    with ServerClickHouse(clickhouse_server.host, clickhouse_server.tcp_port) as server:
        [from_server] = server.query(select)

    assert from_embedded == from_server
    assert [type(value) for value in from_embedded] == [type(value) for value in from_server]
    by_name = dict(zip(PORTABLE_EXPRESSIONS, from_server, strict=True))
    assert by_name["berlin"] == datetime(2026, 11, 28, 11, 0, tzinfo=UTC)
    assert by_name["berlin"].tzinfo is UTC
    assert by_name["zoneless"] == datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert by_name["decimal"] == Decimal("2.5")
    assert by_name["fixed"] == "ab"


@pytest.mark.parametrize(
    ("column", "value"),
    [("event_id", None), ("duration_ms", 1.5), ("duration_ms", -1), ("duration_ms", "7")],
    ids=["null-in-string", "float-in-uint32", "negative-in-uint32", "text-in-uint32"],
)
def test_a_value_that_does_not_fit_its_column_is_rejected(
    backend: ClickHouseBackend, column: str, value: Any
) -> None:
    """A value the column cannot hold raises ValueError, and nothing of the batch is written."""
    backend.execute(EVENTS_DDL)
    bad = list(ROWS[1])
    bad[COLUMNS.index(column)] = value

    with pytest.raises(ValueError, match=column):
        backend.insert("events", COLUMNS, [ROWS[0], tuple(bad)])

    assert backend.query("SELECT count() FROM events") == [(0,)]


@pytest.mark.parametrize(
    ("sql", "code"),
    [("SELECT * FROM no_such_table", 60), ("SELEKT 1", 62)],
    ids=["unknown-table", "syntax-error"],
)
def test_errors_carry_the_clickhouse_code(backend: ClickHouseBackend, sql: str, code: int) -> None:
    """A failing statement raises ClickHouseError with ClickHouse's own error code."""
    with pytest.raises(ClickHouseError) as raised:
        backend.query(sql)

    assert raised.value.code == code
    assert "Stack trace" not in str(raised.value)


def test_a_closed_backend_refuses_work(backend: ClickHouseBackend) -> None:
    """After close(), calls raise ClickHouseError and a second close() is harmless."""
    backend.close()
    backend.close()

    with pytest.raises(ClickHouseError, match="closed"):
        backend.query("SELECT 1")


def test_a_wrong_password_never_appears_in_the_error(
    clickhouse_server: ClickHouseServer,
) -> None:
    """A rejected password is not in the error's text, repr, or chained cause."""
    secret = "s3cret-Pa55word"

    with pytest.raises(ClickHouseError) as raised:
        ServerClickHouse(
            clickhouse_server.host,
            clickhouse_server.tcp_port,
            password=secret,
            database=unique_database_name(),
        )

    assert raised.value.code == 193
    chain: BaseException | None = raised.value
    while chain is not None:
        assert secret not in str(chain)
        assert secret not in repr(chain)
        chain = chain.__cause__


def test_a_password_user_connects_and_its_password_never_shows(
    clickhouse_server: ClickHouseServer,
) -> None:
    """The server's `tally` user connects with its password; repr() and a failed query name
    host, port, user and database, never the password."""
    secret = tally_user_password(CLICKHOUSE_STATE_DIR)
    backend = ServerClickHouse(
        clickhouse_server.host, clickhouse_server.tcp_port, user="tally", password=secret,
        database=unique_database_name(),
    )  # fmt: skip
    try:
        assert backend.query("SELECT count() > 0 FROM system.processes WHERE user = 'tally'") == [
            (1,)
        ]
        assert secret not in repr(backend) and "tally" in repr(backend)
        with pytest.raises(ClickHouseError) as raised:
            backend.query("SELECT * FROM no_such_table")
        assert secret not in str(raised.value) + repr(raised.value)
    finally:
        backend.execute(f"DROP DATABASE IF EXISTS {backend.database}")
        backend.close()


def test_embedded_clickhouse_keeps_the_process_ctrl_c_handler(tmp_path: Path) -> None:
    """With embedded ClickHouse open and queried in this process, Ctrl-C still reaches the
    process's own handler, which `tally run` and `tally up` stop by."""
    received: list[int] = []
    saved = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        with EmbeddedClickHouse(tmp_path / "chdb", database="signals") as embedded:
            embedded.query("SELECT 1")
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, saved)
    assert received == [signal.SIGINT]


def test_a_second_process_on_an_embedded_folder_is_told_who_owns_it(tmp_path: Path) -> None:
    """A folder open in one process is refused to another with the owner's pid, not chdb's
    opaque start-up error; once closed, it opens."""
    folder = tmp_path / "chdb"
    script = (
        "import sys; from pathlib import Path; from sinks.backends import EmbeddedClickHouse, "
        "EmbeddedInUseError\n"
        "try:\n    EmbeddedClickHouse(Path(sys.argv[1]), 'owned')\n"
        "except EmbeddedInUseError as err:\n    print(err); sys.exit(3)\n"
    )
    with EmbeddedClickHouse(folder, database="owned"):
        other = subprocess.run([sys.executable, "-c", script, str(folder)],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert other.returncode == 3, other.stderr
    assert f"is in use by another process (pid {os.getpid()})" in other.stdout
    with EmbeddedClickHouse(folder, database="owned") as reopened:
        assert reopened.query("SELECT 1") == [(1,)]
