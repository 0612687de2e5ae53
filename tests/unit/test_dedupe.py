"""The recent event ids: refused retries, a window, a memory bound, and a rebuild from the
table entries a restarted worker recovers."""

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedupe import RecentEventIds, TableWrite, entry_key
from tests.strategies import examples


def test_one_table_entry_per_raw_message_with_its_new_ids():
    recent = RecentEventIds()
    assert [recent.seen_before(i) for i in ("a", "b", "a")] == [False, False, True]
    (write,) = recent.remember(3, 17, 1000)
    assert (write.partition, write.key) == (3, entry_key(3, 17)) == (3, b"3:17")
    assert orjson.loads(write.value or b"") == {"p": 3, "t": 1000, "ids": ["a", "b"]}
    assert recent.seen_before("a") and recent.remember(3, 18, 1001) == []


def test_ids_older_than_the_window_are_forgotten_and_deleted_from_the_table():
    recent = RecentEventIds(window_ms=1000)
    recent.seen_before("old")
    recent.remember(0, 1, 5000)
    recent.seen_before("new")
    recent.remember(1, 1, 5600)
    assert recent.expire(6000) == []
    assert recent.expire(6001) == [TableWrite(0, b"0:1", None)]
    assert not recent.seen_before("old")
    assert recent.seen_before("new")


def test_the_bound_forgets_the_oldest_messages_first():
    recent = RecentEventIds(max_ids=3)
    for offset, ids in enumerate((["a", "b"], ["c"], ["d"])):
        for event_id in ids:
            recent.seen_before(event_id)
        writes = recent.remember(0, offset, offset)
    assert writes[1:] == [TableWrite(0, b"0:0", None)]
    assert len(recent) == 2
    assert not recent.seen_before("a") and recent.seen_before("c")


def test_a_rebuild_keeps_only_the_owned_partitions_entries():
    """After a restart the table holds what the changelog had; ids of partitions another
    worker owns now are not this worker's to refuse."""
    source = RecentEventIds()
    table: dict[bytes, bytes] = {}
    for partition, event_id in ((0, "x"), (1, "y")):
        source.seen_before(event_id)
        for write in source.remember(partition, 5, 100 + partition):
            table[write.key] = write.value or b""
    restarted = RecentEventIds()
    restarted.rebuild(table.items(), {0})
    assert restarted.seen_before("x")
    assert not restarted.seen_before("y")
    assert restarted.expire(10**12) == [TableWrite(0, b"0:5", None)]


@settings(max_examples=examples(200))
@given(
    messages=st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=6), min_size=1, max_size=20),
    max_ids=st.integers(1, 12),
)
def test_a_restarted_worker_refuses_exactly_what_the_running_one_would(messages, max_ids):
    """Replaying the table's writes into a new index gives the same answers as the index that
    wrote them, whatever the sequence and the bound."""
    running = RecentEventIds(max_ids=max_ids)
    table: dict[bytes, bytes] = {}
    for offset, ids in enumerate(messages):
        running.begin_message(0, offset)
        for event_id in ids:
            running.seen_before(event_id)
        for write in running.remember(0, offset, offset):
            if write.value is None:
                table.pop(write.key, None)
            else:
                table[write.key] = write.value
    restarted = RecentEventIds(max_ids=max_ids)
    restarted.rebuild(table.items(), {0})
    running.begin_message(0, len(messages))
    restarted.begin_message(0, len(messages))
    for event_id in "abcdefghijk":
        assert restarted.seen_before(event_id) == running.seen_before(event_id)


def test_a_replayed_message_gives_its_events_again_but_a_retry_is_a_duplicate():
    """After a crash between the table write and the offset commit, the same raw message
    comes again: its events are judged as the first time (a duplicate inside it stays one);
    the same ids in any other message are duplicates."""
    recent = RecentEventIds()
    recent.begin_message(0, 7)
    assert [recent.seen_before(i) for i in ("a", "b", "a")] == [False, False, True]
    table = {w.key: w.value or b"" for w in recent.remember(0, 7, 1)}
    restarted = RecentEventIds()
    restarted.rebuild(table.items(), {0})
    restarted.begin_message(0, 7)
    assert [restarted.seen_before(i) for i in ("a", "b", "a")] == [False, False, True]
    assert restarted.remember(0, 7, 2) == []
    restarted.begin_message(0, 9)
    assert restarted.seen_before("a") and restarted.seen_before("b")
