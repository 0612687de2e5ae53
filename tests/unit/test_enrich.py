"""The stream step's pure core: pseudonyms, consent, geo, user agent, referrer."""

import hashlib
import hmac
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import orjson
import pytest
import user_agents
from hypothesis import given
from hypothesis import strategies as st

from schemas.enriched import check_enriched, enriched_fields
from schemas.examples import EXAMPLES
from schemas.reasons import ReasonCode
from schemas.validation import decode_event
from streams.dedupe import RecentEventIds
from streams.enrich import (
    GeoLookup,
    Lookups,
    enrich,
    parse_user_agent,
    referrer_domain,
    utc_day,
)
from streams.pseudonymize import HmacKey, Pseudonymizer
from streams.steps import Origin, validate_and_enrich
from tests.geo import DEFAULT_GEOIP_DATABASE

KEY = HmacKey("k-test", b"0123456789abcdef0123456789abcdef")
ORIGIN = Origin("tally.events.raw", 0, 7, EXAMPLES["login"]["collector_time_ms"])


@cache
def day_key(day: str) -> HmacKey:
    """A stand-in for the daily key store (deploy/daily_keys.py): one key per day."""
    return HmacKey(f"day-{day}", hashlib.sha256(f"test {day}".encode()).digest())


def with_day_keys(key: HmacKey, locate) -> Lookups:
    pseudonymizer = Pseudonymizer(key, day_key)
    return Lookups(
        pseudonymizer.pseudonymize_id, key.key_id, locate, pseudonymizer.anonymous_key_id
    )


@pytest.fixture(scope="module")
def lookups():
    geo = GeoLookup(DEFAULT_GEOIP_DATABASE)
    yield with_day_keys(KEY, geo.locate)
    geo.close()


def enriched(event_type: str, lookups: Lookups, **changes: object) -> dict:
    raw = orjson.dumps({**EXAMPLES[event_type], **changes})
    event = decode_event(raw, received_ms=None)
    return enrich(event, event.collector_time_ms or 0, lookups)


def test_user_id_becomes_its_keyed_hmac(lookups):
    """With full consent the user id is HMAC-SHA256(key, id), tagged with the key id."""
    record = enriched("login", lookups)
    expected = hmac.new(KEY.secret, b"u-000042", hashlib.sha256).hexdigest()
    assert record["user_pseudonym"] == expected
    assert record["key_id"] == "k-test"


@pytest.mark.parametrize("event_type", sorted(EXAMPLES))
def test_no_raw_id_ip_agent_or_url_survives(event_type, lookups):
    """The enriched record holds none of the raw id, IP, user agent or full referrer."""
    record = enriched(event_type, lookups)
    text = orjson.dumps(record).decode()
    for raw in ("u-000042", "s-9001", "81.2.69.160", "Mozilla", "/blog/post", "id=7"):
        assert raw not in text
    check_enriched(record)
    assert tuple(record) == enriched_fields(event_type)


def test_ip_becomes_a_country(lookups):
    """The IP is looked up in the real DB-IP City Lite database and then dropped."""
    assert enriched("login", lookups)["country_code"] == "GB"


def test_anonymous_consent_ids_change_with_the_day(lookups):
    """Anonymous ids are stable within a UTC day and differ across days."""
    day1 = enriched("login", lookups, consent="anonymous")
    same_day = enriched(
        "login", lookups, consent="anonymous", event_id="6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8aff"
    )
    next_day = enriched(
        "login", lookups, consent="anonymous",
        client_time_ms=EXAMPLES["login"]["client_time_ms"] + 86_400_000,
        collector_time_ms=EXAMPLES["login"]["collector_time_ms"] + 86_400_000,
    )  # fmt: skip
    assert day1["user_pseudonym"] == same_day["user_pseudonym"] != next_day["user_pseudonym"]
    assert day1["user_pseudonym"] != enriched("login", lookups)["user_pseudonym"]
    assert day1["region_code"] == ""


def _hmac(message: str, key: HmacKey = KEY) -> str:
    return hmac.new(key.secret, message.encode(), hashlib.sha256).hexdigest()


DAY = "2025-11-28"  # the UTC day of EXAMPLES' client_time_ms
KEPT_BY_CONSENT = {
    "full": {"user_pseudonym": _hmac("u-000042"), "session_pseudonym": _hmac("s-9001"),
             "key_id": "k-test", "region_code": "England", "referrer_domain": "example.org"},
    "anonymous": {"user_pseudonym": _hmac("u-000042", day_key(DAY)),
                  "session_pseudonym": _hmac("s-9001", day_key(DAY)), "key_id": f"day-{DAY}",
                  "region_code": "", "referrer_domain": "example.org"},
    "none": {"user_pseudonym": "", "session_pseudonym": "", "key_id": "", "region_code": "",
             "referrer_domain": ""},
}  # fmt: skip


@pytest.mark.parametrize("consent", sorted(KEPT_BY_CONSENT))
def test_each_consent_level_keeps_exactly_its_fields(consent, lookups):
    """Pseudonyms, key id, region and referrer are exactly what the consent level allows;
    browser, OS, device and country are kept at every level."""
    record = enriched(
        "session_start", lookups, consent=consent, referrer="https://www.example.org/a/b?c=d"
    )
    assert {k: record[k] for k in KEPT_BY_CONSENT[consent]} == KEPT_BY_CONSENT[consent]
    assert (record["country_code"], record["browser_family"], record["os_family"]) == (
        "GB", "Chrome", "Windows"
    )  # fmt: skip
    assert record["device_class"] == "desktop"


def test_anonymous_session_pseudonyms_change_with_the_day(lookups):
    """An anonymous session id seen on two UTC days gets two unrelated pseudonyms."""
    day1 = enriched("session_start", lookups, consent="anonymous")
    next_day = enriched(
        "session_start", lookups, consent="anonymous",
        client_time_ms=EXAMPLES["session_start"]["client_time_ms"] + 86_400_000,
        collector_time_ms=EXAMPLES["session_start"]["collector_time_ms"] + 86_400_000,
    )  # fmt: skip
    assert day1["session_pseudonym"] != next_day["session_pseudonym"]
    assert next_day["session_pseudonym"] not in ("", _hmac("s-9001"))


def test_anonymous_pseudonyms_owe_nothing_to_the_ring_key(lookups):
    """Another ring key leaves anonymous pseudonyms as they were, and no HMAC under the ring
    key (with or without the day) reproduces one: the long-lived key cannot link them."""
    pseudonym = enriched("login", lookups, consent="anonymous")["user_pseudonym"]
    other_ring = with_day_keys(HmacKey("k-other", bytes(range(32))), lookups.locate)
    assert enriched("login", other_ring, consent="anonymous")["user_pseudonym"] == pseudonym
    assert pseudonym not in (_hmac("u-000042"), _hmac(f"{DAY}|u-000042"))


def test_anonymous_events_of_a_day_without_key_keep_no_ids(lookups):
    """When the day's key is gone, anonymous events are still counted, with no ids and no
    key id; full consent is untouched."""
    pseudonymizer = Pseudonymizer(KEY, lambda day: None)
    keyless = Lookups(
        pseudonymizer.pseudonymize_id, KEY.key_id, lookups.locate, pseudonymizer.anonymous_key_id
    )
    record = enriched("session_start", keyless, consent="anonymous")
    assert record["user_pseudonym"] == record["session_pseudonym"] == record["key_id"] == ""
    assert record["country_code"] == "GB" and record["event_type"] == "session_start"
    assert enriched("login", keyless)["user_pseudonym"] == _hmac("u-000042")
    legacy = Lookups(Pseudonymizer(KEY).pseudonymize_id, KEY.key_id, lookups.locate)
    assert enriched("login", legacy, consent="anonymous")["key_id"] == ""


def test_no_consent_keeps_no_identifier(lookups):
    """With consent none: no pseudonyms, no key id, no region, no referrer; still counted."""
    record = enriched("session_end", lookups, consent="none")
    assert record["user_pseudonym"] == record["session_pseudonym"] == record["key_id"] == ""
    assert record["region_code"] == record["referrer_domain"] == ""
    assert record["end_reason"] == "dropped" and record["country_code"] == "GB"


def test_user_agent_becomes_browser_os_and_device():
    """A Chrome on Windows agent is Chrome 120 on Windows 10, a desktop."""
    agent = parse_user_agent(EXAMPLES["login"]["user_agent"])
    assert (agent.browser_family, agent.browser_version) == ("Chrome", "120")
    assert (agent.os_family, agent.device_class) == ("Windows", "desktop")


@pytest.mark.parametrize(
    ("url", "domain"),
    [("https://www.example.org/a?b=c", "example.org"), ("http://user:pw@news.example.com:8080/x",
      "news.example.com"), (None, ""), ("https://[::1", "")],
)  # fmt: skip
def test_referrer_is_cut_to_its_domain(url, domain):
    """Path, query, port and credentials of a referrer are dropped."""
    assert referrer_domain(url) == domain


def test_invalid_event_becomes_a_redacted_dead_letter(lookups):
    """A refused event yields a dead letter with its reason and origin, and no values."""
    raw = orjson.dumps({**EXAMPLES["login"], "message": "meet me at 9 u-000042"})
    outcome = validate_and_enrich(raw, ORIGIN, lookups)
    assert outcome.destination == "dead"
    assert outcome.reason is ReasonCode.CONTENT_FORBIDDEN
    letter = orjson.loads(outcome.value)
    assert letter["reason"] == "content_forbidden" and letter["source"]["offset"] == 7
    for raw_value in (b"meet", b"u-000042", b"81.2.69.160", b"Mozilla"):
        assert raw_value not in outcome.value


@pytest.mark.parametrize(
    ("changes", "reason", "event_type"),
    [({"message": "hi"}, "content_forbidden", "login"),
     ({"outcome": "maybe"}, "invalid_field", "login"),
     ({"schema_version": 99}, "unsupported_version", "login"),
     ({"event_type": "chat_message"}, "unknown_event_type", None),
     ({"event_type": "login please read this"}, "content_forbidden", None)],
)  # fmt: skip
def test_a_dead_letter_keeps_the_declared_event_type_only(changes, reason, event_type, lookups):
    """A dead letter names the event type when it is a declared one, and null otherwise."""
    raw = orjson.dumps({**EXAMPLES["login"], **changes})
    letter = orjson.loads(validate_and_enrich(raw, ORIGIN, lookups).value)
    assert (letter["reason"], letter["event_type"]) == (reason, event_type)


def test_a_bug_in_enrichment_costs_one_event_not_the_worker():
    """An exception inside enrichment is a processing_error dead letter, not a crash."""

    def broken_geo(ip: str) -> object:
        raise RuntimeError(f"boom {ip}")

    lookups = Lookups(Pseudonymizer(KEY).pseudonymize_id, KEY.key_id, broken_geo)  # type: ignore[arg-type]
    outcome = validate_and_enrich(orjson.dumps(EXAMPLES["login"]), ORIGIN, lookups)
    assert outcome.reason is ReasonCode.PROCESSING_ERROR
    assert orjson.loads(outcome.value)["event_type"] == "login"
    assert b"81.2.69.160" not in outcome.value


def test_key_secret_never_shows():
    """Neither an HMAC key nor a pseudonymizer shows its secret in a repr."""
    assert "0123456789abcdef" not in repr(KEY) + repr(Pseudonymizer(KEY))
    with pytest.raises(ValueError, match="k-short"):
        HmacKey("k-short", b"short")


def test_a_retried_send_is_a_duplicate(lookups):
    """The same event id twice: enriched once, then a duplicate dead letter; forgotten once
    more ids than the bound came after it."""
    recent = RecentEventIds(max_ids=2)
    raw = orjson.dumps(EXAMPLES["login"])
    assert validate_and_enrich(raw, ORIGIN, lookups, recent).destination == "enriched"
    recent.remember(0, 0, 0)
    assert validate_and_enrich(raw, ORIGIN, lookups, recent).reason is ReasonCode.DUPLICATE
    for n in range(2):
        other = {**EXAMPLES["login"], "event_id": f"00000000-0000-4000-8000-00000000000{n}"}
        validate_and_enrich(orjson.dumps(other), ORIGIN, lookups, recent)
        recent.remember(0, n + 1, 0)
    assert validate_and_enrich(raw, ORIGIN, lookups, recent).destination == "enriched"


REAL_USER_AGENTS = [
    line.rstrip("\n")
    for line in (Path(__file__).parents[1] / "data" / "user_agents.txt").open()
    if not line.startswith("#")
]


def _agent_by_user_agents(user_agent: str) -> tuple[str, str, str, str, str]:
    """What the user-agents package itself says (its pure-Python parse)."""
    ua = user_agents.parse(user_agent)
    device = next(
        (name for name, yes in (("bot", ua.is_bot), ("tablet", ua.is_tablet),
                                ("mobile", ua.is_mobile), ("desktop", ua.is_pc)) if yes),
        "other",
    )  # fmt: skip
    return (
        ua.browser.family[:64],
        ua.browser.version_string.split(".", 1)[0],
        ua.os.family[:64],
        ua.os.version_string.split(".", 1)[0],
        device,
    )


def test_fast_user_agent_parse_agrees_with_user_agents_on_real_strings():
    """The Rust-backed parse gives the browser, OS, their major versions and the device
    class the user-agents package gives, on 400 real strings of every kind (browsers,
    apps, crawlers, phones, tablets, consoles)."""
    assert len(REAL_USER_AGENTS) == 400
    parse_user_agent.cache_clear()
    differ = [
        ua for ua in REAL_USER_AGENTS if tuple(parse_user_agent(ua)) != _agent_by_user_agents(ua)
    ]
    assert not differ, differ[:5]
    classes = {parse_user_agent(ua).device_class for ua in REAL_USER_AGENTS}
    assert classes == {"bot", "tablet", "mobile", "desktop", "other"}


@given(st.integers(min_value=-(2**34), max_value=2**34))
def test_the_cached_utc_day_is_the_calendar_day_of_the_time(unix_s: int) -> None:
    assert utc_day(unix_s // 86_400) == datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d")


def test_the_geo_cache_gives_what_the_database_gives_and_stays_bounded() -> None:
    geo = GeoLookup(DEFAULT_GEOIP_DATABASE, cache_size=2)
    try:
        addresses = ["81.2.69.160", "2a02:ec0::1", "8.8.8.8", "81.2.69.160", "not an ip"]
        for address in addresses:
            assert geo.locate(address) == geo._locate(address)
        assert geo.locate("81.2.69.160").country_code == "GB"
        info = geo.locate.cache_info()  # type: ignore[attr-defined]
        assert info.currsize == 2 and info.hits >= 1
    finally:
        geo.close()
