"""Recently seen event ids, to refuse a client's retried send as ``duplicate`` whatever
restarted in between.

The ids live in memory for speed and in a Faust table for durability: one table entry per
raw message (its partition and offset as key; arrival time and accepted ids as value), so
the changelog costs one record per batch, not one per event. After a restart or a
rebalance the index is rebuilt from the recovered table. An id met again in the very message
it was first seen in is not a duplicate: that message is being replayed after a crash, and
its events must give what they gave the first time. An id is forgotten when its entry
is older than the window, or sooner when more than ``max_ids`` are held (oldest first).
"""

from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

import orjson


class _Entry(NamedTuple):
    partition: int
    seen_ms: int
    event_ids: tuple[str, ...]


class TableWrite(NamedTuple):
    """A change to send to the table's changelog: ``value`` None deletes the key."""

    partition: int
    key: bytes
    value: bytes | None


def entry_key(partition: int, offset: int) -> bytes:
    return f"{partition}:{offset}".encode()


class RecentEventIds:
    """Event ids seen within ``window_ms``, at most ``max_ids`` of them."""

    def __init__(self, window_ms: int = 86_400_000, max_ids: int = 1_000_000) -> None:
        self.window_ms = window_ms
        self.max_ids = max_ids
        self._ids: dict[str, bytes] = {}
        """Each id's entry key: the raw message it was first seen in."""
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._pending: list[str] = []
        self._message: bytes | None = None
        self._judged_now: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def begin_message(self, partition: int, offset: int) -> None:
        """The raw message whose events are judged next."""
        self._message = entry_key(partition, offset)
        self._judged_now.clear()

    def seen_before(self, event_id: str) -> bool:
        """Whether the id came already, in another raw message or earlier in this one;
        records it, in memory until ``remember`` is called for the current message."""
        if self._message is not None:
            if event_id in self._judged_now:
                return True
            self._judged_now.add(event_id)
        first_seen_in = self._ids.get(event_id)
        if first_seen_in is not None:
            return first_seen_in != self._message
        self._ids[event_id] = self._message or b""
        self._pending.append(event_id)
        return False

    def remember(self, partition: int, offset: int, seen_ms: int) -> list[TableWrite]:
        """Make the ids first seen in the current message (``partition``, ``offset``)
        durable: the table write to send once what the message gave is on the broker, then
        any deletions the bound forces."""
        if not self._pending:
            return []
        event_ids, self._pending = self._pending, []
        key = entry_key(partition, offset)
        for event_id in event_ids:
            self._ids[event_id] = key
        self._entries[key] = _Entry(partition, seen_ms, tuple(event_ids))
        self._entries.move_to_end(key)
        value = orjson.dumps({"p": partition, "t": seen_ms, "ids": event_ids})
        return [TableWrite(partition, key, value), *self._evict_over_bound()]

    def expire(self, now_ms: int) -> list[TableWrite]:
        """Forget entries older than the window; the deletions to send."""
        horizon = now_ms - self.window_ms
        writes = []
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.seen_ms >= horizon:
                break
            writes.append(self._forget(key))
        return writes

    def _evict_over_bound(self) -> list[TableWrite]:
        writes = []
        while len(self._ids) > self.max_ids and len(self._entries) > 1:
            writes.append(self._forget(next(iter(self._entries))))
        return writes

    def _forget(self, key: bytes) -> TableWrite:
        entry = self._entries.pop(key)
        for event_id in entry.event_ids:
            self._ids.pop(event_id, None)
        return TableWrite(entry.partition, key, None)

    def rebuild(self, table_items: Iterable[tuple[bytes, bytes]], partitions: set[int]) -> None:
        """Start again from the table's entries of the partitions this worker now owns
        (after a restart or a rebalance), in arrival order."""
        entries = []
        for key, value in table_items:
            decoded = orjson.loads(value)
            if decoded["p"] in partitions:
                entries.append((key, _Entry(decoded["p"], decoded["t"], tuple(decoded["ids"]))))
        entries.sort(key=lambda item: item[1].seen_ms)
        self._entries = OrderedDict(entries)
        self._pending = []
        self._ids = {event_id: key for key, entry in entries for event_id in entry.event_ids}
