"""Two ClickHouse backends behind one small interface: embedded chdb and a server.

`EmbeddedClickHouse` runs ClickHouse 26.9 inside this process (chdb) on an on-disk folder;
`ServerClickHouse` talks the native protocol to a server (Debian's 18.16 in development and
CI). Both return query results with the same Python types, so sinks and their tests run
unchanged on either. SQL handed to them must run on both versions: FACTS.md lists what 18.16
lacks (TTL, DateTime64, Map, IPv4/IPv6, column codecs, insert deduplication tokens).
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import os
import re
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self
from zoneinfo import ZoneInfo

import orjson
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
from clickhouse_driver import Client
from clickhouse_driver import errors as driver_errors

_Row = tuple[Any, ...]
_Converter = Callable[[Any], Any]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CODE_AND_MESSAGE = re.compile(r"Code: (\d+)\.\s*(?:DB::Exception:\s*)?(.*)", re.DOTALL)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Set once per chdb session so JSONCompact output carries what the converters below expect.
_EMBEDDED_SESSION_SETTINGS = (
    "SET output_format_json_quote_64bit_integers = 0",
    "SET output_format_json_quote_decimals = 1",
    "SET output_format_json_quote_denormals = 1",
    "SET output_format_json_named_tuples_as_objects = 0",
    "SET output_format_json_validate_utf8 = 1",
    "SET date_time_output_format = 'unix_timestamp'",
    # The server config pins UTC; chdb would otherwise take the machine's zone.
    "SET session_timezone = 'UTC'",
)


class ClickHouseError(Exception):
    """A statement failed in ClickHouse; `code` is ClickHouse's error code when it gave one."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"ClickHouse error {self.code}: {self.message}"


class ClickHouseUnavailableError(ClickHouseError):
    """ClickHouse could not be reached or the connection broke: transient, worth a retry."""


class EmbeddedInUseError(ClickHouseError):
    """Another process has the embedded data folder open (one process per folder)."""


class ClickHouseBackend(Protocol):
    """A ClickHouse database that sinks write to and read from.

    Calls block until ClickHouse has finished. Not safe for concurrent use from several
    threads. Every failure raises ClickHouseError (ClickHouseUnavailableError when the
    backend cannot be reached). Results come back with the same Python types on every
    backend: int, float, str, bool, None for NULL, `date` for Date, and timezone-aware UTC
    `datetime` for DateTime whatever the column's zone.
    """

    name: str
    database: str

    def execute(self, sql: str) -> None:
        """Run a statement (DDL, INSERT ... SELECT, ALTER) and discard any result."""
        ...

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a SELECT and return its rows as tuples, in the order ClickHouse sent them."""
        ...

    def query_with_strings(self, sql: str, strings: Sequence[str]) -> list[tuple[Any, ...]]:
        """Run a SELECT in which ``{strings}`` names a one-column table (``value String``)
        holding ``strings``: a long IN list without parsing it as SQL text (a fifth of the
        time for 5,000 ids)."""
        ...

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows (values in `columns` order) with one INSERT statement.

        One call makes one data part per partition touched (up to about a million rows, the
        default max_insert_block_size), so callers batch. Values are
        str, int, float, bool, None (Nullable columns only), `date`, or timezone-aware
        `datetime`. Raises ValueError for a row of the wrong width or a value that cannot be
        encoded for its column, and ClickHouseError when ClickHouse rejects the data (an
        unknown Enum name, say); in every case nothing of the batch is written.
        """
        ...

    def close(self) -> None:
        """Release the connection or the embedded engine; safe to call twice."""
        ...


class _ClosesOnExit:
    """``with backend:`` closes it on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedClickHouse(_ClosesOnExit):
    """ClickHouse 26.9 in this process (chdb), with its data on disk under `path`.

    chdb allows one data folder per process at a time (opening a second path while one is
    open fails), and one process per folder (a second process fails with `Error initializing
    EmbeddedServer`). Close this backend before opening another path.
    """

    name: str = "embedded"

    def __init__(self, path: Path, database: str = "tally", *, wait_s: float = 0.0) -> None:
        self.path = path
        self.database = _identifier(database)
        self._column_types: dict[str, dict[str, str]] = {}
        self._session: Any = None
        path.mkdir(parents=True, exist_ok=True)
        self._owner = _own_folder(path, wait_s)
        # Imported here: the engine maps about 250 MB, which processes that never open
        # embedded ClickHouse (the stream worker, the collector) should not pay.
        from chdb import session as chdb_session

        try:
            # chdb's Session.__init__ has no annotations.
            self._session = chdb_session.Session(str(path))  # type: ignore[no-untyped-call]
        except RuntimeError as err:
            self._owner.close()
            raise _embedded_error(err) from err
        try:
            for statement in _EMBEDDED_SESSION_SETTINGS:
                self.execute(statement)
            self.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
            self.execute(f"USE `{self.database}`")
        except ClickHouseError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"EmbeddedClickHouse(path={str(self.path)!r}, database={self.database!r})"

    def execute(self, sql: str) -> None:
        """Run a statement; forgets cached table schemas, as it may have changed one."""
        self._column_types.clear()
        self._run(sql, "CSV")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a SELECT; values are rebuilt from JSONCompact by the `meta` column types."""
        return rows_from_json_compact(self.query_json_compact(sql))

    def query_with_strings(self, sql: str, strings: Sequence[str]) -> list[tuple[Any, ...]]:
        """The strings go in as an Arrow table read by the `Python()` table function."""
        tally_strings = pa.table({"value": pa.array(strings, type=pa.string())})  # noqa: F841
        payload = self._run(sql.format(strings="Python(tally_strings)"), "JSONCompact")
        return rows_from_json_compact(bytes(payload.bytes()))

    def query_json_compact(self, sql: str) -> bytes:
        """Run a SELECT and return ClickHouse's JSONCompact output as it is (for a process
        that queries through this one: see sinks/query_service.py)."""
        return bytes(self._run(sql, "JSONCompact").bytes())

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert through an Arrow table typed from the table's schema (`Python()` function)."""
        if not rows:
            return
        target = _table_name(table)
        names = [_identifier(column) for column in columns]
        _check_row_lengths(rows, len(names))
        column_types = self._table_column_types(target)
        arrays = []
        for name, values in zip(names, zip(*rows, strict=True), strict=True):
            if name not in column_types:
                raise ClickHouseError(16, f"there is no column {name!r} in table {table}")
            arrays.append(_arrow_column(name, values, column_types[name]))
        tally_rows = pa.Table.from_arrays(arrays, names=names)  # noqa: F841  # read by Python()
        column_list = ", ".join(f"`{name}`" for name in names)
        self._run(
            f"INSERT INTO {target} ({column_list}) SELECT {column_list} FROM Python(tally_rows)",
            "CSV",
        )

    def close(self) -> None:
        """Close the chdb session, which frees the data folder for another path or process."""
        if self._session is not None:
            self._session.close()
            self._session = None
        if not self._owner.closed:
            self._owner.close()  # releases the folder's lock

    def _run(self, sql: str, fmt: str) -> Any:
        if self._session is None:
            raise ClickHouseError(None, f"{self!r} is closed")
        try:
            return self._session.query(sql, fmt)
        except RuntimeError as err:
            raise _embedded_error(err) from err

    def _table_column_types(self, table: str) -> dict[str, str]:
        if table not in self._column_types:
            described = self.query(f"DESCRIBE TABLE {table}")
            self._column_types[table] = {row[0]: row[1] for row in described}
        return self._column_types[table]


class ServerClickHouse(_ClosesOnExit):
    """A ClickHouse server over the native protocol (clickhouse-driver).

    Creates `database` if missing and runs every statement in it. The password is kept
    out of `repr()` and scrubbed from error messages.
    """

    name: str = "server"

    def __init__(
        self,
        host: str,
        port: int,
        user: str = "default",
        password: str = "",
        database: str = "tally",
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.database = _identifier(database)
        self._password = password
        self._client: Any = None
        bootstrap = self._connect("default")
        try:
            bootstrap.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
            server_zone = bootstrap.execute("SELECT timezone()")[0][0]
        except _DRIVER_ERRORS as err:
            raise self._error(err) from self._cause(err)
        finally:
            bootstrap.disconnect()
        # Naive DateTime values from the driver are wall-clock times in the server's zone.
        self._server_zone = str(server_zone)
        self._client = self._connect(self.database)

    def __repr__(self) -> str:
        return (
            f"ServerClickHouse(host={self.host!r}, port={self.port}, user={self.user!r}, "
            f"database={self.database!r})"
        )

    def execute(self, sql: str) -> None:
        """Run a statement and discard any result."""
        self._call(sql)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a SELECT; DateTime values are normalized to timezone-aware UTC."""
        rows, column_types = self._call(sql, with_column_types=True)
        converters = [_driver_converter(kind, self._server_zone) for _, kind in column_types]
        return _convert_rows(rows, converters)

    def query_with_strings(self, sql: str, strings: Sequence[str]) -> list[tuple[Any, ...]]:
        """The strings go in as an external table of the query (native protocol)."""
        rows, column_types = self._call(
            sql.format(strings="tally_strings"),
            with_column_types=True,
            external_tables=[{
                "name": "tally_strings",
                "structure": [("value", "String")],
                "data": [{"value": value} for value in strings],
            }],
        )  # fmt: skip
        converters = [_driver_converter(kind, self._server_zone) for _, kind in column_types]
        return _convert_rows(rows, converters)

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert with `INSERT INTO t (columns) VALUES` and the rows, in one block, sent by
        column (the driver's columnar path: a fifth faster than by row)."""
        if not rows:
            return
        target = _table_name(table)
        names = [_identifier(column) for column in columns]
        _check_row_lengths(rows, len(names))
        column_list = ", ".join(f"`{name}`" for name in names)
        batch = rows if isinstance(rows, list | tuple) else list(rows)
        by_column = [list(values) for values in zip(*batch, strict=True)]
        try:
            self._call(f"INSERT INTO {target} ({column_list}) VALUES", by_column, columnar=True)
        except _DRIVER_ENCODING_ERRORS as err:
            # The driver encodes rows itself and fails with whatever its encoder raised.
            detail = self._misplaced_null(target, names, batch) or str(err)
            raise ValueError(f"cannot encode the rows for {table}: {detail}") from err

    def close(self) -> None:
        """Disconnect; a closed backend raises ClickHouseError on use."""
        if self._client is not None:
            self._client.disconnect()
            self._client = None

    def _misplaced_null(
        self, table: str, names: list[str], rows: Sequence[Sequence[Any]]
    ) -> str | None:
        """Name the first None sent to a non-Nullable column (the driver's error does not)."""
        types = {row[0]: row[1] for row in self.query(f"DESCRIBE TABLE {table}")}
        for index, name in enumerate(names):
            if _is_nullable(types.get(name, "Nullable(Nothing)")):
                continue
            for number, row in enumerate(rows):
                if row[index] is None:
                    return f"column {name!r} ({types[name]}) is not Nullable, row {number} has None"
        return None

    def _connect(self, database: str) -> Any:
        return Client(
            self.host,
            port=self.port,
            user=self.user,
            password=self._password,
            database=database,
            client_name="tally",
        )

    def _call(self, sql: str, params: Any = None, **kwargs: Any) -> Any:
        if self._client is None:
            raise ClickHouseError(None, f"{self!r} is closed")
        try:
            return self._client.execute(sql, params, **kwargs)
        except driver_errors.TypeMismatchError:
            raise
        except _DRIVER_ERRORS as err:
            raise self._error(err) from self._cause(err)

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "********") if self._password else text

    def _cause(self, err: BaseException) -> BaseException | None:
        """The driver's exception to chain, unless its text would reveal the password."""
        return None if self._password and self._password in str(err) else err

    def _error(self, err: BaseException) -> ClickHouseError:
        code = getattr(err, "code", None)
        code = code if isinstance(code, int) else None
        message = self._scrub(_trim_server_message(str(getattr(err, "message", None) or err)))
        if isinstance(err, _UNAVAILABLE_ERRORS):
            where = f"{self.host}:{self.port}"
            return ClickHouseUnavailableError(
                code, f"cannot reach ClickHouse at {where}: {message}"
            )
        return ClickHouseError(code, message)


_DRIVER_ERRORS = (driver_errors.Error, OSError, EOFError)
_UNAVAILABLE_ERRORS = (
    driver_errors.NetworkError,
    driver_errors.SocketTimeoutError,
    OSError,
    EOFError,
)
_DRIVER_ENCODING_ERRORS = (
    driver_errors.TypeMismatchError,
    TypeError,
    AttributeError,
    ValueError,
    OverflowError,
    struct.error,
)


def _identifier(name: str) -> str:
    """Accept only plain identifiers, so names can be spliced into SQL safely."""
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain ClickHouse identifier: {name!r}")
    return name


def _table_name(table: str) -> str:
    return ".".join(f"`{_identifier(part)}`" for part in table.split(".", 1))


def _check_row_lengths(rows: Sequence[Sequence[Any]], width: int) -> None:
    for index, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"row {index} has {len(row)} values for {width} columns: {row!r}")


def _embedded_error(err: BaseException) -> ClickHouseError:
    text = str(err)
    match = _CODE_AND_MESSAGE.search(text)
    if match is None:
        return ClickHouseError(None, _trim_server_message(text))
    return ClickHouseError(int(match.group(1)), _trim_server_message(match.group(2)))


def _trim_server_message(message: str) -> str:
    """Drop the server's stack trace (18.16 sends one with every exception)."""
    message = message.removeprefix("DB::Exception: ")
    return message.split(". Stack trace:", 1)[0].split("\nStack trace:", 1)[0].strip()


OWNER_FILE = "tally-owner.lock"


def _own_folder(path: Path, wait_s: float) -> Any:
    """Lock the data folder for this process (an flock, released when the process dies), so a
    second process gets a clear error naming the owner instead of chdb's
    ``Error initializing EmbeddedServer``. Waits up to ``wait_s`` for the owner to let go."""
    handle = (path / OWNER_FILE).open("a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise EmbeddedInUseError(
                    None, f"embedded ClickHouse in {path} is in use by another process ({owner})"
                ) from None
            time.sleep(0.1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def sql_string(value: str) -> str:
    """A ClickHouse string literal of any text."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rows_from_json_compact(payload: bytes) -> list[_Row]:
    """Rows of a JSONCompact result, with the types the backend interface promises."""
    if not payload:
        return []
    result = orjson.loads(payload)
    converters = [_json_converter(column["type"]) for column in result["meta"]]
    return _convert_rows(result["data"], converters)


def _convert_rows(rows: Sequence[Sequence[Any]], converters: list[_Converter | None]) -> list[_Row]:
    active = [(index, convert) for index, convert in enumerate(converters) if convert is not None]
    if not active:
        return [tuple(row) for row in rows]
    converted = []
    for row in rows:
        values = list(row)
        for index, convert in active:
            values[index] = convert(values[index])
        converted.append(tuple(values))
    return converted


def _parse_type(text: str) -> tuple[str, list[str]]:
    """Split `Name(arg, arg)` into its name and top-level arguments."""
    text = text.strip()
    start = text.find("(")
    if start < 0 or not text.endswith(")"):
        return text, []
    args: list[str] = []
    depth, quote, begin = 0, "", start + 1
    escaped = False
    for position in range(start + 1, len(text) - 1):
        char = text[position]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "'`\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[begin:position].strip())
            begin = position + 1
    args.append(text[begin : len(text) - 1].strip())
    return text[:start].strip(), [arg for arg in args if arg]


def _element_type(arg: str) -> str:
    """The type of a Tuple element, without the element's name if it has one."""
    match = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\s+(\S.*)", arg, re.DOTALL)
    return match.group(1) if match else arg


def _nullable(convert: _Converter | None) -> _Converter | None:
    if convert is None:
        return None
    return lambda value: None if value is None else convert(value)


def _each(convert: _Converter | None) -> _Converter | None:
    if convert is None:
        return None
    return lambda values: [convert(value) for value in values]


def _tuple_of(converters: list[_Converter | None]) -> _Converter:
    def convert(value: Any) -> tuple[Any, ...]:
        items = value.values() if isinstance(value, dict) else value
        return tuple(
            item if fn is None else fn(item) for item, fn in zip(items, converters, strict=True)
        )

    return convert


def _map_of(key: _Converter | None, val: _Converter | None) -> _Converter:
    def convert(value: dict[Any, Any]) -> dict[Any, Any]:
        return {
            (k if key is None else key(k)): (v if val is None else val(v)) for k, v in value.items()
        }

    return convert


def _float32(value: Any) -> float:
    """Widen as the driver does, so 0.1 reads back as 0.10000000149011612 on both backends."""
    return float(struct.unpack("f", struct.pack("f", float(value)))[0])


def _unix_seconds(value: Any) -> datetime:
    return datetime.fromtimestamp(int(value), UTC)


def _unix_fraction(value: Any) -> datetime:
    micros = (Decimal(value) * 1_000_000).to_integral_value()
    return _EPOCH + timedelta(microseconds=int(micros))


_WIDE_INTEGERS = frozenset({"Int128", "Int256", "UInt128", "UInt256"})
_JSON_SCALARS: dict[str, _Converter] = {
    "Float32": _float32,
    "Float64": float,
    "UUID": uuid.UUID,
    "Date": date.fromisoformat,
    "Date32": date.fromisoformat,
    "DateTime": _unix_seconds,
    "DateTime64": _unix_fraction,
    "IPv4": ipaddress.IPv4Address,
    "IPv6": ipaddress.IPv6Address,
}


@functools.lru_cache(maxsize=1024)
def _json_converter(type_text: str) -> _Converter | None:
    """How to turn a chdb JSONCompact value of this type into the driver's Python value.

    None means the JSON value is already right.
    """
    name, args = _parse_type(type_text)
    if name == "Nullable":
        return _nullable(_json_converter(args[0]))
    if name == "LowCardinality":
        return _json_converter(args[0])
    if name == "SimpleAggregateFunction":
        return _json_converter(args[-1])
    if name in _WIDE_INTEGERS:
        return int
    if name == "FixedString":
        return lambda value: value.rstrip("\0")
    if name.startswith("Decimal"):
        return Decimal
    if name == "Array":
        return _each(_json_converter(args[0]))
    if name == "Tuple":
        return _tuple_of([_json_converter(_element_type(arg)) for arg in args])
    if name == "Map":
        return _map_of(_json_converter(args[0]), _json_converter(args[1]))
    return _JSON_SCALARS.get(name)


@functools.lru_cache(maxsize=1024)
def _driver_converter(type_text: str, server_zone: str) -> _Converter | None:
    """How to normalize a clickhouse-driver value of this type; None means leave it."""
    name, args = _parse_type(type_text)
    if name == "Nullable":
        return _nullable(_driver_converter(args[0], server_zone))
    if name in ("LowCardinality", "SimpleAggregateFunction"):
        return _driver_converter(args[-1], server_zone)
    if name in ("DateTime", "DateTime64"):
        zone = ZoneInfo(server_zone)
        return lambda value: _as_utc(value, zone)
    if name == "Array":
        return _each(_driver_converter(args[0], server_zone))
    if name == "Tuple":
        elements = [_driver_converter(_element_type(arg), server_zone) for arg in args]
        return None if all(fn is None for fn in elements) else _tuple_of(elements)
    if name == "Map":
        key = _driver_converter(args[0], server_zone)
        val = _driver_converter(args[1], server_zone)
        return None if key is None and val is None else _map_of(key, val)
    return None


def _as_utc(value: datetime, server_zone: tzinfo) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=server_zone)
    return value.astimezone(UTC)


_ARROW_SCALARS: dict[str, Any] = {
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
    "Bool": pa.bool_(),
    "String": pa.string(),
    "FixedString": pa.string(),
    "UUID": pa.string(),
    "IPv4": pa.string(),
    "IPv6": pa.string(),
    "Enum8": pa.string(),
    "Enum16": pa.string(),
    "Date": pa.date32(),
    "Date32": pa.date32(),
    "DateTime": pa.timestamp("s", tz="UTC"),
}


@functools.lru_cache(maxsize=1024)
def _arrow_type(type_text: str) -> Any:
    """The Arrow type to build a column in, or None to let Arrow infer it.

    ClickHouse casts Arrow strings to Enum, UUID and IP columns on insert.
    """
    name, args = _parse_type(type_text)
    if name in ("Nullable", "LowCardinality"):
        return _arrow_type(args[0])
    if name == "DateTime64":
        precision = int(args[0])
        unit = "s" if precision == 0 else "ms" if precision <= 3 else "us"
        return pa.timestamp(unit if precision <= 6 else "ns", tz="UTC")
    if name == "Decimal" and len(args) == 2 and int(args[0]) <= 38:
        return pa.decimal128(int(args[0]), int(args[1]))
    if name == "Array":
        inner = _arrow_type(args[0])
        return None if inner is None else pa.list_(inner)
    return _ARROW_SCALARS.get(name)


def _arrow_column(name: str, values: Sequence[Any], type_text: str) -> Any:
    """Build one column, refusing what the driver refuses on the server backend.

    That is NULL in a non-Nullable column, and floats or strings in an integer column (Arrow
    would truncate 1.5 to 1 or parse "7"). Bools are accepted as integers, as the driver does.
    """
    arrow_type = _arrow_type(type_text)
    try:
        if arrow_type is not None and pa.types.is_integer(arrow_type):
            column = _integer_column(values, arrow_type)
        else:
            column = pa.array(values, type=arrow_type)
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError) as err:
        raise ValueError(f"column {name!r} ({type_text}): {err}") from err
    if column.null_count and not _is_nullable(type_text):
        raise ValueError(f"column {name!r} ({type_text}) is not Nullable but got None")
    return column


def _integer_column(values: Sequence[Any], arrow_type: Any) -> Any:
    try:
        inferred = pa.array(values)
    except OverflowError:
        # Only UInt64 values above 2**63 - 1 overflow Arrow's int64 inference.
        return pa.array(values, type=arrow_type)
    kind = inferred.type
    if not (pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind)):
        raise pa.ArrowTypeError(f"expected integers, got {kind}")
    return inferred.cast(arrow_type)


def _is_nullable(type_text: str) -> bool:
    name, args = _parse_type(type_text)
    if name == "LowCardinality":
        return _is_nullable(args[0])
    return name == "Nullable"
