"""The pure core of the stream step: one validated event in, one enriched record out.

Raw ids become pseudonyms, the IP becomes a country (and region, with full consent) and is
dropped, the user agent becomes browser, OS and device class and is dropped, the referrer is
cut to its domain. Nothing here touches Kafka, so it is unit-tested directly.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import geoip2.database
import geoip2.errors
import maxminddb
import ua_parser
from ua_parser.regex import Resolver as RustResolver
from user_agents.parsers import (
    UserAgent,
    parse_browser,
    parse_device,
    parse_operating_system,
)

from schemas.consent import Consent
from schemas.enriched import EnrichedEnvelope, enriched_fields
from schemas.events import Envelope


class Agent(NamedTuple):
    browser_family: str
    browser_version: str
    os_family: str
    os_version: str
    device_class: str


class Place(NamedTuple):
    country_code: str
    region_code: str


NOWHERE = Place("", "")


def _major(version: str) -> str:
    """Only the major version: enough for compatibility stats, less of a fingerprint."""
    return version.split(".", 1)[0] if version else ""


class _ClassifiedAgent(UserAgent):  # type: ignore[misc]  # user_agents has no types
    """user_agents' device classes over a parse by ua-parser's Rust resolver.

    ``user_agents.parse`` always runs ua-parser's pure-Python matcher (0.5-1 ms a string);
    the Rust one (ua-parser-rs) reads the same regexes in 10-30 us. The classes (bot,
    tablet, mobile, desktop) stay user_agents' own, computed from the same parsed fields.
    """

    def __init__(self, user_agent: str, parsed: ua_parser.DefaultedResult) -> None:
        self.ua_string = user_agent
        self.os = parse_operating_system(**asdict(parsed.os))
        self.browser = parse_browser(**asdict(parsed.user_agent))
        self.device = parse_device(**asdict(parsed.device))


_UA_PARSER: Final = ua_parser.Parser(RustResolver(ua_parser.load_builtins()))


@lru_cache(maxsize=4096)
def parse_user_agent(user_agent: str) -> Agent:
    """Browser, OS and device class of a user agent string.

    Cached here because real traffic has few distinct strings (a hit costs 0.04 us, a
    miss 10-30 us).
    """
    ua = _ClassifiedAgent(user_agent, _UA_PARSER.parse(user_agent).with_defaults())
    if ua.is_bot:
        device = "bot"
    elif ua.is_tablet:
        device = "tablet"
    elif ua.is_mobile:
        device = "mobile"
    elif ua.is_pc:
        device = "desktop"
    else:
        device = "other"
    return Agent(
        ua.browser.family[:64],
        _major(ua.browser.version_string),
        ua.os.family[:64],
        _major(ua.os.version_string),
        device,
    )


class GeoLookup:
    """Country and region of an IP from a MaxMind-format City database (GeoIP2, DB-IP).

    A client sends many envelopes from one address, and a lookup builds geoip2's record
    objects (40-120 us), so the last ``cache_size`` addresses' places are kept: in this
    process's memory only, never written anywhere, gone on restart."""

    def __init__(self, database: Path, cache_size: int = 65_536) -> None:
        self._reader = geoip2.database.Reader(str(database), mode=maxminddb.MODE_MMAP_EXT)
        self.locate: Callable[[str], Place] = lru_cache(maxsize=cache_size)(self._locate)

    def _locate(self, ip: str) -> Place:
        try:
            city = self._reader.city(ip)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return NOWHERE
        subdivision = city.subdivisions.most_specific
        region = (subdivision.iso_code or subdivision.name or "")[:64]
        return Place(city.country.iso_code or "", region)

    def close(self) -> None:
        self._reader.close()


@lru_cache(maxsize=4096)
def referrer_domain(url: str | None) -> str:
    """The referring site's host, without ``www.``; path, query and credentials are dropped."""
    if not url:
        return ""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host.removeprefix("www.")[:253]


def _no_anonymous_key(day: str) -> str:
    return ""


@dataclass(frozen=True)
class Lookups:
    """What enrichment consults besides the event itself."""

    pseudonymize_id: Callable[[str | None, Consent, str], str]
    key_id: str
    """The ring key's id: behind ``full`` consent's pseudonyms."""
    locate: Callable[[str], Place]
    anonymous_key_id: Callable[[str], str] = _no_anonymous_key
    """The id of a UTC day's key, behind that day's ``anonymous`` pseudonyms ('' when the day
    has none: the pseudonymizer then makes none either)."""


_CONSENT_OF_VALUE: Final = {consent.value: consent for consent in Consent}
"""A dict lookup: ``Consent(value)`` costs a tenth of the enrichment of an event."""


@lru_cache(maxsize=64)
def utc_day(unix_day: int) -> str:
    """``YYYY-MM-DD`` of a day counted from the epoch (a batch's events share a few)."""
    return datetime.fromtimestamp(unix_day * 86_400, UTC).strftime("%Y-%m-%d")


def enrich(event: Envelope, received_ms: int, lookups: Lookups) -> dict[str, Any]:
    """The enriched record of a validated event, with exactly its type's columns."""
    consent = _CONSENT_OF_VALUE[event.consent]
    event_time = event.client_time_ms // 1000
    if consent is Consent.ANONYMOUS:
        day = utc_day(event_time // 86_400)
        key_id = lookups.anonymous_key_id(day)
    else:
        day = ""
        key_id = lookups.key_id if consent is Consent.FULL else ""
    if event.user_agent:
        agent = parse_user_agent(event.user_agent)
    else:
        agent = Agent("", "", "", "", "other")
    place = lookups.locate(event.ip) if event.ip else NOWHERE
    if consent is not Consent.FULL:
        place = Place(place.country_code, "")
    record: dict[str, Any] = {  # in EnrichedEnvelope's order: the table's column order
        "event_id": event.event_id,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "event_time": event_time,
        "received_time": received_ms // 1000,
        "app_id": event.app_id,
        "channel": event.channel,
        "software_version": event.software_version,
        "consent": consent.value,
        "key_id": key_id,
        "user_pseudonym": lookups.pseudonymize_id(event.user_id, consent, day),
        "session_pseudonym": lookups.pseudonymize_id(event.session_id, consent, day),
        "browser_family": event.browser_family or agent.browser_family,
        "browser_version": _major(event.browser_version or "") or agent.browser_version,
        "os_family": event.os_family or agent.os_family,
        "os_version": _major(event.os_version or "") or agent.os_version,
        "device_class": agent.device_class,
        "country_code": place.country_code,
        "region_code": place.region_code,
        "referrer_domain": "" if consent is Consent.NONE else referrer_domain(event.referrer),
    }
    for name in _type_columns(event.event_type):
        record[name] = getattr(event, name, None)
    return record


_ENVELOPE_COLUMNS: Final = len(EnrichedEnvelope.model_fields)


@cache
def _type_columns(event_type: str) -> tuple[str, ...]:
    """A type's own columns, after the envelope's: the fields of all its versions, in table
    order (a field an older version lacks is None)."""
    return enriched_fields(event_type)[_ENVELOPE_COLUMNS:]
