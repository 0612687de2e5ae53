"""Recently seen event ids, to refuse a client's retried send as ``duplicate``.

Bounded and per worker: it catches retries that arrive close together. Anything it misses
(a retry after a restart, a replay) is still written once, since the ClickHouse tables are
keyed by event id.
"""

from collections import OrderedDict


class RecentEventIds:
    """The last ``capacity`` event ids, least recently seen evicted first."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen_before(self, event_id: str) -> bool:
        """Whether the id was seen already; records it either way."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False
