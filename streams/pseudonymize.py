"""Keyed pseudonyms for user and session ids.

HMAC-SHA256 under a key that only the stream step holds, tagged with the key's id: rotating
the key starts new pseudonyms, and destroying an old key makes its pseudonyms unlinkable to
anyone (privacy statement, "Security of your Personal Information").

With ``full`` consent the key is the ring's active one. With ``anonymous`` consent it is the
event's UTC day's own random key, which the caller provides and later destroys: the
long-lived ring key plays no part, so holding it never links an anonymous user across days.
"""

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from schemas.consent import Consent

MAX_CACHED_DAYS: Final = 4
"""Keyed HMAC objects kept per day: today, yesterday's late events, tomorrow's early ones."""


@dataclass(frozen=True)
class HmacKey:
    """One pseudonymization key. The secret never appears in a repr or a log line."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError(f"HMAC key {self.key_id!r} is shorter than 16 bytes")


DailyKeyProvider = Callable[[str], HmacKey | None]
"""The key of a UTC day ('YYYY-MM-DD') for ``anonymous`` consent; None once that day's key
is destroyed (or the day may have none): its events then keep no ids."""


def no_daily_keys(day: str) -> HmacKey | None:
    """For a pseudonymizer without daily keys: ``anonymous`` events keep no ids."""
    return None


class Pseudonymizer:
    """Turns raw ids into pseudonyms, under the key the event's consent calls for."""

    def __init__(self, key: HmacKey, daily_key: DailyKeyProvider = no_daily_keys) -> None:
        self.key_id = key.key_id
        self._keyed = hmac.new(key.secret, digestmod=hashlib.sha256)
        self._daily_key = daily_key
        self._keyed_by_day: dict[str, tuple[HmacKey, hmac.HMAC]] = {}

    def __repr__(self) -> str:
        return f"Pseudonymizer(key_id={self.key_id!r})"

    def _day_keyed(self, day: str) -> hmac.HMAC | None:
        """The day's key made into an HMAC once (then copied per id), while the provider
        still answers with that same key."""
        key = self._daily_key(day)
        if key is None:
            self._keyed_by_day.pop(day, None)
            return None
        cached = self._keyed_by_day.get(day)
        if cached is not None and cached[0] is key:
            return cached[1]
        if len(self._keyed_by_day) >= MAX_CACHED_DAYS:
            self._keyed_by_day.clear()
        keyed = hmac.new(key.secret, digestmod=hashlib.sha256)
        self._keyed_by_day[day] = (key, keyed)
        return keyed

    def pseudonymize_id(self, raw_id: str | None, consent: Consent, day: str) -> str:
        """HMAC of the id, under the UTC ``day``'s key with ``anonymous`` consent ('' once
        that key is gone), else under the ring's key; '' when there is no id or consent
        keeps none."""
        if not raw_id or consent is Consent.NONE:
            return ""
        if consent is Consent.ANONYMOUS:
            keyed = self._day_keyed(day)
            if keyed is None:
                return ""
        else:
            keyed = self._keyed
        mac = keyed.copy()
        mac.update(raw_id.encode())
        return mac.hexdigest()

    def anonymous_key_id(self, day: str) -> str:
        """The id of the key behind ``day``'s anonymous pseudonyms; '' when it has none."""
        key = self._daily_key(day)
        return "" if key is None else key.key_id
