"""Anonymous consent's daily keys: one random key per UTC day, made once across processes,
kept private and across restarts, destroyed past lateness so that nothing stored can
recompute or link that day's pseudonyms, and never made again for a finished day."""

import hashlib
import hmac
import logging
import multiprocessing
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.daily_keys import (
    DailyKey,
    DailyKeys,
    DailyKeyStore,
    FinishedThrough,
    format_daily_keys,
    parse_daily_line,
    read_daily_keys,
)
from deploy.keys import read_key_ring
from deploy.settings import Settings, SettingsError, load_settings
from deploy.wiring import CurrentLookups
from schemas.consent import Consent
from schemas.examples import EXAMPLES
from schemas.validation import decode_event
from streams.enrich import Lookups, enrich
from streams.pseudonymize import HmacKey, Pseudonymizer

TALLY = Path(sys.executable).parent / "tally"
HOUR_S = 3600.0
DAY_MS = 86_400_000
DAY1 = "2025-11-28"  # the UTC day of EXAMPLES' client_time_ms
DAY2 = "2025-11-29"


def at(day: str, hour: float) -> float:
    """The epoch second ``hour`` hours into the UTC ``day`` (past 24: into the next days)."""
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() + hour * HOUR_S


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store(path: Path, clock: Clock, lateness_s: float = HOUR_S) -> DailyKeyStore:
    return DailyKeyStore(path, lateness_s, clock=clock)


def anonymous_login(lookups: Lookups, *, days_later: int = 0) -> dict[str, Any]:
    """The example login of user u-000042 with anonymous consent, ``days_later`` days on."""
    shift = days_later * DAY_MS
    raw = orjson.dumps(
        {**EXAMPLES["login"], "consent": "anonymous",
         "client_time_ms": EXAMPLES["login"]["client_time_ms"] + shift,
         "collector_time_ms": EXAMPLES["login"]["collector_time_ms"] + shift}
    )  # fmt: skip
    event = decode_event(raw, received_ms=None)
    return enrich(event, event.collector_time_ms or 0, lookups)


class Worker:
    """A worker's lookups over a state folder, with both clocks in the test's hands."""

    def __init__(self, settings: Settings, wall: Clock) -> None:
        self.monotonic = 0.0
        self.current = CurrentLookups(
            settings, check_interval_s=5.0, clock=lambda: self.monotonic, wall_clock=wall
        )

    def lookups(self) -> Lookups:
        """The lookups after the next periodic check (which destroys days past lateness)."""
        self.monotonic += 5.0
        return self.current()


# ---- the file -------------------------------------------------------------------------------

days = st.dates().map(lambda d: d.isoformat()).filter(lambda d: len(d) == 10)
daily_keys = st.builds(
    lambda day, secret, created: DailyKey(day, HmacKey(f"day-{day}", secret), created),
    days,
    st.binary(min_size=16, max_size=64),
    st.none() | st.integers(min_value=0, max_value=2**40),
)


@given(st.lists(daily_keys, unique_by=lambda k: k.day, max_size=5), st.just("") | days)
def test_the_file_reads_back_what_was_written(
    tmp_path_factory: pytest.TempPathFactory, keys: list[DailyKey], finished: str
) -> None:
    written = DailyKeys({k.day: k for k in keys}, finished)
    path = tmp_path_factory.mktemp("daily") / "daily.keys"
    path.write_text(format_daily_keys(written))
    assert read_daily_keys(path) == written


SECRET_HEX = "5e" * 32
line_parts = st.sampled_from(
    ["day-2025-11-28", "day-2025-02-30", "day-20251128", "k1", "finished", "2025-11-28",
     SECRET_HEX, SECRET_HEX[:20], "1764288000", "-1", " ", ""]
) | st.text(max_size=12)  # fmt: skip


@given(st.lists(line_parts, min_size=1, max_size=4).map(":".join))
def test_a_line_is_a_day_key_or_the_finished_day_and_an_error_shows_no_secret(line: str) -> None:
    """Whatever the line, it parses to what it writes back as, or fails with a message that
    holds none of its text."""
    try:
        parsed = parse_daily_line(line)
    except ValueError as err:
        assert SECRET_HEX[:16] not in str(err) and "2025-11-28" not in str(err)
        return
    if isinstance(parsed, FinishedThrough):
        assert parse_daily_line(f"finished:{parsed.day}") == parsed
    else:
        rewritten = format_daily_keys(DailyKeys({parsed.day: parsed}))
        assert parse_daily_line(rewritten) == parsed
        assert parsed.key.key_id == f"day-{parsed.day}"
        assert SECRET_HEX[:16] not in repr(parsed)


# ---- making keys -------------------------------------------------------------------------


def test_a_day_key_is_random_private_and_kept_across_a_restart(tmp_path: Path) -> None:
    """The first ask makes a 32-byte key in a 0600 file in a 0700 folder; a worker restarted
    mid-day reads the same key, so the same id keeps the same pseudonym all day."""
    path = tmp_path / "secrets" / "daily.keys"
    clock = Clock(at(DAY1, 9))
    first = store(path, clock).key_for(DAY1)
    assert first is not None and first.key_id == f"day-{DAY1}" and len(first.secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert first.secret.hex() not in repr(first) + repr(store(path, clock))
    before = Pseudonymizer(HmacKey("k1", bytes(32)), store(path, clock).key_for)
    clock.now = at(DAY1, 20)
    after = Pseudonymizer(HmacKey("k2", bytes(range(32))), store(path, clock).key_for)
    pseudonym = before.pseudonymize_id("u-1", Consent.ANONYMOUS, DAY1)
    assert after.pseudonymize_id("u-1", Consent.ANONYMOUS, DAY1) == pseudonym != ""
    assert list(read_daily_keys(path).by_day) == [DAY1]


def _ask_for_every_day(path: Path, now: float, asked: list[str], start: Any, answers: Any) -> None:
    keys = DailyKeyStore(path, 30 * 86400.0, clock=lambda: now)
    start.wait(timeout=30)
    found = {day: keys.key_for(day) for day in asked}
    answers.put({day: key.secret.hex() if key else None for day, key in found.items()})


def test_two_processes_asking_at_once_get_the_same_key_for_each_day(tmp_path: Path) -> None:
    """Two worker processes asking for the same days at the same moment end up with one
    key per day, the same in both (file lock, then read again before making one)."""
    path = tmp_path / "secrets" / "daily.keys"
    now = at(DAY1, 12)
    asked = [datetime.fromtimestamp(now - n * 86400, UTC).date().isoformat() for n in range(25)]
    context = multiprocessing.get_context("fork")
    start, answers = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_ask_for_every_day, args=(path, now, asked, start, answers))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    seen = [answers.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert seen[0] == seen[1] and None not in seen[0].values()
    assert len(set(seen[0].values())) == len(asked)
    assert sorted(read_daily_keys(path).by_day) == sorted(asked)


def test_a_day_past_lateness_or_too_far_ahead_gets_no_key(tmp_path: Path) -> None:
    """Late events of yesterday still get its key within the lateness; from day end +
    lateness on, never (made or not); a key is made for today and tomorrow at most."""
    path = tmp_path / "daily.keys"
    clock = Clock(at(DAY2, 0.99))
    keys = store(path, clock)
    assert keys.key_for(DAY1) is not None
    clock.now = at(DAY2, 1)
    keys.destroy_expired()
    assert keys.key_for(DAY1) is None
    assert keys.key_for("2025-11-27") is None
    assert keys.key_for("2025-11-30") is not None  # tomorrow: a client clock ahead
    assert keys.key_for("2025-12-01") is None
    assert keys.key_for("2025-11-31") is None and keys.key_for("garbage") is None
    assert list(read_daily_keys(path).by_day) == ["2025-11-30"]


def test_an_event_of_a_finished_day_is_counted_without_ids_and_makes_no_key(
    tmp_path: Path,
) -> None:
    """An anonymous event of a day that ended more than the lateness ago, with no key ever
    made: no pseudonyms, no key id, and still no key for that day afterwards."""
    settings = load_settings({"TALLY_STATE_DIR": str(tmp_path)})
    worker = Worker(settings, Clock(at(DAY2, 1)))
    record = anonymous_login(worker.lookups())
    assert record["user_pseudonym"] == record["session_pseudonym"] == record["key_id"] == ""
    assert record["event_type"] == "login" and record["country_code"] == "GB"
    assert DAY1 not in read_daily_keys(settings.daily_keys_path).by_day


# ---- destroying keys -----------------------------------------------------------------------


def _keys_derivable_from(folder: Path) -> list[bytes]:
    """Every key a holder of the state folder could try: the ring's and the daily keys as
    read, and every 16- and 32-byte stretch of every file, raw or hex-encoded."""
    candidates: list[bytes] = []
    for path in (p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for size in (16, 32):
            candidates += [data[i : i + size] for i in range(len(data) - size + 1)]
        for run in re.findall(rb"[0-9a-fA-F]{32,}", data):
            for size in (32, 64):
                candidates += [bytes.fromhex(run[i : i + size].decode())
                               for i in range(0, len(run) - size + 1, 2)]  # fmt: skip
    return candidates


def test_a_destroyed_day_key_leaves_nothing_that_recomputes_its_pseudonyms(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once day 1 is past lateness its key is destroyed: the same id on day 2 gets an
    unrelated pseudonym, day 1's events get no ids any more, and no key stored anywhere
    under the state folder (ring or daily, read or raw) reproduces day 1's pseudonym, with
    or without the day as salt."""
    settings = load_settings({"TALLY_STATE_DIR": str(tmp_path)})
    wall = Clock(at(DAY1, 12))
    worker = Worker(settings, wall)
    day1 = anonymous_login(worker.lookups())
    assert day1["key_id"] == f"day-{DAY1}" and len(day1["user_pseudonym"]) == 64
    destroyed = read_daily_keys(settings.daily_keys_path).by_day[DAY1].key.secret

    wall.now = at(DAY1, 24 + 1)
    with caplog.at_level(logging.INFO, logger="deploy.wiring"):
        day2 = anonymous_login(worker.lookups(), days_later=1)
    assert f"destroyed the anonymous keys of {DAY1}" in caplog.text
    assert destroyed.hex() not in caplog.text
    assert day2["key_id"] == f"day-{DAY2}"
    assert day2["user_pseudonym"] not in ("", day1["user_pseudonym"])
    late = anonymous_login(worker.lookups())
    assert late["user_pseudonym"] == late["session_pseudonym"] == late["key_id"] == ""

    stored = tmp_path.rglob("*")
    assert not any(destroyed in p.read_bytes() or destroyed.hex().encode() in p.read_bytes()
                   for p in stored if p.is_file())  # fmt: skip
    remaining = [k.key.secret for k in read_key_ring(settings.hmac_key_path)]
    remaining += [k.key.secret for k in read_daily_keys(settings.daily_keys_path).by_day.values()]
    candidates = [*remaining, *_keys_derivable_from(tmp_path)]
    assert len(remaining) == 2 and len(candidates) > 100
    for key in candidates:
        for message in ("u-000042", f"{DAY1}|u-000042", f"{DAY1}u-000042"):
            mac = hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
            assert mac != day1["user_pseudonym"]


def test_destroying_writes_only_when_a_day_is_due(tmp_path: Path) -> None:
    """Asked again and again with nothing due, the store leaves the file alone; a day
    coming due is one rewrite (which also records the finished day), then nothing again."""
    path = tmp_path / "daily.keys"
    clock = Clock(at(DAY1, 12))
    keys = store(path, clock)
    keys.key_for(DAY1)
    signature = path.stat().st_ino, path.stat().st_mtime_ns
    assert keys.destroy_expired() == [] and keys.destroy_expired() == []
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == signature
    clock.now = at(DAY2, 1)
    assert keys.destroy_expired() == [DAY1]
    assert read_daily_keys(path) == DailyKeys({}, DAY1)
    signature = path.stat().st_ino, path.stat().st_mtime_ns
    assert keys.destroy_expired() == []
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == signature
    clock.now = at(DAY2, 24 + 1)
    assert keys.destroy_expired() == []
    assert read_daily_keys(path).finished_through == DAY2


def test_other_workers_follow_and_a_lagging_clock_never_revives_a_day(tmp_path: Path) -> None:
    """A second process takes up the first one's key for a day, and drops it once the
    first destroys it; its own clock, still within the lateness, makes no new key for that
    day: the file remembers the day as finished."""
    path = tmp_path / "daily.keys"
    ahead, behind = Clock(at(DAY1, 12)), Clock(at(DAY1, 12))
    first, second = store(path, ahead), store(path, behind)
    made = first.key_for(DAY1)
    assert made is not None and second.key_for(DAY1) == made
    ahead.now, behind.now = at(DAY2, 1), at(DAY2, 0.5)
    assert first.destroy_expired() == [DAY1]
    assert second.refresh() is True
    assert second.key_for(DAY1) is None
    assert DAY1 not in read_daily_keys(path).by_day
    assert second.refresh() is False


def test_a_malformed_file_stops_the_start_with_one_line_and_no_secret(tmp_path: Path) -> None:
    settings = load_settings({"TALLY_STATE_DIR": str(tmp_path)})
    settings.daily_keys_path.parent.mkdir(parents=True)
    settings.daily_keys_path.write_text(f"day-{DAY1}:{SECRET_HEX}:1\nday-{DAY1}:{SECRET_HEX}\n")
    with pytest.raises(SettingsError, match=r"TALLY_DAILY_KEYS_FILE: .* line 2") as caught:
        CurrentLookups(settings)
    assert SECRET_HEX[:16] not in str(caught.value)


def test_tally_keys_list_shows_daily_key_ids_and_ages_never_secrets(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "daily.keys"
    today = datetime.now(UTC).date().isoformat()
    made = DailyKeyStore(path, HOUR_S).key_for(today)
    env = {"PATH": "/usr/bin:/bin", "TALLY_STATE_DIR": str(tmp_path)}
    listed = subprocess.run([str(TALLY), "keys", "list"], env=env, capture_output=True,
                            text=True, timeout=60, check=True).stdout  # fmt: skip
    print(listed)
    assert made is not None and made.secret.hex()[:16] not in listed
    lines = listed.splitlines()
    assert lines[0].split() == ["KEY", "AGE"] and lines[1].startswith("k1 ")
    assert lines[2].startswith(f"day-{today} ") and f"anonymous consent on {today}" in lines[2]
