"""`tally keys`: the pseudonymization key ring.

A file (``TALLY_HMAC_KEY_FILE``, else ``secrets/hmac.key`` under the state folder), mode
0600, one key a line as ``key_id:hex_secret[:created_unix_s]``, the newest first: that one
pseudonymizes new events. ``rotate`` puts a new key in front; ``destroy`` removes a key for
good, so that the pseudonyms made with it can no longer be linked to anyone (the bulk erasure
path). A running worker picks the ring up again when the file changes (deploy/wiring.py).

Secrets never leave this module except as ``HmacKey`` objects, whose repr hides them; what
is listed is ids and ages.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from deploy.services.process import file_lock
from streams.pseudonymize import HmacKey

NEW_KEY_BYTES: Final = 32


class KeyRingError(Exception):
    """The ring cannot be read or changed as asked; the message names no secret."""


@dataclass(frozen=True)
class RingKey:
    key: HmacKey
    created_s: int | None
    """When it was made (unknown for keys written before the ring recorded it)."""


def parse_key_line(line: str) -> RingKey:
    """One ring line; ValueError (naming no secret) when it is not one."""
    parts = line.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise ValueError("expected key_id:hex_secret of at least 16 bytes")
    try:
        key = HmacKey(parts[0].strip(), bytes.fromhex(parts[1].strip()))
        created = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ValueError("expected key_id:hex_secret of at least 16 bytes") from None
    return RingKey(key, created)


def read_key_ring(path: Path) -> list[RingKey]:
    """The ring's keys, the active one first; KeyRingError when missing, unreadable, empty
    or malformed (the line number, never its text)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyRingError(f"no key ring at {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not ASCII text"
        raise KeyRingError(f"cannot read {path}: {reason}") from None
    keys: list[RingKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            keys.append(parse_key_line(line))
        except ValueError as err:
            raise KeyRingError(f"{path} line {number}: {err}") from None
    if not keys:
        raise KeyRingError(f"{path} holds no key")
    ids = [k.key.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise KeyRingError(f"{path}: a key id appears twice")
    return keys


def make_key_ring(path: Path) -> None:
    """A ring of one new key, unless ``path`` exists (made once, on first use)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as out:
        out.write(_line(_new_key("k1")))


def rotate_key(path: Path) -> RingKey:
    """Put a new key in front of the ring (it becomes the active one) and return it."""
    with _locked(path):
        ring = read_key_ring(path)
        numbers = [int(k.key.key_id[1:]) for k in ring if k.key.key_id[1:].isdigit()]
        new = _new_key(f"k{max(numbers, default=0) + 1}")
        _write(path, [new, *ring])
    return new


def destroy_key(path: Path, key_id: str) -> None:
    """Remove ``key_id`` from the ring for good; the last key cannot be destroyed (rotate
    first). The file is replaced whole, so no reader ever sees the key half removed."""
    with _locked(path):
        ring = read_key_ring(path)
        kept = [k for k in ring if k.key.key_id != key_id]
        if len(kept) == len(ring):
            raise KeyRingError(f"no key {key_id!r} in {path}")
        if not kept:
            raise KeyRingError(f"{key_id!r} is the only key: `tally keys rotate` first")
        _write(path, kept)


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a key file is replaced (mtime, size, inode); None if absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _new_key(key_id: str) -> RingKey:
    return RingKey(HmacKey(key_id, secrets.token_bytes(NEW_KEY_BYTES)), int(time.time()))


def _line(ring_key: RingKey) -> str:
    created = "" if ring_key.created_s is None else f":{ring_key.created_s}"
    return f"{ring_key.key.key_id}:{ring_key.key.secret.hex()}{created}\n"


def _write(path: Path, ring: list[RingKey]) -> None:
    replace_private_file(path, "".join(_line(k) for k in ring))


def replace_private_file(path: Path, text: str) -> None:
    """Replace a key file whole, with the old file's owner and mode (never readable by
    others: 0600, or 0640 for a file a service group reads), private from its first byte.

    Written to a staging file, synced, renamed over the old one and the folder synced: a
    reader sees the old file or the new one, never a mix, and after a crash one of the two.
    Run under the file's lock (two writers would share the staging file)."""
    try:
        old = os.stat(path)
        mode, owner = stat.S_IMODE(old.st_mode) & 0o640, (old.st_uid, old.st_gid)
    except FileNotFoundError:
        mode, owner = 0o600, None
    staging = path.with_name(f".{path.name}.new")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        if owner is not None and owner != (os.getuid(), os.getgid()):
            os.fchown(out.fileno(), *owner)  # root rotating a ring the service group reads
        os.fchmod(out.fileno(), mode | 0o600)
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    staging.replace(path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _locked(path: Path) -> AbstractContextManager[None]:
    """Held while a ring is read and written back, so two commands never lose a change."""
    return file_lock(path.with_name(f".{path.name}.lock"))
