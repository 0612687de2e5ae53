"""The SDK's spool: events wait here, in order, until a transport confirms them.

Why a spool: an event must survive a collector or broker outage and a restart of the host
application, and ``emit`` must never wait on the network. ``emit`` appends here; one sender
thread reads the oldest records, sends them, and removes them only once they are confirmed.

Why SQLite (stdlib ``sqlite3``): one file with atomic appends and deletes, crash-safe without
any code of ours. WAL mode with ``synchronous=NORMAL`` makes a commit one append to the log
without an fsync: a record survives the process dying at any instant (the operating system
holds the write), not a power cut in the last moments before a checkpoint. The file is held
with an exclusive lock (``locking_mode=EXCLUSIVE``), so two processes never send one spool
twice over; a second opener gets ``SpoolInUse``.

Bounded in bytes: the keys and values held never exceed ``max_bytes``; to make room, the oldest
records are dropped and counted. (The file is larger by SQLite's page overhead, and keeps its
high-water size; the log is truncated to ``_WAL_LIMIT_BYTES`` after each checkpoint.)

The file holds events as the user's consent lets them leave the client, raw ids included, so it
is created readable by its owner alone (mode 0600; SQLite gives its log the same mode).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, NamedTuple

_FORMAT_VERSION: Final = 1
"""``PRAGMA user_version`` of a spool file; another value is a file this code cannot read."""
_WAL_LIMIT_BYTES: Final = 4 * 1024 * 1024


class Record(NamedTuple):
    """One event as a transport sends it: the partition key and the encoded event."""

    key: bytes
    value: bytes


class Spooled(NamedTuple):
    """A record with its place in the spool (increasing, never reused)."""

    seq: int
    record: Record


class SpoolInUse(RuntimeError):
    """Another process (or another open spool in this one) holds this spool file."""


class SpoolFormatError(RuntimeError):
    """The file is not a spool this code can read."""


class Spool:
    """Records in append order, bounded in bytes, on disk at ``path`` or in memory if None.

    Safe for concurrent use from several threads: every method runs under one lock and none
    touches the network, so each returns in the time of a local SQLite statement.
    """

    def __init__(self, path: Path | None, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._dropped = 0
        if path is None:
            target = ":memory:"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            target = str(path)
        # The sender thread and the emitting threads share this connection, under self._lock;
        # autocommit mode, so every transaction below is explicit.
        self._db = sqlite3.connect(target, timeout=0, check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except sqlite3.DatabaseError as err:
            self._db.close()
            if "locked" in str(err) or "busy" in str(err):
                raise SpoolInUse(f"the spool {path} is open elsewhere") from None
            raise SpoolFormatError(f"{path} is not a spool: {err}") from None
        except BaseException:
            self._db.close()
            raise
        used, count, newest = self._db.execute(
            "SELECT COALESCE(SUM(length(key) + length(value)), 0), COUNT(*), COALESCE(MAX(seq), 0)"
            " FROM records"
        ).fetchone()
        self._bytes: int = used
        self._count: int = count
        self._newest: int = newest

    def _open(self) -> None:
        """Take the file for this object alone, then create or check the table."""
        if self.path is not None:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no shared memory
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
        self._db.execute("BEGIN IMMEDIATE")  # the first write takes the lock, and keeps it
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _FORMAT_VERSION):
                raise SpoolFormatError(f"{self.path} is a spool of format {version}")
            # AUTOINCREMENT: a seq is never reused, even once the table has been emptied, so
            # removing a confirmed seq can never remove a newer record.
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS records ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB NOT NULL, value BLOB NOT NULL)"
            )
            self._db.execute(f"PRAGMA user_version={_FORMAT_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._rollback()
            raise
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not undone it already (disk full)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    @property
    def count(self) -> int:
        """Records held now."""
        return self._count

    @property
    def bytes_used(self) -> int:
        """Bytes of keys and values held now (the quantity ``max_bytes`` bounds)."""
        return self._bytes

    @property
    def dropped(self) -> int:
        """Records this object dropped, unsent, to make room (or too large to hold at all)."""
        return self._dropped

    @property
    def newest_seq(self) -> int:
        """The seq of the last record appended (0 before any)."""
        return self._newest

    def append(self, record: Record) -> None:
        """Add a record at the end, first dropping the oldest ones while it would not fit.

        A record larger than ``max_bytes`` is itself dropped (and counted). Raises
        ``sqlite3.Error`` only if the disk fails; then nothing has changed.
        """
        size = len(record.key) + len(record.value)
        with self._lock:
            if size > self.max_bytes:
                self._dropped += 1
                return
            with self._transaction() as db:
                freed, dropped = self._make_room(db, self._bytes + size - self.max_bytes)
                cursor = db.execute(
                    "INSERT INTO records (key, value) VALUES (?, ?)", (record.key, record.value)
                )
            self._bytes += size - freed
            self._count += 1 - dropped
            self._dropped += dropped
            self._newest = cursor.lastrowid or self._newest

    def _make_room(self, db: sqlite3.Connection, needed: int) -> tuple[int, int]:
        """Delete the oldest records until ``needed`` bytes are free; (bytes, records) freed."""
        if needed <= 0:
            return 0, 0
        freed = dropped = 0
        last = 0
        for seq, size in db.execute(
            "SELECT seq, length(key) + length(value) FROM records ORDER BY seq"
        ):
            freed, dropped, last = freed + size, dropped + 1, seq
            if freed >= needed:
                break
        db.execute("DELETE FROM records WHERE seq <= ?", (last,))
        return freed, dropped

    def peek(self, max_records: int, max_bytes: int) -> list[Spooled]:
        """The oldest records, at most ``max_records`` and ``max_bytes`` of keys and values
        (but always at least one, whatever its size, so a big record cannot stall the spool)."""
        out: list[Spooled] = []
        total = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, key, value FROM records ORDER BY seq LIMIT ?", (max_records,)
            ).fetchall()
        for seq, key, value in rows:
            total += len(key) + len(value)
            if out and total > max_bytes:
                break
            out.append(Spooled(seq, Record(bytes(key), bytes(value))))
        return out

    def remove_delivered(self, seqs: Sequence[int]) -> None:
        """Forget records the transport has confirmed (or refused for good).

        One that is gone already was dropped for room while it was being sent; it was
        delivered after all, so it leaves the drop count.
        """
        if not seqs:
            return
        with self._lock:
            with self._transaction() as db:
                marks = ",".join("?" * len(seqs))
                found, size = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(length(key) + length(value)), 0)"
                    f" FROM records WHERE seq IN ({marks})",
                    tuple(seqs),
                ).fetchone()
                db.execute(f"DELETE FROM records WHERE seq IN ({marks})", tuple(seqs))
            self._bytes -= size
            self._count -= found
            self._dropped -= len(set(seqs)) - found

    def oldest_seq(self) -> int | None:
        """The seq of the oldest record held, or None when the spool is empty."""
        with self._lock:
            oldest: int | None = self._db.execute("SELECT MIN(seq) FROM records").fetchone()[0]
        return oldest

    def close(self) -> None:
        """Close the file (records stay in it for the next opener); idempotent."""
        with self._lock:
            self._db.close()
