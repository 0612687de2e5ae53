"""The collector's apps and their keys: a registry in one JSON file, and the lookup the
collector does per request.

An app has an id (the schema's ``AppId``: its events' ``app_id`` must equal it), the browser
origins it serves, and two keys, shown once when issued and stored only as hashes:

- the **write key** (``tw_...``) is public, as in every browser analytics SDK: it sits in the
  page and names the app. What protects it is that a request carrying an ``Origin`` the app
  did not register is refused (403), and its own rate limit. Clients that send no ``Origin``
  (desktop apps) may use it.
- the **secret key** (``ts_...``) is for server-side senders: no ``Origin`` is required of it
  and it has a higher rate limit of its own. It is never accepted in a URL (proxies log
  URLs).

The file is rewritten whole, atomically (a temporary file renamed over it), mode 0600, under
an advisory lock so two ``tally apps`` commands never lose each other's change. A running
collector re-reads it when it changes, looking at most once per ``check_interval_s``, so
``tally apps add`` and ``revoke`` take effect without a restart and without a stat per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas.events import AppId

log = logging.getLogger(__name__)

KeyKind = Literal["write", "secret"]

WRITE_PREFIX: Final = "tw_"
SECRET_PREFIX: Final = "ts_"
_KEY_BYTES: Final = 32
_FORMAT_VERSION: Final = 1
_APP_ID: Final = TypeAdapter(AppId)

MAX_KEY_CHARS: Final = 128
"""Longer than any key issued here: a longer presented key is refused before it is hashed."""
_TOKEN: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
"""RFC 6750's b64token: what ``Authorization: Bearer`` may carry."""
_BEARER: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*) *")


class AppsError(ValueError):
    """A registry change or read that cannot be done, in one line naming the app or the
    file; never a key or a hash."""


@dataclass(frozen=True)
class IssuedKeys:
    """An app's new keys, the only time they are seen: the registry keeps their hashes."""

    app_id: str
    write_key: str = field(repr=False)
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class AppInfo:
    """What may be shown of an app: never a key nor a hash."""

    app_id: str
    origins: tuple[str, ...]
    created: str
    """ISO 8601, UTC, to the second."""
    revoked: str | None


@dataclass(frozen=True, slots=True)
class KeyMatch:
    """The app and kind of a presented key that is active."""

    app_id: str
    kind: KeyKind
    origins: frozenset[str]
    digest: bytes
    """The key's sha256: what rate limits are kept by (never the key itself)."""


def key_digest(key: str) -> bytes:
    """sha256 of a key.

    A plain fast hash is enough here, unlike for passwords: every key is 32 bytes from
    ``secrets`` (256 bits), so no guess list or brute force gets anywhere near one, and a
    slow KDF would only cost CPU on every request. A leaked registry file gives no key.
    """
    return hashlib.sha256(key.encode("ascii", "surrogateescape")).digest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header (scheme in any case), or None when
    the header is absent, of another scheme, malformed, or longer than any key."""
    if authorization is None or len(authorization) > MAX_KEY_CHARS + 16:
        return None
    match = _BEARER.fullmatch(authorization.strip(" \t"))
    return match.group(1) if match else None


def query_key(value: str | None) -> str | None:
    """A key given as the ``key`` query parameter (navigator.sendBeacon cannot set
    headers), or None when absent or not a well-formed token."""
    if value is None or len(value) > MAX_KEY_CHARS or not _TOKEN.fullmatch(value):
        return None
    return value


def normalize_origin(text: str) -> str:
    """An origin as browsers send it in ``Origin``: ``scheme://host[:port]``, lower case, no
    default port, no path. Raises AppsError for anything else (wildcards among them)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise AppsError(f"origin {text!r} is not scheme://host[:port]") from None
    host = (parts.hostname or "").lower()
    if (
        parts.scheme.lower() not in ("http", "https")
        or not host
        or not host.isascii()
        or "*" in host
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise AppsError(
            f"origin {text!r} is not http(s)://host[:port] (no path, no wildcard; "
            "an internationalized host in its xn-- form)"
        )
    scheme = parts.scheme.lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(_KEY_BYTES)


def register_app(
    path: Path, name: str, origins: Iterable[str], *, replace: bool = False
) -> IssuedKeys:
    """Register app ``name`` serving ``origins`` (none: only clients that send no Origin)
    and return its new keys, which are not kept anywhere: show them once.

    A revoked app's name may be registered again (new keys, new origins). An active one
    raises AppsError unless ``replace``: then it gets the new origins and keys and its old
    keys stop working. Also raises AppsError for a name that is not a valid ``app_id`` or a
    bad origin, and OSError when the file cannot be written.
    """
    try:
        _APP_ID.validate_python(name)
    except ValidationError:
        raise AppsError(
            f"app name {name!r} is not a valid app_id (a lower-case letter, then up to 47 of "
            "a-z 0-9 _ . -)"
        ) from None
    normalized = tuple(dict.fromkeys(normalize_origin(o) for o in origins))
    keys = IssuedKeys(name, _new_key(WRITE_PREFIX), _new_key(SECRET_PREFIX))
    with _locked(path):
        records = _read_records(path)
        existing = records.get(name)
        if existing is not None and existing.get("revoked") is None and not replace:
            raise AppsError(f"app {name!r} is already registered; revoke it first")
        records[name] = {
            "app_id": name,
            "origins": list(normalized),
            "created": _now(),
            "revoked": None,
            "write_key_sha256": key_digest(keys.write_key).hex(),
            "secret_key_sha256": key_digest(keys.secret_key).hex(),
        }
        _write_records(path, records)
    return keys


def revoke_app(path: Path, name: str) -> bool:
    """Revoke app ``name``'s keys (the record stays, so ``list`` shows when). True if it was
    active, False if already revoked; AppsError if there is no such app."""
    with _locked(path):
        records = _read_records(path)
        record = records.get(name)
        if record is None:
            raise AppsError(f"no app named {name!r}")
        if record.get("revoked") is not None:
            return False
        record["revoked"] = _now()
        _write_records(path, records)
    return True


def list_apps(path: Path) -> list[AppInfo]:
    """Every app in the file, by name; no keys, no hashes. An absent file: none."""
    return [
        AppInfo(r["app_id"], tuple(r["origins"]), r["created"], r.get("revoked"))
        for _, r in sorted(_read_records(path).items())
    ]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside the file, for one read-change-write."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The file's apps by name, checked for shape; AppsError naming the file if it is not a
    registry (its content is never quoted: it holds hashes)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise AppsError(f"cannot read the apps file {path}: {err.strerror}") from None
    try:
        document = orjson.loads(raw)
        if document.get("version") != _FORMAT_VERSION:
            raise ValueError
        records: dict[str, dict[str, Any]] = {}
        for record in document["apps"]:
            _APP_ID.validate_python(record["app_id"])
            for name in ("write_key_sha256", "secret_key_sha256"):
                if len(bytes.fromhex(record[name])) != hashlib.sha256().digest_size:
                    raise ValueError
            if not all(isinstance(o, str) for o in record["origins"]):
                raise ValueError
            if not isinstance(record["created"], str):
                raise ValueError
            if not isinstance(record.get("revoked"), str | None):
                raise ValueError
            records[record["app_id"]] = record
    except (orjson.JSONDecodeError, ValidationError, ValueError, TypeError, KeyError,
            AttributeError):  # fmt: skip
        raise AppsError(f"the apps file {path} is not a Tally apps registry") from None
    return records


def _write_records(path: Path, records: dict[str, dict[str, Any]]) -> None:
    """The whole file replaced at once, mode 0600, durable before this returns."""
    document = {"version": _FORMAT_VERSION, "apps": [records[k] for k in sorted(records)]}
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:  # mkstemp makes it 0600
            out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class _Snapshot:
    by_digest: dict[bytes, KeyMatch]
    origins: frozenset[str]
    """Every active app's origins: what a preflight without a key may be allowed for."""


_HASH_FIELDS: Final[tuple[tuple[KeyKind, str], ...]] = (
    ("write", "write_key_sha256"),
    ("secret", "secret_key_sha256"),
)


def _snapshot(records: dict[str, dict[str, Any]]) -> _Snapshot:
    by_digest: dict[bytes, KeyMatch] = {}
    origins: set[str] = set()
    for record in records.values():
        if record.get("revoked") is not None:
            continue
        app_origins = frozenset(record["origins"])
        origins |= app_origins
        for kind, name in _HASH_FIELDS:
            digest = bytes.fromhex(record[name])
            by_digest[digest] = KeyMatch(record["app_id"], kind, app_origins, digest)
    return _Snapshot(by_digest, frozenset(origins))


class AppRegistry:
    """The active apps of a registry file, as the running collector sees them.

    ``lookup`` is O(1) (a dict by key hash) and does no I/O, except that at most once per
    ``check_interval_s`` it stats the file and, when the file changed (mtime, size or inode:
    an atomic replace always gives a new inode), reads it again. A file that turns unreadable
    or malformed while running keeps the last good apps, with a warning; one that is so at
    construction raises AppsError. No file: no apps (every key is unknown).
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._interval = check_interval_s
        self._clock = clock
        self._signature = self._stat()
        self._snapshot = _snapshot(_read_records(path))
        self._next_check = clock() + check_interval_s

    @property
    def active_apps(self) -> int:
        return len(self._snapshot.by_digest) // 2

    def lookup(self, key: str) -> KeyMatch | None:
        """The active app and kind of ``key``, or None (unknown, or revoked)."""
        self._refresh()
        digest = key_digest(key)
        match = self._snapshot.by_digest.get(digest)
        # The dict compares digests, so its timing says something about a sha256 of the
        # guess at most, which is no help finding a key; the final check is constant-time.
        if match is None or not hmac.compare_digest(match.digest, digest):
            return None
        return match

    def origin_registered(self, origin: str) -> bool:
        """Whether ``origin`` is registered for any active app."""
        self._refresh()
        return origin in self._snapshot.origins

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._interval
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            snapshot = _snapshot(_read_records(self.path))
        except AppsError as err:  # malformed: said once, until the file changes again
            self._signature = signature
            log.warning("apps registry not reloaded, keeping the last one read: %s", err)
            return
        except OSError as err:  # perhaps passing: tried again next time
            log.warning("apps registry not reloaded, keeping the last one read: %s", err.strerror)
            return
        self._signature, self._snapshot = signature, snapshot
        log.info("apps registry reloaded: %d active apps", self.active_apps)
