"""The apps registry without HTTP: keys issued once and kept as hashes in a 0600 file, names
that are app ids, origins as browsers send them, revocation, re-reading a changed file at
most once per interval, key parsing, and the token bucket and pending-events bound."""

import os
import re
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producers.collector.apps import (
    MAX_KEY_CHARS,
    AppRegistry,
    AppsError,
    bearer_key,
    list_apps,
    normalize_origin,
    query_key,
    register_app,
    revoke_app,
)
from producers.collector.limits import (
    KeyRateLimiter,
    PendingEvents,
    RateLimit,
    TokenBucket,
    retry_after_s,
)
from tests.strategies import examples

TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_issued_once_and_stored_only_as_hashes(tmp_path: Path) -> None:
    """register_app returns two distinct random keys; the file (mode 0600) holds neither,
    and the registry finds each key's app and kind; the keys stay out of reprs."""
    path = tmp_path / "state" / "apps.json"
    keys = register_app(path, "chat.web", ["https://chat.example"])
    again = register_app(path, "chat.desktop", [])
    assert keys.app_id == "chat.web"
    assert keys.write_key.startswith("tw_") and keys.secret_key.startswith("ts_")
    assert len({keys.write_key, keys.secret_key, again.write_key, again.secret_key}) == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for key in (keys.write_key, keys.secret_key, again.write_key, again.secret_key):
        assert key not in text and key[3:] not in text
        assert key not in repr(keys) + repr(again)
    registry = AppRegistry(path)
    write, secret = registry.lookup(keys.write_key), registry.lookup(keys.secret_key)
    assert write is not None and (write.app_id, write.kind) == ("chat.web", "write")
    assert secret is not None and (secret.app_id, secret.kind) == ("chat.web", "secret")
    assert write.origins == frozenset({"https://chat.example"})
    assert registry.lookup(keys.write_key + "x") is None
    assert registry.lookup("tw_" + "A" * 43) is None
    assert not list(tmp_path.glob("state/.apps.json.*.tmp"))


@pytest.mark.parametrize("name", ["Chat", "1chat", "chat web", "", "a" * 49, "chat/../x", "é"])
def test_names_that_are_not_app_ids_are_refused(tmp_path: Path, name: str) -> None:
    """An app name must match the schema's AppId, since events' app_id must equal it."""
    with pytest.raises(AppsError, match="not a valid app_id"):
        register_app(tmp_path / "apps.json", name, [])
    assert not (tmp_path / "apps.json").exists()


@pytest.mark.parametrize(
    ("given_origin", "expected"),
    [
        ("https://chat.example", "https://chat.example"),
        ("HTTPS://Chat.Example:443/", "https://chat.example"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://chat.example:80", "http://chat.example"),
        ("https://chat.example:8443", "https://chat.example:8443"),
        ("http://[::1]:3000", "http://[::1]:3000"),
    ],
)
def test_origins_are_kept_as_browsers_send_them(given_origin: str, expected: str) -> None:
    """Scheme and host in lower case, default ports dropped, no trailing slash."""
    assert normalize_origin(given_origin) == expected


@pytest.mark.parametrize(
    "origin",
    ["chat.example", "ftp://chat.example", "https://*.chat.example", "https://chat.example/app",
     "https://u:p@chat.example", "https://chat.example?x=1", "https://", "null", "*",
     "https://bücher.example", "https://chat.example:99999"],
)  # fmt: skip
def test_origins_that_are_not_origins_are_refused(tmp_path: Path, origin: str) -> None:
    """Paths, wildcards, other schemes, credentials and non-ASCII hosts are not origins."""
    with pytest.raises(AppsError, match="origin"):
        register_app(tmp_path / "apps.json", "chat.web", [origin])


def test_an_active_name_is_refused_a_revoked_one_registers_anew(tmp_path: Path) -> None:
    """Registering an active app again fails (unless replace), leaving its keys working;
    revoking turns its keys away, and list shows when; the name may then get new keys."""
    path = tmp_path / "apps.json"
    first = register_app(path, "chat.web", ["https://chat.example"])
    with pytest.raises(AppsError, match="already registered"):
        register_app(path, "chat.web", [])
    assert AppRegistry(path).lookup(first.write_key) is not None
    assert revoke_app(path, "chat.web") is True
    assert revoke_app(path, "chat.web") is False
    with pytest.raises(AppsError, match="no app named"):
        revoke_app(path, "nope")
    (info,) = list_apps(path)
    assert info.revoked is not None and info.origins == ("https://chat.example",)
    registry = AppRegistry(path)
    assert registry.lookup(first.write_key) is None and registry.lookup(first.secret_key) is None
    assert not registry.origin_registered("https://chat.example")
    second = register_app(path, "chat.web", ["https://new.example"])
    third = register_app(path, "chat.web", ["https://new.example"], replace=True)
    registry = AppRegistry(path)
    assert registry.lookup(second.write_key) is None
    assert registry.lookup(third.write_key) is not None
    assert [a.revoked for a in list_apps(path)] == [None]


def test_concurrent_registrations_all_land(tmp_path: Path) -> None:
    """Several writers at once (each a locked read-change-write) lose no app."""
    path = tmp_path / "apps.json"
    threads = [threading.Thread(target=register_app, args=(path, f"app{n}", [])) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.app_id for a in list_apps(path)] == [f"app{n}" for n in range(8)]


def test_the_registry_rereads_a_changed_file_at_most_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups within the interval never stat the file; after it, one stat sees a new app
    or a revocation; without a change nothing is read again."""
    path = tmp_path / "apps.json"
    old = register_app(path, "chat.web", [])
    clock = FakeClock()
    registry = AppRegistry(path, check_interval_s=1.0, clock=clock)
    stats: list[object] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    new = register_app(path, "chat.desktop", [])
    stats.clear()
    for _ in range(1000):
        assert registry.lookup(new.write_key) is None
        clock.now += 0.0005
    assert stats == []
    clock.now += 0.6
    assert registry.lookup(new.write_key) is not None
    assert len(stats) == 1
    revoke_app(path, "chat.web")
    assert registry.lookup(old.write_key) is not None  # within the interval: not yet seen
    clock.now += 1.0
    assert registry.lookup(old.write_key) is None
    assert registry.active_apps == 1


def test_a_broken_file_fails_at_start_and_is_ignored_while_running(tmp_path: Path) -> None:
    """A file that is not a registry raises at construction (naming the file, quoting
    nothing); while running, it keeps the last good apps. No file: no apps."""
    path = tmp_path / "apps.json"
    assert AppRegistry(path).active_apps == 0 and list_apps(path) == []
    keys = register_app(path, "chat.web", [])
    clock = FakeClock()
    registry = AppRegistry(path, clock=clock)
    good = path.read_text()
    path.write_text('{"version": 1, "apps": [{"app_id": "zq7-MARK"}]}')
    clock.now += 2
    assert registry.lookup(keys.write_key) is not None
    with pytest.raises(AppsError) as caught:
        AppRegistry(path)
    assert str(path) in str(caught.value) and "MARK" not in str(caught.value)
    path.write_text(good.replace('"chat.web"', '"chat.other"'))
    clock.now += 2
    match = registry.lookup(keys.write_key)
    assert match is not None and match.app_id == "chat.other"


TOKENS = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=MAX_KEY_CHARS - 2)
SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"])


@settings(max_examples=examples(2000))
@given(token=TOKENS, padding=st.integers(0, 2), scheme=SCHEMES, spaces=st.integers(1, 3),
       trailing=st.sampled_from(["", " ", "\t"]))  # fmt: skip
def test_bearer_keys_are_read_back_exactly(token, padding, scheme, spaces, trailing):
    """Any RFC 6750 token after the Bearer scheme, in any case and spacing, is read back."""
    token += "=" * padding
    assert bearer_key(f"{scheme}{' ' * spaces}{token}{trailing}") == token


@settings(max_examples=examples(2000))
@given(header=st.one_of(st.text(max_size=300), st.builds(lambda t: "Bearer " + t, st.text())))
def test_any_authorization_header_gives_a_token_or_none(header):
    """Arbitrary header text never raises: it gives None or a well-formed token it holds."""
    key = bearer_key(header)
    assert key is None or (
        key in header and re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", key) and len(key) <= MAX_KEY_CHARS
    )
    value = query_key(header)
    assert value is None or value == header


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer a b", "Bearer tw_é",
     "Token tw_abc", "Bearer " + "a" * (MAX_KEY_CHARS + 17), "Bearer\ttw_abc"],
)  # fmt: skip
def test_malformed_authorization_gives_no_key(header):
    """Other schemes, empty or spaced tokens, non-token characters and overlong keys: none."""
    assert bearer_key(header) is None


def test_token_bucket_spends_its_burst_then_refills_at_its_rate():
    """A burst of requests passes, the next waits for a token, which comes at the rate."""
    bucket = TokenBucket(RateLimit(per_s=10.0, burst=3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0
    assert [bucket.take(100.0) for _ in range(4)][-1] > 0  # refilled to the burst, no more
    assert (retry_after_s(0.01), retry_after_s(1.0), retry_after_s(1.2)) == (1, 1, 2)
    limiter = KeyRateLimiter()
    one = RateLimit(per_s=1.0, burst=1)
    assert limiter.take(b"a", one, 0.0) == 0.0 and limiter.take(b"a", one, 0.0) > 0
    assert limiter.take(b"b", one, 0.0) == 0.0  # each key its own bucket
    with pytest.raises(ValueError):
        RateLimit(per_s=0.0, burst=1)


def test_pending_events_refuse_what_would_pass_the_bound():
    """Events are held while within the bound; a hold that would pass it is refused whole."""
    pending = PendingEvents(5)
    assert pending.try_hold(3) and not pending.try_hold(3) and pending.try_hold(2)
    assert pending.full() and not pending.try_hold(1)
    pending.release(3)
    assert not pending.full() and pending.count == 2
