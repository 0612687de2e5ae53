"""What becomes of every field a client may send: the declarations PRIVACY.md is generated
from (``deploy/privacy_inventory.py``). A field added to an event without a declaration here
fails the inventory's test, so the data inventory cannot fall behind the schemas.

Purposes are the privacy statement's ("Collection of Personal Information"): the operation
of the service, maintaining its quality, and aggregate statistics regarding its use.
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.consent import Consent


class Fate(StrEnum):
    AS_SENT = "as sent"
    COARSENED = "coarsened"
    PSEUDONYMIZED = "pseudonymized"
    DROPPED = "dropped"


class Purpose(StrEnum):
    OPERATION = "operation of the service"
    QUALITY = "quality of the service"
    STATISTICS = "aggregate statistics"


@dataclass(frozen=True)
class FieldFate:
    """What one sent field becomes, per consent level."""

    fates: dict[Consent, Fate]
    how: str
    """How it is coarsened or pseudonymized, or why it is dropped."""
    columns: tuple[str, ...]
    """The enriched columns that keep what is left of it (none when dropped everywhere)."""
    purposes: tuple[Purpose, ...]


def _same(fate: Fate) -> dict[Consent, Fate]:
    return {consent: fate for consent in Consent}


_ALL: Final = (Purpose.OPERATION, Purpose.QUALITY, Purpose.STATISTICS)

ENVELOPE_FATES: Final[dict[str, FieldFate]] = {
    "event_id": FieldFate(_same(Fate.AS_SENT), "a random UUID; counts each event once",
                          ("event_id",), (Purpose.OPERATION,)),
    "event_type": FieldFate(_same(Fate.AS_SENT), "", ("event_type",), _ALL),
    "schema_version": FieldFate(_same(Fate.AS_SENT), "", ("schema_version",), (Purpose.OPERATION,)),
    "client_time_ms": FieldFate(_same(Fate.COARSENED), "to the second", ("event_time",), _ALL),
    "collector_time_ms": FieldFate(_same(Fate.COARSENED), "to the second (arrival time)",
                                   ("received_time",), (Purpose.OPERATION, Purpose.QUALITY)),
    "app_id": FieldFate(_same(Fate.AS_SENT), "", ("app_id",), _ALL),
    "channel": FieldFate(_same(Fate.AS_SENT), "", ("channel",), _ALL),
    "software_version": FieldFate(_same(Fate.AS_SENT), "", ("software_version",), _ALL),
    "consent": FieldFate(_same(Fate.AS_SENT), "decides every other field's fate",
                         ("consent",), (Purpose.OPERATION,)),
    "user_id": FieldFate(
        {Consent.FULL: Fate.PSEUDONYMIZED, Consent.ANONYMOUS: Fate.PSEUDONYMIZED,
         Consent.NONE: Fate.DROPPED},
        "keyed HMAC-SHA256 under the ring's key (full: linkable across days until the key is "
        "destroyed) or under a random key of its UTC day, destroyed after the allowed "
        "lateness (anonymous: unlinkable beyond the day); the raw id is never stored",
        ("user_pseudonym", "key_id"), (Purpose.OPERATION, Purpose.STATISTICS),
    ),
    "session_id": FieldFate(
        {Consent.FULL: Fate.PSEUDONYMIZED, Consent.ANONYMOUS: Fate.PSEUDONYMIZED,
         Consent.NONE: Fate.DROPPED},
        "as user_id; pairs a session's events into its summary",
        ("session_pseudonym",), (Purpose.QUALITY,),
    ),
    "user_agent": FieldFate(
        _same(Fate.COARSENED),
        "parsed into browser and OS family and major version and a device class; the string "
        "itself is dropped",
        ("browser_family", "browser_version", "os_family", "os_version", "device_class"),
        _ALL,
    ),
    "os_family": FieldFate(_same(Fate.AS_SENT), "", ("os_family",), _ALL),
    "os_version": FieldFate(_same(Fate.COARSENED), "major version only", ("os_version",), _ALL),
    "browser_family": FieldFate(_same(Fate.AS_SENT), "", ("browser_family",), _ALL),
    "browser_version": FieldFate(_same(Fate.COARSENED), "major version only",
                                 ("browser_version",), _ALL),
    "ip": FieldFate(
        {Consent.FULL: Fate.COARSENED, Consent.ANONYMOUS: Fate.COARSENED,
         Consent.NONE: Fate.COARSENED},
        "looked up in a GeoIP2 database, then dropped: country and region (full), country "
        "only (anonymous, none); set by the collector from the connection, never by the client",
        ("country_code", "region_code"), (Purpose.OPERATION, Purpose.STATISTICS),
    ),
    "referrer": FieldFate(
        {Consent.FULL: Fate.COARSENED, Consent.ANONYMOUS: Fate.COARSENED,
         Consent.NONE: Fate.DROPPED},
        "cut to the site's host without www.; path, query and credentials dropped",
        ("referrer_domain",), (Purpose.STATISTICS,),
    ),
}  # fmt: skip
"""The fate of every field of ``schemas.events.Envelope``."""

TYPE_PURPOSES: Final[dict[str, tuple[Purpose, ...]]] = {
    "login": (Purpose.OPERATION, Purpose.STATISTICS),
    "logout": (Purpose.OPERATION,),
    "session_start": (Purpose.QUALITY, Purpose.STATISTICS),
    "session_end": (Purpose.QUALITY, Purpose.STATISTICS),
    "quality_sample": (Purpose.QUALITY,),
    "client_info": (Purpose.STATISTICS,),
}
"""Why each event type's own fields (closed lists and numbers, kept as sent) are kept."""
