"""The collector's edge without HTTP: body bounds and gzip, refusals by index and reason that
never hold a value, the collector's stamps over the client's, X-Forwarded-For only from
trusted proxies, keys and batch splitting."""

import gzip
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producers.collector.edge import (
    RequestRefused,
    client_ip,
    encode_batches,
    judge_events,
    parse_trusted_proxies,
    partition_key,
    read_body,
    response_body,
)
from schemas.batch import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, decode_message
from schemas.examples import EXAMPLES
from schemas.reasons import ReasonCode
from tests.strategies import examples

MARK = "zq7~SECRET~zq7"
NOW_MS = 1_764_300_000_000
APP = EXAMPLES["login"]["app_id"]
LIMIT = 64 * 1024


def _event(event_type: str = "login", **changes: Any) -> dict[str, Any]:
    """A valid event as a client sends it: fresh id, no stamps of its own."""
    fields = {**EXAMPLES[event_type], "event_id": str(uuid.uuid4()), "client_time_ms": NOW_MS}
    fields.pop("ip", None)
    fields.pop("collector_time_ms", None)
    return {**fields, **changes}


def _judge(items: list[Any], ip: str | None = "81.2.69.160", **kwargs: Any) -> Any:
    return judge_events(
        items, collector_time_ms=NOW_MS + 250, ip=ip, max_events=kwargs.pop("max_events", 500),
        **kwargs,
    )  # fmt: skip


def test_plain_and_gzip_bodies_read_alike():
    """A JSON array reads the same sent plain or gzip-encoded."""
    body = orjson.dumps([_event(), _event("logout")])
    assert read_body(body, None, max_bytes=LIMIT) == orjson.loads(body)
    assert read_body(gzip.compress(body), "gzip", max_bytes=LIMIT) == orjson.loads(body)


def test_bodies_over_the_bound_are_413_sent_or_decoded():
    """A body over the bound is 413 as sent, and so is a small gzip body that inflates past it."""
    with pytest.raises(RequestRefused) as sent:
        read_body(b"[" + b" " * LIMIT + b"]", None, max_bytes=LIMIT)
    bomb = gzip.compress(b"[" + b" " * (LIMIT * 50) + b"]")
    assert len(bomb) < LIMIT
    with pytest.raises(RequestRefused) as inflated:
        read_body(bomb, "gzip", max_bytes=LIMIT)
    assert (sent.value.status, sent.value.reason) == (413, "too_large")
    assert (inflated.value.status, inflated.value.reason) == (413, "too_large")


@pytest.mark.parametrize(
    ("body", "encoding", "status", "reason"),
    [
        (b'{"event_type": "login"}', None, 400, "malformed_json"),
        (f'["{MARK}'.encode(), None, 400, "malformed_json"),
        (b"\xff\xfe[]", None, 400, "malformed_json"),
        (b"[]", "br", 415, "unsupported_encoding"),
        (b"[] not gzip", "gzip", 400, "malformed_json"),
        (gzip.compress(b"[1, 2]")[:-6], "gzip", 400, "malformed_json"),
    ],
)
def test_broken_bodies_are_refused_whole_without_their_bytes(body, encoding, status, reason):
    """A body that is not a JSON array (or not what its encoding says) is refused as a whole,
    and the refusal says nothing of its bytes."""
    with pytest.raises(RequestRefused) as caught:
        read_body(body, encoding, max_bytes=LIMIT)
    assert (caught.value.status, caught.value.reason) == (status, reason)
    assert str(caught.value) == reason
    assert caught.value.__context__ is None


@settings(max_examples=examples(2000))
@given(body=st.binary(max_size=2048), gzipped=st.booleans(), encoding=st.sampled_from(
    [None, "gzip", "identity", "GZIP", "deflate"]))  # fmt: skip
def test_any_bytes_give_a_list_or_the_documented_refusal(body, gzipped, encoding):
    """Arbitrary bytes, gzipped or not, under any encoding header, give a list or a
    RequestRefused with a documented status: never another exception."""
    raw = gzip.compress(body) if gzipped else body
    try:
        assert isinstance(read_body(raw, encoding, max_bytes=1024), list)
    except RequestRefused as refusal:
        assert (refusal.status, refusal.reason) in {
            (400, "malformed_json"), (413, "too_large"), (415, "unsupported_encoding"),
        }  # fmt: skip


def test_refusals_name_index_and_reason_never_the_value():
    """Content, unknown fields, junk and bad fields are refused each by index and reason, the
    valid ones accepted in order; nothing in the answer holds a refused value."""
    good = [_event(), _event("logout")]
    items = [
        good[0],
        _event(note=f"{MARK} see you at nine"),
        MARK,
        _event(user_id=f"{MARK} and more words here"),
        _event(outcome=MARK),
        good[1],
        _event(client_time_ms=NOW_MS + 3_600_000),
    ]
    judged = _judge(items)
    answer = response_body(judged)
    assert answer["accepted"] == [good[0]["event_id"], good[1]["event_id"]]
    assert answer["refused"] == [
        {"index": 1, "reason": "content_forbidden"},
        {"index": 2, "reason": "malformed_json"},
        {"index": 3, "reason": "content_forbidden", "field": "user_id"},
        {"index": 4, "reason": "invalid_field", "field": "outcome"},
        {"index": 6, "reason": "clock_skew", "field": "client_time_ms"},
    ]
    assert MARK not in orjson.dumps(answer).decode()


def test_collector_stamps_replace_the_clients_claims():
    """The collector's time and IP replace whatever the client claimed, before validation."""
    claimed = _event(ip="10.9.9.9", collector_time_ms=NOW_MS - 86_400_000)
    judged = _judge([claimed], ip="81.2.69.160")
    (event,) = judged.accepted
    assert (event.ip, event.collector_time_ms) == ("81.2.69.160", NOW_MS + 250)
    unknown = _judge([_event(ip="10.9.9.9")], ip=None).accepted[0]
    assert unknown.ip is None


def test_events_of_another_app_are_refused_alone():
    """The request's app is the authorized one, else the first accepted event's; an event of
    another app is refused alone with app_mismatch (app_id)."""
    items = [_event(), _event(app_id="other.app"), _event()]
    judged = _judge(items)
    assert judged.app_id == APP and len(judged.accepted) == 2
    assert response_body(judged)["refused"] == [
        {"index": 1, "reason": "app_mismatch", "field": "app_id"}
    ]
    by_key = _judge(items, app_id="other.app")
    assert [e.app_id for e in by_key.accepted] == ["other.app"]
    assert [r.index for r in by_key.refused] == [0, 2]


def test_too_many_events_is_413():
    """More events than the limit refuse the request whole (413 too_large)."""
    with pytest.raises(RequestRefused) as caught:
        _judge([_event() for _ in range(4)], max_events=3)
    assert (caught.value.status, caught.value.reason) == (413, "too_large")


TRUSTED = parse_trusted_proxies("10.0.0.0/8, ::1")


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("81.2.69.160", None, "81.2.69.160"),
        ("81.2.69.160", "1.2.3.4", "81.2.69.160"),  # untrusted peer: its XFF is ignored
        ("10.0.0.5", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.5", "6.6.6.6, 1.2.3.4, 10.0.0.7", "1.2.3.4"),  # rightmost untrusted hop
        ("::1", "2001:db8::1", "2001:db8::1"),
        ("10.0.0.5", f"{MARK}", None),
        ("10.0.0.5", "10.0.0.9", "10.0.0.9"),
        ("10.0.0.5", None, "10.0.0.5"),
        (None, "1.2.3.4", None),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(peer, xff, expected):
    """X-Forwarded-For counts only when the socket peer is a trusted proxy, read from the right."""
    assert client_ip(peer, xff, TRUSTED) == expected


def test_trusted_proxies_refuse_junk_without_quoting_it():
    """A bad trusted-proxy list fails naming the item's position, not its text."""
    with pytest.raises(ValueError) as caught:
        parse_trusted_proxies(f"10.0.0.0/8,{MARK}")
    assert MARK not in str(caught.value) and "item 2" in str(caught.value)


def test_keys_are_stable_hashes_that_never_echo_ids():
    """A client's requests share a key (session id, else user id); the key shows no raw id."""
    judged = _judge([_event("session_start", session_id="s-123", user_id="u-000042")])
    key = partition_key(APP, judged.accepted, "b")
    assert key == partition_key(APP, _judge([_event(session_id="s-123")]).accepted, "c")
    assert b"s-123" not in key and b"u-000042" not in key and len(key) == 64
    by_user = partition_key(APP, _judge([_event()]).accepted, "b")
    assert by_user == partition_key(APP, _judge([_event("logout")]).accepted, "c")
    anonymous = _judge([_event(user_id=None, consent="none")]).accepted
    assert partition_key(APP, anonymous, "b1") != partition_key(APP, anonymous, "b2")


def test_large_requests_split_into_ordered_batches_within_bounds():
    """More events than a batch holds become consecutive batches, in order, each within
    MAX_BATCH_EVENTS and MAX_BATCH_BYTES, that the stream step reads back whole."""
    items = [_event(user_id=f"u-{n:06d}") for n in range(MAX_BATCH_EVENTS * 2 + 7)]
    judged = _judge(items, max_events=len(items))
    batch_id = str(uuid.uuid4())
    batches = encode_batches(judged, batch_id=batch_id)
    assert len(batches) >= 3
    ids = []
    for n, raw in enumerate(batches):
        assert len(raw) <= MAX_BATCH_BYTES
        decoded = decode_message(raw, received_ms=None)
        assert decoded.batched and all(not isinstance(e, Exception) for e in decoded.events)
        ids.extend(e.event_id for e in decoded.events)  # type: ignore[union-attr]
        assert (orjson.loads(raw)["batch_id"] == batch_id) == (n == 0)
    assert ids == [e["event_id"] for e in items]
    assert encode_batches(_judge([MARK]), batch_id=batch_id) == []


def test_an_unknown_field_is_refused_even_when_null():
    """Nulls are left out of what is sent, but an unknown key is refused whatever its value."""
    judged = _judge([_event(message=None), _event(referrer=None)])
    assert [e.referrer for e in judged.accepted] == [None]
    assert [(r.index, r.reason) for r in judged.refused] == [(0, ReasonCode.CONTENT_FORBIDDEN)]
