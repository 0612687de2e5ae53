"""The collector's limits that hold across requests: a token bucket per key, and the bound
on events held in memory until Kafka acknowledges them.

Both are plain objects used from the event loop's one thread, with the clock passed in, so
tests drive them without sleeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """Requests per second, and how many may come at once after a quiet spell."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_s <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")


class TokenBucket:
    """``limit.burst`` tokens, refilled at ``limit.per_s``; a request takes one."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self._rate = limit.per_s
        self._burst = float(limit.burst)
        self._tokens = float(limit.burst)
        self._updated = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate


def retry_after_s(wait_s: float) -> int:
    """A wait as Retry-After says it: whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))


class KeyRateLimiter:
    """One bucket per key, kept by the key's digest. Only keys the registry knows get here,
    so the table grows with the registered keys, never with what clients make up."""

    def __init__(self) -> None:
        self._buckets: dict[bytes, TokenBucket] = {}

    def take(self, digest: bytes, limit: RateLimit, now: float) -> float:
        """0.0 if the key may send now, else the seconds until it may."""
        bucket = self._buckets.get(digest)
        if bucket is None:
            bucket = self._buckets[digest] = TokenBucket(limit, now)
        return bucket.take(now)


class PendingEvents:
    """Events read from requests and not yet acknowledged by Kafka, against a bound: a
    request that would pass it is turned away (back-pressure) instead of growing memory."""

    __slots__ = ("bound", "count")

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError("the bound on pending events must be at least 1")
        self.bound = bound
        self.count = 0

    def full(self) -> bool:
        """Whether no request at all should be read now."""
        return self.count >= self.bound

    def try_hold(self, events: int) -> bool:
        """Count ``events`` as pending if that stays within the bound; release them later."""
        if self.count + events > self.bound:
            return False
        self.count += events
        return True

    def release(self, events: int) -> None:
        self.count -= events
