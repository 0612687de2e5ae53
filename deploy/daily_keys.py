"""The random keys of ``anonymous`` consent: one per UTC day, destroyed once the day is over.

An anonymous id's pseudonym is its HMAC under its day's key: 32 random bytes made when the
day is first needed, by whichever worker process asks first, under a file lock so that a
day never gets two keys. Once the day ended longer ago than the allowed lateness its key is
removed, and with it every way to recompute or link that day's pseudonyms, the operator's
included: nothing long-lived (the key ring) takes part. Events of a day without a key are
counted without ids; such a day never gets a key again.

The file (``settings.daily_keys_path``: mode 0600 in a folder made 0700) holds a line per
live day, ``day-YYYY-MM-DD:hex_secret:created_unix_s`` like the key ring's lines, and a
``finished:YYYY-MM-DD`` line: no day up to that one gets a key, even from a worker whose
clock is behind the one that destroyed it. Secrets leave this module only as ``HmacKey``
objects, whose repr hides them.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final

from deploy.keys import NEW_KEY_BYTES, file_signature, parse_key_line, replace_private_file
from deploy.services.process import file_lock
from streams.pseudonymize import HmacKey

log = logging.getLogger(__name__)

DAY_KEY_PREFIX: Final = "day-"
FINISHED_PREFIX: Final = "finished:"
RETRY_AFTER_FAILURE_S: Final = 5.0
"""How long a store that could not read or write its file answers "no key" from memory,
rather than touching the file again for every event."""

_LINE_FORMAT = "expected day-YYYY-MM-DD:hex_secret[:created_unix_s] or finished:YYYY-MM-DD"


class DailyKeyError(Exception):
    """The daily key file cannot be read as asked; the message names no secret."""


@dataclass(frozen=True)
class DailyKey:
    day: str
    """The UTC day, 'YYYY-MM-DD', whose anonymous events it pseudonymizes."""
    key: HmacKey
    created_s: int | None


@dataclass(frozen=True)
class FinishedThrough:
    """No day up to ``day`` (included) gets a key any more."""

    day: str


@dataclass(frozen=True)
class DailyKeys:
    """What the file holds."""

    by_day: Mapping[str, DailyKey] = field(default_factory=dict)
    finished_through: str = ""
    """The latest finished day; '' when none was recorded yet."""


def daily_key_id(day: str) -> str:
    """The id a day's key carries into the enriched records' ``key_id``."""
    return f"{DAY_KEY_PREFIX}{day}"


def parse_daily_line(line: str) -> DailyKey | FinishedThrough:
    """One line of the file; ValueError (naming no secret) when it is not one."""
    text = line.strip()
    if text.startswith(FINISHED_PREFIX):
        return FinishedThrough(_checked_day(text.removeprefix(FINISHED_PREFIX)))
    try:
        ring_key = parse_key_line(text)
    except ValueError:
        raise ValueError(_LINE_FORMAT) from None
    if not ring_key.key.key_id.startswith(DAY_KEY_PREFIX):
        raise ValueError(_LINE_FORMAT)
    day = _checked_day(ring_key.key.key_id.removeprefix(DAY_KEY_PREFIX))
    return DailyKey(day, ring_key.key, ring_key.created_s)


def format_daily_keys(keys: DailyKeys) -> str:
    """The file's text: the finished day first, then the keys by day."""
    lines = [f"{FINISHED_PREFIX}{keys.finished_through}\n"] if keys.finished_through else []
    for day in sorted(keys.by_day):
        daily = keys.by_day[day]
        created = "" if daily.created_s is None else f":{daily.created_s}"
        lines.append(f"{daily.key.key_id}:{daily.key.secret.hex()}{created}\n")
    return "".join(lines)


def read_daily_keys(path: Path) -> DailyKeys:
    """The file's keys and finished day (none of either when it does not exist yet);
    DailyKeyError when unreadable or malformed (the line number, never its text)."""
    return _read(path)[0]


def latest_finished_day(now_s: float, allowed_lateness_s: float) -> str:
    """The latest UTC day that ended at least ``allowed_lateness_s`` before ``now_s``."""
    return (_utc_day(now_s - allowed_lateness_s) - timedelta(days=1)).isoformat()


def destroyed_after_s(day: str, allowed_lateness_s: float) -> float:
    """When ``day``'s key is due for destruction: its end plus the allowed lateness."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
    return (start + timedelta(days=1)).timestamp() + allowed_lateness_s


class DailyKeyStore:
    """One worker process's view of the daily keys, answered from memory.

    The file is touched only when a day is first asked for (read under the lock, and
    written if the day has no key yet), by ``refresh`` when its signature changed (another
    process made or destroyed a key), and by ``destroy_expired`` when a day is due. A day
    past lateness stops being answered from the last ``refresh`` or ``destroy_expired``
    call on, so call one of them every few seconds.
    """

    def __init__(
        self,
        path: Path,
        allowed_lateness_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._lateness = allowed_lateness_s
        self._clock = clock
        self._keys = DailyKeys()
        self._signature: tuple[int, int, int] | None = None
        self._closed_through = ""
        self._retry_at = 0.0
        self._last_warning = ""
        self.generation = 0
        """Counts the changes of the keys in memory: a cache of derived keys is stale once
        it moves."""
        self._load()
        self._close_finished_days()

    def __repr__(self) -> str:
        return f"DailyKeyStore({str(self.path)!r}, days={sorted(self._keys.by_day)})"

    def key_for(self, day: str) -> HmacKey | None:
        """``day``'s key, made now when the day has none yet; None when the day is finished,
        more than a day ahead, or the file cannot be used: its events keep no ids."""
        if day <= self._closed_through:
            return None
        found = self._keys.by_day.get(day)
        if found is not None:
            return found.key
        return self._make(day)

    def refresh(self) -> bool:
        """Read the file again if it was replaced (one stat otherwise); True when the keys
        in memory changed. DailyKeyError when the new file is malformed: the last keys read
        stay in use, and the same file is not reported twice."""
        if file_signature(self.path) == self._signature:
            return False
        before = self.generation
        self._load()
        return self.generation != before

    def destroy_expired(self) -> list[str]:
        """Destroy the key of every day that ended longer ago than the allowed lateness and
        record the latest such day as finished; the days whose keys were destroyed.

        The file is rewritten whole without those lines and renamed over the old one: their
        bytes go with the old inode (no shredding; a copy-on-write or snapshotting file
        system may keep old blocks, so keep the folder off one). Nothing is written when
        nothing is due, so calling this often costs one stat."""
        self.refresh()
        finished = self._close_finished_days()
        due = [day for day in self._keys.by_day if day <= finished]
        exists = self._signature is not None
        if not due and not (exists and self._keys.finished_through < finished):
            return []
        with self._locked():
            self._load()
            finished = self._close_finished_days()
            due = sorted(day for day in self._keys.by_day if day <= finished)
            if due or self._keys.finished_through < finished:
                self._save(self._without_finished(finished))
        return due

    def _make(self, day: str) -> HmacKey | None:
        now = self._clock()
        if now < self._retry_at or not self._may_have_key(day, now):
            return None
        try:
            with self._locked():
                self._load()
                found = self._keys.by_day.get(day)
                if found is not None:
                    return found.key
                finished = self._close_finished_days(now)
                if not self._may_have_key(day, now):
                    return None
                new = DailyKey(
                    day,
                    HmacKey(daily_key_id(day), secrets.token_bytes(NEW_KEY_BYTES)),
                    int(now),
                )
                kept = self._without_finished(finished)
                self._save(DailyKeys({**kept.by_day, day: new}, kept.finished_through))
                return new.key
        except (OSError, DailyKeyError) as err:
            self._retry_at = now + RETRY_AFTER_FAILURE_S
            self._warn(f"no key for {day}: its anonymous events keep no ids ({err})")
            return None

    def _may_have_key(self, day: str, now: float) -> bool:
        """Neither finished nor more than a day ahead of ``now`` (client clocks run ahead;
        validation refuses events further out)."""
        try:
            asked = date.fromisoformat(day)
        except ValueError:
            return False
        if asked.isoformat() != day or day <= self._closed_through:
            return False
        tomorrow = _utc_day(now) + timedelta(days=1)
        return latest_finished_day(now, self._lateness) < day and asked <= tomorrow

    def _close_finished_days(self, now: float | None = None) -> str:
        """The latest finished day, by the clock or the file, which ``key_for`` no longer
        answers from here on."""
        by_clock = latest_finished_day(self._clock() if now is None else now, self._lateness)
        self._closed_through = max(by_clock, self._keys.finished_through)
        return self._closed_through

    def _without_finished(self, finished: str) -> DailyKeys:
        kept = {day: key for day, key in self._keys.by_day.items() if day > finished}
        return DailyKeys(kept, max(finished, self._keys.finished_through))

    def _load(self) -> None:
        try:
            keys, signature = _read(self.path)
        except DailyKeyError:
            self._signature = file_signature(self.path)
            raise
        self._signature = signature
        self._remember(keys)

    def _save(self, keys: DailyKeys) -> None:
        replace_private_file(self.path, format_daily_keys(keys))
        self._signature = file_signature(self.path)
        self._remember(keys)

    def _remember(self, keys: DailyKeys) -> None:
        if keys != self._keys:
            self._keys = keys
            self.generation += 1

    def _locked(self) -> AbstractContextManager[None]:
        """Held while the file is read and written back, by every process."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return file_lock(self.path.with_name(f".{self.path.name}.lock"))

    def _warn(self, message: str) -> None:
        if message != self._last_warning:
            self._last_warning = message
            log.warning("%s", message)


def _utc_day(epoch_s: float) -> date:
    return datetime.fromtimestamp(epoch_s, UTC).date()


def _checked_day(text: str) -> str:
    try:
        parsed = date.fromisoformat(text)
    except ValueError:
        raise ValueError(_LINE_FORMAT) from None
    if parsed.isoformat() != text:
        raise ValueError(_LINE_FORMAT)
    return text


def _read(path: Path) -> tuple[DailyKeys, tuple[int, int, int] | None]:
    """The file's content and the signature of the very file read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return DailyKeys(), None
    except OSError as err:
        raise DailyKeyError(f"cannot read {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            text = handle.read().decode("ascii")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not ASCII text"
        raise DailyKeyError(f"cannot read {path}: {reason}") from None
    by_day: dict[str, DailyKey] = {}
    finished = ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = parse_daily_line(line)
        except ValueError as err:
            raise DailyKeyError(f"{path} line {number}: {err}") from None
        if isinstance(entry, FinishedThrough):
            if finished:
                raise DailyKeyError(f"{path} line {number}: a second finished line")
            finished = entry.day
        elif entry.day in by_day:
            raise DailyKeyError(f"{path} line {number}: a day appears twice")
        else:
            by_day[entry.day] = entry
    return DailyKeys(by_day, finished), (st.st_mtime_ns, st.st_size, st.st_ino)
