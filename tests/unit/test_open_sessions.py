"""The worker's hold on its sessions: refusals become dead letters, summaries become enriched
records, a replayed message is not counted twice, and a restarted worker carries on from the
table exactly where the killed one left it."""

import uuid
from typing import Any

import orjson

from schemas.examples import EXAMPLES
from schemas.validation import decode_event
from streams.enrich import NOWHERE, Lookups, enrich
from streams.open_sessions import OpenSessions, summary_outcome
from streams.pseudonymize import HmacKey, Pseudonymizer
from streams.quality import QualityThresholds
from streams.sessions import SessionRules
from streams.steps import Origin, Outcome

KEY = HmacKey("k-test", b"0123456789abcdef0123456789abcdef")
LOOKUPS = Lookups(Pseudonymizer(KEY).pseudonymize_id, KEY.key_id, lambda _ip: NOWHERE)
RULES = SessionRules(120, 3600, QualityThresholds(400, 30, 5, 300, 20, 1))
T0 = EXAMPLES["session_start"]["client_time_ms"]


def outcome(event_type: str, received_ms: int, index: int, **changes: Any) -> Outcome:
    raw = orjson.dumps({**EXAMPLES[event_type], "event_id": str(uuid.uuid4()), **changes})
    record = enrich(decode_event(raw, received_ms=None), received_ms, LOOKUPS)
    value = orjson.dumps(record)
    return Outcome("enriched", b"k", value, None, record, received_ms, index)


def origin(offset: int, partition: int = 0) -> Origin:
    return Origin("raw", partition, offset, T0)


def table_after(sessions: OpenSessions, table: dict[bytes, bytes]) -> dict[bytes, bytes]:
    for write in sessions.take_writes():
        if write.value is None:
            table.pop(write.key, None)
        else:
            table[write.key] = write.value
    return table


def test_a_call_gives_one_summary_and_a_second_end_is_a_dead_letter():
    sessions = OpenSessions(RULES)
    start = outcome("session_start", T0, 0)
    sample = outcome("quality_sample", T0 + 10_000, 1)
    end = outcome("session_end", T0 + 60_000, 2, end_reason="normal")
    judged, summaries = sessions.apply([start, sample, end], origin(5), T0 + 60_000)
    assert judged == [start, sample, end]
    (summary,) = summaries
    assert (summary["end_reason"], summary["sample_count"]) == ("normal", 1)
    assert summary["server_duration_ms"] == 60_000
    retry = outcome("session_end", T0 + 61_000, 0, end_reason="normal")
    (letter,), none = sessions.apply([retry], origin(6), T0 + 61_000)
    assert none == [] and letter.destination == "dead"
    assert orjson.loads(letter.value)["reason"] == "duplicate"
    assert orjson.loads(letter.value)["event_type"] == "session_end"


def test_after_the_summary_a_late_event_is_kept_out_of_it_and_a_later_one_dead_lettered():
    """Within the allowed lateness (client time to arrival) an event that comes after its
    session closed stays in its own table, only the summary misses it; past it, the event
    is dead-lettered as too_late."""
    sessions = OpenSessions(RULES)
    start = outcome("session_start", T0, 0)
    end = outcome("session_end", T0 + 60_000, 1, end_reason="normal")
    sessions.apply([start, end], origin(5), T0 + 60_000)
    late = outcome("quality_sample", T0 + 62_000, 3)
    assert sessions.apply([late], origin(6), T0 + 62_000) == ([late], [])
    hours_late = T0 + 2 * 3_600_000
    too_late = outcome("quality_sample", hours_late, 4, client_time_ms=T0)
    (letter,), summaries = sessions.apply([too_late], origin(7), hours_late)
    assert summaries == []
    assert (orjson.loads(letter.value)["reason"], orjson.loads(letter.value)["index"]) == (
        "too_late",
        4,
    )


def test_a_summary_leaves_as_an_enriched_record_keyed_by_its_session():
    sessions = OpenSessions(RULES)
    start = outcome("session_start", T0, 0)
    end = outcome("session_end", T0 + 5_000, 1)
    _, (summary,) = sessions.apply([start, end], origin(1), T0)
    leaving = summary_outcome(summary)
    assert leaving.destination == "enriched"
    assert leaving.key == start.record["session_pseudonym"].encode()  # type: ignore[index]
    assert orjson.loads(leaving.value) == summary


def test_a_replayed_message_is_not_counted_twice_in_its_session():
    """The killed worker wrote the session after message 5; the replay of message 5 (its
    offset not committed) must not add its samples again, message 6 must."""
    sessions = OpenSessions(RULES)
    start = outcome("session_start", T0, 0)
    samples = [outcome("quality_sample", T0 + i * 1000, i + 1) for i in range(3)]
    sessions.apply([start, *samples], origin(5), T0)
    table = table_after(sessions, {})
    restarted = OpenSessions(RULES)
    restarted.rebuild(table.items(), {0}, T0 + 5000)
    judged, _ = restarted.apply([start, *samples], origin(5), T0 + 5000)
    assert judged == [start, *samples]
    assert restarted.take_writes() == []
    end = outcome("session_end", T0 + 9000, 0)
    _, (summary,) = restarted.apply([end], origin(6), T0 + 9000)
    assert summary["sample_count"] == 3


def test_a_restarted_worker_keeps_only_its_partitions_and_times_out_on_their_clock():
    sessions = OpenSessions(RULES)
    for partition in (0, 1):
        start = outcome("session_start", T0, 0, session_id=f"s-{partition}")
        sessions.apply([start], origin(1, partition), T0)
    table = table_after(sessions, {})
    restarted = OpenSessions(RULES)
    wall = T0 + 3_600_000  # restarted an hour later: the partition's clock starts at its data
    restarted.rebuild(table.items(), {1}, wall)
    assert len(restarted) == 1
    assert restarted.expire(wall + 119_000) == []
    (summary,) = restarted.expire(wall + 120_000)
    assert summary["end_reason"] == "timeout"
    assert summary["server_duration_ms"] == 0
    (write,) = restarted.take_writes()
    assert write.partition == 1 and write.value is not None


def test_events_without_a_session_pass_untouched():
    sessions = OpenSessions(RULES)
    login = outcome("login", T0, 0)
    anonymous_none = outcome("session_start", T0, 1, consent="none")
    judged, summaries = sessions.apply([login, anonymous_none], origin(1), T0)
    assert judged == [login, anonymous_none] and summaries == [] and len(sessions) == 0
