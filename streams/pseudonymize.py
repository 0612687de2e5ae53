"""Keyed pseudonyms for user and session ids.

HMAC-SHA256 under a key that only the stream step holds, tagged with the key's id: rotating
the key starts new pseudonyms, and destroying an old key makes its pseudonyms unlinkable to
anyone (privacy statement, "Security of your Personal Information").
"""

import hashlib
import hmac
from dataclasses import dataclass, field

from schemas.consent import Consent


@dataclass(frozen=True)
class HmacKey:
    """One pseudonymization key. The secret never appears in a repr or a log line."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError(f"HMAC key {self.key_id!r} is shorter than 16 bytes")


class Pseudonymizer:
    """Turns raw ids into pseudonyms under the active key, as the event's consent allows."""

    def __init__(self, key: HmacKey) -> None:
        self.key_id = key.key_id
        self._keyed = hmac.new(key.secret, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return f"Pseudonymizer(key_id={self.key_id!r})"

    def _hmac_hex(self, message: str) -> str:
        mac = self._keyed.copy()
        mac.update(message.encode())
        return mac.hexdigest()

    def pseudonymize_id(self, raw_id: str | None, consent: Consent, day: str) -> str:
        """HMAC of the id; with ``anonymous`` consent salted by the UTC day so that it cannot
        be linked across days; '' when there is no id or consent keeps none."""
        if not raw_id or consent is Consent.NONE:
            return ""
        if consent is Consent.ANONYMOUS:
            return self._hmac_hex(f"{day}|{raw_id}")
        return self._hmac_hex(raw_id)
