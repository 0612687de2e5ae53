"""Sessionization: pairing, timeouts, lateness, duplicates, and the summary's contract."""

import json
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.enriched import ENRICHED_COLUMNS, check_enriched, enriched_fields, table_name
from schemas.events import EVENT_MODELS, EVENT_TYPES
from schemas.examples import EXAMPLES
from schemas.reasons import ReasonCode
from schemas.summaries import OUTPUT_MODELS
from schemas.validation import InvalidEvent, decode_event
from sinks.migrations import MIGRATIONS, event_table_ddl
from sinks.writer import to_row
from streams.enrich import NOWHERE, Lookups, enrich
from streams.pseudonymize import HmacKey, Pseudonymizer
from streams.quality import QualityThresholds, estimate_mos
from streams.sessions import (
    SUMMARY_ID_NAMESPACE,
    SessionRules,
    SessionState,
    SessionStep,
    apply_session_event,
    expire_session,
    is_sessionized,
)
from tests.strategies import examples

KEY = HmacKey("k-test", b"0123456789abcdef0123456789abcdef")
LOOKUPS = Lookups(Pseudonymizer(KEY).pseudonymize_id, KEY.key_id, lambda _ip: NOWHERE)
RULES = SessionRules(
    silence_timeout_s=120,
    allowed_lateness_s=3600,
    thresholds=QualityThresholds(400, 30, 5, 300, 20, 1),
)
T0 = EXAMPLES["session_start"]["client_time_ms"]
TIMEOUT = 120_000
LATENESS = 3_600_000


def _enriched(event_type: str, **changes: object) -> dict[str, Any]:
    raw = orjson.dumps({**EXAMPLES[event_type], **changes})
    return enrich(decode_event(raw, received_ms=None), T0, LOOKUPS)


BASE = {t: _enriched(t) for t in ("session_start", "session_end", "quality_sample")}
BASE["quality_sample_v2"] = _enriched("quality_sample", schema_version=2, mos=4.2, codec="opus")
PSEUDONYM = BASE["session_start"]["session_pseudonym"]


def event(kind: str, at_ms: int, **fields: object) -> dict[str, Any]:
    """An enriched session event that happened at ``at_ms`` by the client's clock."""
    record = {**BASE[kind], "event_id": str(uuid.uuid4()), "event_time": at_ms // 1000}
    record.update(fields)
    return record


def run(
    events: list[tuple[dict[str, Any], int]], state: SessionState | None = None
) -> tuple[SessionState | None, list[dict[str, Any]], list[ReasonCode | None]]:
    """Apply events (record, arrival ms) in order; the state goes through JSON each time,
    as through the table's changelog."""
    summaries, refusals = [], []
    for record, received_ms in events:
        step = apply_session_event(state, record, received_ms, RULES)
        state = _through_changelog(step.state)
        refusals.append(step.refusal)
        if step.summary is not None:
            summaries.append(step.summary)
    return state, summaries, refusals


def _through_changelog(state: SessionState | None) -> SessionState | None:
    if state is None:
        return None
    data = json.loads(json.dumps(state.to_json(), allow_nan=False))
    assert SessionState.from_json(data) == state
    return SessionState.from_json(data)


def test_start_samples_end_make_one_summary_when_the_end_comes():
    """Paired at the end: server duration by arrival, the client's beside it, quality
    rolled up, a deterministic event id, and a record of the summary table's contract."""
    state, summaries, refusals = run(
        [
            (event("session_start", T0), T0 + 200),
            (event("quality_sample", T0 + 10_000, rtt_ms=100.0), T0 + 10_300),
            (event("quality_sample_v2", T0 + 20_000, rtt_ms=300.0, mos=4.0), T0 + 20_100),
            (event("session_end", T0 + 60_000, end_reason="normal", duration_ms=59_000),
             T0 + 61_000),
        ]
    )  # fmt: skip
    assert refusals == [None] * 4
    [summary] = summaries
    check_enriched(summary)
    assert tuple(summary) == enriched_fields("session_summary")
    assert summary["event_id"] == str(uuid.uuid5(SUMMARY_ID_NAMESPACE, PSEUDONYM))
    assert summary["event_time"] == T0 // 1000
    assert summary["received_time"] == (T0 + 61_000) // 1000
    assert summary["server_duration_ms"] == 60_800
    assert summary["client_duration_ms"] == 59_000
    assert (summary["session_kind"], summary["participants_bucket"]) == ("video", "3-5")
    assert summary["end_reason"] == "normal"
    assert summary["sample_count"] == 2
    assert summary["rtt_p50_ms"] == 200.0
    assert summary["rtt_p95_ms"] == pytest.approx(290.0)
    assert summary["client_mos"] == 4.0
    assert summary["mos_estimate"] == pytest.approx(
        (estimate_mos(100, 6.25, 0.8) + estimate_mos(300, 6.25, 0.8)) / 2
    )
    assert (summary["quality_class"], summary["quality_reason"]) == ("good", "")
    assert summary["worst_resolution"] == "720p"
    assert summary["user_pseudonym"] == BASE["session_start"]["user_pseudonym"]
    assert summary["key_id"] == "k-test" and summary["consent"] == "full"
    assert state is not None and state.is_closed
    assert len(json.dumps(state.to_json())) < 1000  # a tombstone keeps no samples


def test_start_without_end_closes_as_timeout():
    """Silent for the timeout: end reason ``timeout``, server duration from the start to the
    last arrival, no client duration, closed at the moment the silence reached the
    timeout whenever the expiry runs."""
    state, _, _ = run(
        [
            (event("session_start", T0), T0),
            (event("quality_sample", T0 + 30_000, packet_loss_pct=7.0), T0 + 30_000),
        ]
    )
    assert state is not None
    early = expire_session(state, T0 + 30_000 + TIMEOUT - 1, RULES)
    assert early == SessionStep(state) and early.state is state
    late = expire_session(state, T0 + 30_000 + TIMEOUT + 50_000, RULES)
    summary = late.summary
    assert summary is not None
    check_enriched(summary)
    assert summary["end_reason"] == "timeout"
    assert summary["server_duration_ms"] == 30_000
    assert summary["client_duration_ms"] is None
    assert summary["received_time"] == (T0 + 30_000 + TIMEOUT) // 1000
    assert (summary["quality_class"], summary["quality_reason"]) == ("poor", "loss")
    assert late.state is not None and late.state.is_closed
    assert expire_session(late.state, T0 + 30_000 + TIMEOUT + LATENESS - 1, RULES).state
    gone = expire_session(late.state, T0 + 30_000 + TIMEOUT + LATENESS, RULES)
    assert gone == SessionStep(None)


def test_end_without_start_waits_for_a_late_start_and_pairs_with_it():
    """The end arrives first; a start within the silence timeout still pairs. Arrivals
    reversed make the server duration unknown; the start's fields are taken."""
    _, summaries, refusals = run(
        [
            (event("session_end", T0 + 90_000, duration_ms=90_000), T0 + 90_500),
            (event("session_start", T0, session_kind="audio", participants_bucket="2"),
             T0 + 150_000),
        ]
    )  # fmt: skip
    assert refusals == [None, None]
    [summary] = summaries
    check_enriched(summary)
    assert summary["session_kind"] == "audio" and summary["participants_bucket"] == "2"
    assert summary["end_reason"] == "dropped"
    assert summary["server_duration_ms"] is None
    assert summary["client_duration_ms"] == 90_000
    assert summary["event_time"] == T0 // 1000
    assert summary["sample_count"] == 0 and summary["quality_class"] == ""
    assert summary["rtt_p95_ms"] is None and summary["mos_estimate"] is None


def test_end_without_start_is_summarized_at_the_timeout_with_the_start_unknown():
    """No start ever: the client's end reason and duration, the start's fields null, the
    event time that of the earliest event seen."""
    state, summaries, _ = run(
        [
            (event("quality_sample", T0 + 5_000), T0 + 6_000),
            (event("session_end", T0 + 9_000, end_reason="error", duration_ms=8_000),
             T0 + 9_500),
        ]
    )  # fmt: skip
    assert summaries == [] and state is not None
    step = expire_session(state, T0 + 9_500 + TIMEOUT, RULES)
    summary = step.summary
    assert summary is not None
    check_enriched(summary)
    assert summary["end_reason"] == "error"
    assert summary["session_kind"] is None and summary["participants_bucket"] is None
    assert summary["server_duration_ms"] is None
    assert summary["client_duration_ms"] == 8_000
    assert summary["event_time"] == (T0 + 5_000) // 1000
    assert summary["sample_count"] == 1


def test_a_second_end_or_start_is_a_duplicate_open_or_closed():
    """A second end of a closed session, a second end while waiting for the start and a
    second start are refused as ``duplicate``; the state is left as it was."""
    end = event("session_end", T0 + 9_000)
    waiting, _, _ = run([(end, T0 + 9_000)])
    again = apply_session_event(waiting, event("session_end", T0 + 9_000), T0 + 9_100, RULES)
    assert again.refusal is ReasonCode.DUPLICATE and again.state is waiting
    assert again.summary is None

    started, _, _ = run([(event("session_start", T0), T0)])
    restart = apply_session_event(started, event("session_start", T0 + 1), T0 + 1_000, RULES)
    assert restart.refusal is ReasonCode.DUPLICATE and restart.state is started

    closed, summaries, _ = run([(event("session_start", T0), T0), (end, T0 + 9_000)])
    assert len(summaries) == 1
    for record in (end, event("session_end", T0 + 9_000), event("session_start", T0)):
        step = apply_session_event(closed, record, T0 + 20_000, RULES)
        assert step == SessionStep(closed, None, ReasonCode.DUPLICATE)


def test_events_after_the_close_are_too_late_and_open_no_new_session():
    """A sample after the end (within lateness) finds the tombstone: ``too_late``. Once the
    tombstone is gone, an event that happened longer ago than the lateness is too late too,
    while a genuinely new one opens a session."""
    closed, _, _ = run([(event("session_start", T0), T0), (event("session_end", T0), T0 + 5_000)])
    sample = event("quality_sample", T0 + 4_000)
    step = apply_session_event(closed, sample, T0 + 7_000, RULES)
    assert step == SessionStep(closed, None, ReasonCode.TOO_LATE)
    timed_out, _, _ = run([(event("session_start", T0), T0)])
    late_end = apply_session_event(timed_out, event("session_end", T0), T0 + TIMEOUT + 1, RULES)
    assert late_end.refusal is ReasonCode.TOO_LATE  # no end was seen: late, not a duplicate
    assert late_end.summary is not None and late_end.summary["end_reason"] == "timeout"

    after = T0 + 5_000 + LATENESS
    stale = apply_session_event(closed, sample, after, RULES)
    assert stale == SessionStep(None, None, ReasonCode.TOO_LATE)
    fresh = apply_session_event(closed, event("quality_sample", after - 1_000), after, RULES)
    assert fresh.refusal is None and fresh.state is not None and not fresh.state.is_closed


def test_a_session_silent_past_the_timeout_is_closed_by_its_next_event():
    """No timer ran: the next event's arrival closes the silent session first (its summary
    comes out in the same step) and the event, now late, is refused."""
    open_state, _, _ = run([(event("session_start", T0), T0)])
    step = apply_session_event(open_state, event("quality_sample", T0), T0 + 500_000, RULES)
    assert step.summary is not None and step.summary["end_reason"] == "timeout"
    assert step.summary["received_time"] == (T0 + TIMEOUT) // 1000
    assert step.refusal is ReasonCode.TOO_LATE
    assert step.state is not None and step.state.closed_ms == T0 + TIMEOUT


def test_lateness_is_judged_when_an_event_would_open_a_session():
    """More than the allowed lateness between client time and arrival: ``too_late``; events
    of an open session are taken whatever their delay."""
    delayed = event("session_start", T0)
    assert apply_session_event(None, delayed, T0 + LATENESS + 1_000, RULES) == SessionStep(
        None, None, ReasonCode.TOO_LATE
    )
    assert apply_session_event(None, delayed, T0 + LATENESS, RULES).refusal is None
    open_state, _, _ = run([(event("quality_sample", T0 + LATENESS), T0 + LATENESS)])
    step = apply_session_event(open_state, delayed, T0 + LATENESS + 1_000, RULES)
    assert step.refusal is None and step.state is not None and step.state.start_event_time


def test_sessions_need_a_pseudonym_and_a_session_event():
    """Consent ``none`` keeps no session pseudonym: the caller skips such records, and
    records of other types or of another session are a caller's bug."""
    anonymous_none = event("quality_sample", T0, session_pseudonym="")
    assert not is_sessionized(anonymous_none)
    assert not is_sessionized(_enriched("login"))
    assert is_sessionized(event("quality_sample", T0))
    with pytest.raises(ValueError, match="pseudonym"):
        apply_session_event(None, anonymous_none, T0, RULES)
    with pytest.raises(ValueError):
        apply_session_event(None, _enriched("login"), T0, RULES)
    state, _, _ = run([(event("session_start", T0), T0)])
    with pytest.raises(ValueError, match="another session"):
        apply_session_event(state, event("session_end", T0, session_pseudonym="f" * 64), T0, RULES)


def test_state_of_a_long_call_stays_small():
    """Open with thousands of samples, the state stays under 20 KB of JSON."""
    state, _, _ = run([(event("session_start", T0), T0)])
    for i in range(3000):
        record = event("quality_sample", T0 + i * 1_000, rtt_ms=40.0 + i % 97 / 3)
        state = apply_session_event(state, record, T0 + i * 1_000, RULES).state
    assert state is not None and state.quality.count == 3000
    assert len(json.dumps(state.to_json())) < 20_000


def test_reading_an_unknown_state_format_fails_loudly():
    state, _, _ = run([(event("session_start", T0), T0)])
    assert state is not None
    with pytest.raises(ValueError, match="format"):
        SessionState.from_json({**state.to_json(), "format": 99})


# The summary as a record: its own table, no client may send one.


def test_summary_is_an_output_record_not_a_client_event():
    """``session_summary`` has columns and a table but no client declaration: a client
    sending one is refused like any undeclared type."""
    assert "session_summary" in ENRICHED_COLUMNS and "session_summary" in OUTPUT_MODELS
    assert "session_summary" not in EVENT_TYPES
    assert all(t != "session_summary" for t, _ in EVENT_MODELS)
    summary = run([(event("session_start", T0), T0), (event("session_end", T0), T0)])[1][0]
    forged = {**summary, "client_time_ms": T0}
    with pytest.raises(InvalidEvent) as caught:
        decode_event(orjson.dumps(forged), received_ms=None)
    assert caught.value.reason is ReasonCode.CONTENT_FORBIDDEN
    bare = {**EXAMPLES["login"], "event_type": "session_summary"}
    del bare["outcome"], bare["failure_reason"], bare["auth_method"]
    with pytest.raises(InvalidEvent) as caught:
        decode_event(orjson.dumps(bare), received_ms=None)
    assert caught.value.reason is ReasonCode.UNKNOWN_EVENT_TYPE


def test_summary_has_its_own_table_and_migration():
    """The sink writes it like any record, to ``session_summary_events``, created by its
    own migration with SQL that runs on ClickHouse 18.16."""
    summary = run([(event("session_start", T0), T0), (event("session_end", T0), T0)])[1][0]
    table, row = to_row(summary)
    assert table == "session_summary" and table_name(table) == "session_summary_events"
    assert len(row) == len(ENRICHED_COLUMNS["session_summary"])
    [migration] = [m for m in MIGRATIONS if m.name == "session_summary"]
    [ddl] = migration.statements(None)  # needs no backend
    assert ddl == event_table_ddl("session_summary")
    assert ddl.startswith("CREATE TABLE IF NOT EXISTS session_summary_events (")
    assert "ReplacingMergeTree()" in ddl and "ORDER BY (event_time, event_id)" in ddl
    assert "PARTITION BY toYYYYMMDD(event_time)" in ddl
    for modern in ("DateTime64", "LowCardinality", "Map(", "TTL", "CODEC"):
        assert modern not in ddl
    assert dict(ENRICHED_COLUMNS["session_summary"])["server_duration_ms"] == "Nullable(UInt32)"


def test_check_enriched_refuses_a_summary_out_of_contract():
    summary = run([(event("session_start", T0), T0), (event("session_end", T0), T0)])[1][0]
    with pytest.raises(ValueError):
        check_enriched({**summary, "quality_class": "excellent"})
    with pytest.raises(ValueError):
        check_enriched({k: v for k, v in summary.items() if k != "client_mos"})


# Properties over arbitrary event sequences of one session.

KINDS = ("session_start", "session_end", "quality_sample", "quality_sample_v2")
session_events = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 180_000),  # arrival after the previous event's
        st.integers(0, LATENESS + 60_000),  # client time before the arrival
        st.floats(0, 2000),  # rtt
        st.booleans(),  # run the timer before this event
    ),
    max_size=25,
)


@settings(max_examples=examples(1000))
@given(session_events)
def test_any_sequence_gives_at_most_one_summary_that_counts_what_was_taken(draws):
    """Whatever the order, types, delays and timer runs, with arrivals within the allowed
    lateness of each other: one summary at most before the final expiry and exactly one
    after it when an event was taken; it counts every sample taken, and every event not
    taken is refused as too late or duplicate."""
    state: SessionState | None = None
    summaries: list[dict[str, Any]] = []
    taken_samples = 0
    taken = 0
    arrival = T0
    for kind, gap, lag, rtt, tick in draws:
        arrival = min(arrival + gap, T0 + LATENESS - 1)
        if tick and state is not None:
            step = expire_session(state, arrival, RULES)
            state = _through_changelog(step.state)
            summaries += [step.summary] if step.summary else []
        record = event(kind, arrival - lag, rtt_ms=rtt)
        before = state.to_json() if state else None
        step = apply_session_event(state, record, arrival, RULES)
        assert (state.to_json() if state else None) == before  # the input is left as it was
        state = _through_changelog(step.state)
        summaries += [step.summary] if step.summary else []
        if step.refusal is None:
            taken += 1
            taken_samples += kind.startswith("quality_sample")
        else:
            assert step.refusal in (ReasonCode.TOO_LATE, ReasonCode.DUPLICATE)
        assert len(summaries) <= 1
    if state is not None:
        final = expire_session(state, arrival + TIMEOUT + LATENESS, RULES)
        assert final.state is None
        summaries += [final.summary] if final.summary else []
    assert len(summaries) == (1 if taken else 0)
    for summary in summaries:
        check_enriched(summary)
        assert summary["sample_count"] == taken_samples


@settings(max_examples=examples(300))
@given(
    st.lists(st.floats(0, 2000), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
)
def test_sample_order_does_not_change_the_summary(rtts, rng):
    """The same samples in another order within one session: the same summary."""

    def summary_of(values: list[float]) -> dict[str, Any]:
        events = [(event("session_start", T0), T0)]
        events += [(event("quality_sample", T0 + 1_000, rtt_ms=v), T0 + 1_000) for v in values]
        events += [(event("session_end", T0 + 2_000), T0 + 2_000)]
        return run(events)[1][0]

    shuffled = list(rtts)
    rng.shuffle(shuffled)
    first, second = summary_of(rtts), summary_of(shuffled)
    assert first["rtt_p50_ms"] == second["rtt_p50_ms"]
    assert first["rtt_p95_ms"] == second["rtt_p95_ms"]
    assert first["mos_estimate"] == pytest.approx(second["mos_estimate"])
    assert first["quality_class"] == second["quality_class"]
