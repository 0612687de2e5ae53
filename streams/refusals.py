"""The dead-letter limit: notice when the share of refused events jumps (a broken client
release, a schema change shipped too early) instead of dead-lettering a flood in silence.

Counts go in one-second buckets over a sliding window; the alarm trips once when the refused
share reaches its threshold (with enough events in the window to mean something) and re-arms
when the share falls below half of it. Only reason codes are kept, never an event's values.
Duplicates are a client's retries, not refusals of its release, and are not counted.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from schemas.reasons import ReasonCode

_NOT_COUNTED = frozenset({ReasonCode.DUPLICATE})


@dataclass(frozen=True)
class RefusalAlarm:
    """The window that tripped the alarm: its share refused, its size, its top reasons."""

    share: float
    events: int
    window_s: float
    top_reasons: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.top_reasons)
        return (
            f"{self.share:.0%} of the last {self.events} events refused within "
            f"{self.window_s:.0f} s (top reasons: {reasons}): a broken client release?"
        )


class RefusalWatch:
    """Feed it each batch's outcomes (``record``); it returns an alarm when one trips."""

    def __init__(
        self,
        *,
        share: float = 0.5,
        window_s: float = 60.0,
        min_events: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < share <= 1 or window_s <= 0 or min_events < 1:
            raise ValueError("share in (0, 1], a positive window and at least one event")
        self._share = share
        self._window_s = window_s
        self._min_events = min_events
        self._clock = clock
        self._buckets: deque[tuple[int, int, Counter[str]]] = deque()
        self._tripped = False

    def record(self, reasons: Iterable[ReasonCode | None]) -> RefusalAlarm | None:
        """Count one batch (None: an accepted event) and say whether the alarm trips now."""
        second = int(self._clock())
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, 0, Counter()))
        _, accepted, refused = self._buckets[-1]
        for reason in reasons:
            if reason is None:
                accepted += 1
            elif reason not in _NOT_COUNTED:
                refused[reason.value] += 1
        self._buckets[-1] = (second, accepted, refused)
        while self._buckets and self._buckets[0][0] <= second - self._window_s:
            self._buckets.popleft()
        total_refused: Counter[str] = Counter()
        total_accepted = 0
        for _, bucket_accepted, bucket_refused in self._buckets:
            total_accepted += bucket_accepted
            total_refused.update(bucket_refused)
        events = total_accepted + sum(total_refused.values())
        share = sum(total_refused.values()) / events if events else 0.0
        if self._tripped:
            self._tripped = share >= self._share / 2
            return None
        if events < self._min_events or share < self._share:
            return None
        self._tripped = True
        return RefusalAlarm(share, events, self._window_s, tuple(total_refused.most_common(3)))

    @property
    def tripped(self) -> bool:
        return self._tripped
