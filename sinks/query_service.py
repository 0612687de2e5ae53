"""Read-only queries into the embedded ClickHouse that a sink process owns.

chdb lets one process at a time open a data folder, and under ``tally up`` that process is the
sink. So the sink answers SELECTs for the others (``tally status``, ``tally report``) over HTTP
on loopback, behind a random token that only readers of the state folder know (the
connection file is mode 0600). Only statements that read are accepted; the engine is shared
with the writer under one lock, since a backend is not safe for concurrent use.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from sinks.backends import ClickHouseBackend, ClickHouseError, rows_from_json_compact

log = logging.getLogger(__name__)

_READING = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS)\b", re.IGNORECASE)
MAX_QUERY_BYTES = 64 * 1024


class JsonCompactSource(Protocol):
    def query_json_compact(self, sql: str) -> bytes: ...


class SerializedBackend:
    """A backend whose calls, from any thread, run one at a time."""

    def __init__(self, backend: ClickHouseBackend) -> None:
        self.backend = backend
        self.name = backend.name
        self.database = backend.database
        self.lock = threading.Lock()

    def execute(self, sql: str) -> None:
        with self.lock:
            self.backend.execute(sql)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.backend.query(sql)

    def query_with_strings(self, sql: str, strings: Sequence[str]) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.backend.query_with_strings(sql, strings)

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        with self.lock:
            self.backend.insert(table, columns, rows)

    def query_json_compact(self, sql: str) -> bytes:
        source: Any = self.backend
        with self.lock:
            return bytes(source.query_json_compact(sql))

    def close(self) -> None:
        with self.lock:
            self.backend.close()


def is_read_only(sql: str) -> bool:
    """Whether ``sql`` is one statement that only reads."""
    return bool(_READING.match(sql)) and ";" not in sql.rstrip().rstrip(";")


class QueryService:
    """Serves ``POST /query`` (body: one SQL statement; ``Authorization: Bearer TOKEN``) on
    ``host``, answering ClickHouse's JSONCompact. Port 0 takes a free one (see ``url``)."""

    def __init__(
        self, source: JsonCompactSource, token: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        expected = f"Bearer {token}".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                given = self.headers.get("Authorization", "").encode()
                if self.path != "/query" or not hmac.compare_digest(given, expected):
                    self._answer(HTTPStatus.UNAUTHORIZED, b"unauthorized")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_QUERY_BYTES:
                    self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"query too large")
                    return
                sql = self.rfile.read(length).decode("utf-8", errors="replace")
                if not is_read_only(sql):
                    self._answer(HTTPStatus.FORBIDDEN, b"only one statement that reads")
                    return
                try:
                    payload = source.query_json_compact(sql)
                except ClickHouseError as err:
                    self._answer(HTTPStatus.BAD_REQUEST, str(err).encode()[:2000])
                    return
                self._answer(HTTPStatus.OK, payload)

            def _answer(self, status: HTTPStatus, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a line per query would drown the sink's log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="query-service", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/query"

    def __enter__(self) -> QueryService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class RemoteClickHouse:
    """The backend interface, read-only, over a sink's QueryService."""

    name = "embedded, through the sink"

    def __init__(self, url: str, token: str, database: str, timeout_s: float = 30.0) -> None:
        self.url = url
        self.database = database
        self._token = token
        self._timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"RemoteClickHouse(url={self.url!r})"

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        request = urllib.request.Request(
            self.url,
            data=sql.encode(),
            headers={"Authorization": f"Bearer {self._token}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return rows_from_json_compact(response.read())
        except urllib.error.HTTPError as err:
            raise ClickHouseError(None, err.read().decode(errors="replace")) from None
        except OSError as err:
            raise ClickHouseError(None, f"the sink at {self.url} does not answer: {err}") from None

    def answers(self) -> bool:
        try:
            self.query("SELECT 1")
        except ClickHouseError:
            return False
        return True

    def query_with_strings(self, sql: str, strings: Sequence[str]) -> list[tuple[Any, ...]]:
        raise ClickHouseError(None, "not served: the sink process owns embedded ClickHouse")

    def execute(self, sql: str) -> None:
        raise ClickHouseError(None, "read-only: the sink process owns embedded ClickHouse")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        raise ClickHouseError(None, "read-only: the sink process owns embedded ClickHouse")

    def close(self) -> None:
        pass
