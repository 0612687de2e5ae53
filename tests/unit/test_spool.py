"""The SDK's spool, and the SDK over it: order, durability across reopening and a killed
process, the byte bound with counted drops, concurrent emitters; and the client's promise that
transport trouble never reaches the host application. No services: the transport here is a
list in this file standing in for the seam (tests/integration has the real Kafka)."""

import contextlib
import gc
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.errors import KafkaError

from deploy.services.ports import free_ports
from producers.sdk import TallyClient
from producers.spool import Record, Spool, SpoolFormatError, SpoolInUse
from producers.transports import KafkaTransport, Outcome
from producers.workload import generate_workload
from schemas.consent import Consent
from schemas.events import Envelope
from schemas.validation import InvalidEvent
from tests.strategies import examples

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 20.0


def rec(n: int, size: int = 10) -> Record:
    return Record(f"k{n}".encode(), str(n).encode().ljust(size, b"."))


def drain(spool: Spool) -> list[Record]:
    """Everything in the spool, oldest first, removed as if delivered."""
    out: list[Record] = []
    while batch := spool.peek(7, 10_000):
        out.extend(s.record for s in batch)
        spool.remove_delivered([s.seq for s in batch])
    return out


def test_records_come_back_in_the_order_they_went_in(tmp_path: Path) -> None:
    """Peek returns the oldest first, and removing a batch reveals the next ones."""
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    for n in range(50):
        spool.append(rec(n))
    assert spool.count == 50 and spool.bytes_used == sum(
        len(r.key) + 10 for r in map(rec, range(50))
    )
    assert [s.record for s in spool.peek(3, 10_000)] == [rec(0), rec(1), rec(2)]
    assert drain(spool) == [rec(n) for n in range(50)]
    assert (spool.count, spool.bytes_used, spool.oldest_seq()) == (0, 0, None)
    spool.close()


def test_peek_respects_the_byte_limit_but_always_returns_one(tmp_path: Path) -> None:
    """A batch stops before the byte limit, yet a record bigger than it still goes alone."""
    spool = Spool(None, 1_000_000)
    spool.append(Record(b"", b"x" * 500))
    spool.append(rec(1))
    assert [len(s.record.value) for s in spool.peek(10, 100)] == [500]
    spool.remove_delivered([spool.peek(1, 100)[0].seq])
    spool.append(rec(2))
    spool.append(rec(3))
    assert [s.record for s in spool.peek(10, 13)] == [rec(1)]


def test_a_new_spool_on_the_same_path_sees_what_was_left(tmp_path: Path) -> None:
    """After close, a new object on the file holds exactly the records not removed, in order,
    with their byte count, and appends after them."""
    path = tmp_path / "spool.db"
    first = Spool(path, 1_000_000)
    for n in range(20):
        first.append(rec(n))
    first.remove_delivered([s.seq for s in first.peek(5, 10_000)])
    first.close()
    second = Spool(path, 1_000_000)
    assert (second.count, second.bytes_used) == (
        15,
        sum(len(rec(n).key) + 10 for n in range(5, 20)),
    )
    second.append(rec(99))
    assert drain(second) == [rec(n) for n in range(5, 20)] + [rec(99)]
    second.close()


def test_one_spool_file_is_open_once(tmp_path: Path) -> None:
    """A second opener of an open spool file is refused; once closed, it opens."""
    path = tmp_path / "spool.db"
    first = Spool(path, 1_000_000)
    first.append(rec(1))
    with pytest.raises(SpoolInUse):
        Spool(path, 1_000_000)
    first.close()
    second = Spool(path, 1_000_000)
    assert second.count == 1
    second.close()


def test_the_spool_file_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    """It holds raw ids, so it is created mode 0600."""
    path = tmp_path / "spool.db"
    Spool(path, 1_000_000).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_file_that_is_not_a_spool_is_refused(tmp_path: Path) -> None:
    """A file of something else is never read as events, nor overwritten."""
    path = tmp_path / "spool.db"
    path.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(SpoolFormatError):
        Spool(path, 1_000_000)
    assert path.read_bytes().startswith(b"not a database")


def test_full_spool_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    """Appending past the bound drops the oldest records, never more bytes than the bound
    are held, and every drop is counted, across a reopening too."""
    path = tmp_path / "spool.db"
    spool = Spool(path, 1_000)
    for n in range(300):
        spool.append(rec(n, size=40))
        assert spool.bytes_used <= 1_000
    size = len(rec(299).key) + 40
    kept = 1_000 // size
    assert spool.count == kept and spool.dropped == 300 - kept
    spool.close()
    again = Spool(path, 1_000)
    assert drain(again) == [rec(n, size=40) for n in range(300 - kept, 300)]
    again.close()


def test_a_record_larger_than_the_bound_is_dropped_alone(tmp_path: Path) -> None:
    """It is counted and the records already held stay."""
    spool = Spool(tmp_path / "spool.db", 100)
    spool.append(rec(1))
    spool.append(Record(b"", b"x" * 101))
    assert (spool.count, spool.dropped) == (1, 1)
    spool.close()


def test_a_record_dropped_while_in_flight_and_then_confirmed_is_not_counted_dropped() -> None:
    """The sender confirmed it after all; seqs are never reused, so confirming the old seqs
    never removes a newer record that went in after the spool emptied."""
    spool = Spool(None, 100)
    spool.append(rec(1, size=40))
    spool.append(rec(2, size=40))
    in_flight = [s.seq for s in spool.peek(10, 10_000)]
    spool.append(rec(3, size=90))  # drops both in-flight records
    assert (spool.count, spool.dropped) == (1, 2)
    spool.remove_delivered(in_flight)
    assert (spool.count, spool.dropped) == (1, 0)
    assert drain(spool) == [rec(3, size=90)]


def test_concurrent_appends_and_sends_lose_and_reorder_nothing(tmp_path: Path) -> None:
    """Eight threads append while one removes batches: every record comes out exactly once,
    and each thread's records in the order it appended them."""
    spool = Spool(tmp_path / "spool.db", 10_000_000)
    threads, per_thread = 8, 400
    out: list[Record] = []
    done = threading.Event()

    def append(t: int) -> None:
        for n in range(per_thread):
            spool.append(Record(str(t).encode(), str(n).encode()))

    def send() -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not (done.is_set() and spool.count == 0) and time.monotonic() < deadline:
            batch = spool.peek(50, 10_000)
            out.extend(s.record for s in batch)
            spool.remove_delivered([s.seq for s in batch])

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    appenders = [threading.Thread(target=append, args=(t,)) for t in range(threads)]
    for thread in appenders:
        thread.start()
    for thread in appenders:
        thread.join()
    done.set()
    sender.join(DEADLINE_S)
    assert not sender.is_alive()
    assert len(out) == threads * per_thread and spool.dropped == 0
    for t in range(threads):
        mine = [int(r.value) for r in out if r.key == str(t).encode()]
        assert mine == list(range(per_thread))
    spool.close()


def test_records_survive_their_process_being_killed(tmp_path: Path) -> None:
    """A process SIGKILLed right after appending (no close) leaves every record it appended
    to the next opener."""
    path = tmp_path / "spool.db"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from producers.spool import Record, Spool\n"
        f"spool = Spool(Path({str(path)!r}), 1_000_000)\n"
        "for n in range(200):\n"
        "    spool.append(Record(b'k', str(n).encode()))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, timeout=DEADLINE_S)
    assert child.returncode == -9
    spool = Spool(path, 1_000_000)
    assert [int(r.value) for r in drain(spool)] == list(range(200))
    spool.close()


records_strategy = st.lists(
    st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=40
)


@settings(max_examples=examples(500))
@given(records_strategy, st.integers(min_value=0, max_value=40))
def test_any_bytes_round_trip_through_a_reopened_spool(
    records: list[tuple[bytes, bytes]], sent: int
) -> None:
    """Arbitrary keys and values (empty, NUL, invalid UTF-8) come back byte for byte, in
    order, after part is removed and the file is reopened."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spool.db"
        spool = Spool(path, 1_000_000)
        for key, value in records:
            spool.append(Record(key, value))
        spool.remove_delivered([s.seq for s in spool.peek(sent, 10_000_000)] if sent else [])
        spool.close()
        spool = Spool(path, 1_000_000)
        assert drain(spool) == [Record(k, v) for k, v in records[sent:]]
        spool.close()


# The client over the spool, through a transport that is a list in this file.


class ListTransport:
    """Keeps what it is sent; fails while ``down`` is set, refuses event ids in ``refuse``."""

    max_batch_records = 50
    max_batch_bytes = 1_000_000

    def __init__(self) -> None:
        self.received: list[Record] = []
        self.down = threading.Event()
        self.refuse: set[str] = set()
        self.attempts = 0

    def send(self, records: Sequence[Record]) -> list[Outcome]:
        self.attempts += 1
        if self.down.is_set():
            raise ConnectionError("the collector is unreachable")
        refused = [orjson.loads(r.value)["event_id"] in self.refuse for r in records]
        self.received.extend(r for r, no in zip(records, refused, strict=True) if not no)
        return [Outcome.REJECTED if no else Outcome.DELIVERED for no in refused]

    def close(self) -> None:
        pass

    def event_ids(self) -> list[str]:
        return [orjson.loads(r.value)["event_id"] for r in self.received]


def workload(count: int) -> list[Envelope]:
    return generate_workload(
        seed=11, clients=20, events=count, end_ms=int(time.time() * 1000), span_ms=3_600_000
    )


def client(transport: ListTransport, **options: object) -> TallyClient:
    return TallyClient(transport, retry_backoff_s=0.01, retry_backoff_max_s=0.05, **options)  # type: ignore[arg-type]


def test_emit_returns_at_once_while_sending_fails_and_flush_delivers_after() -> None:
    """With the transport down, emit neither raises nor waits and flush times out; once it
    is back, flush delivers every event, in order, exactly once."""
    transport = ListTransport()
    transport.down.set()
    sdk = client(transport)
    events = workload(300)
    started = time.monotonic()
    for event in events:
        sdk.emit(event)
    assert time.monotonic() - started < 5.0
    assert sdk.flush(timeout_s=0.3) is False and sdk.pending_events == 300
    transport.down.clear()
    assert sdk.flush(timeout_s=DEADLINE_S) is True
    assert transport.event_ids() == [e.event_id for e in events]
    assert (sdk.pending_events, sdk.dropped_events) == (0, 0)
    sdk.close()


def test_close_leaves_unsent_events_for_the_next_client_on_the_spool(tmp_path: Path) -> None:
    """A client closed while the transport is down keeps its events in the file; a new one
    on the same file sends them, then its own."""
    path = tmp_path / "sdk-spool.db"
    down = ListTransport()
    down.down.set()
    events = workload(120)
    sdk = client(down, spool_path=path)
    for event in events[:100]:
        sdk.emit(event)
    sdk.close()
    assert down.received == [] and sdk.pending_events == 100
    up = ListTransport()
    with client(up, spool_path=path) as again:
        for event in events[100:]:
            again.emit(event)
        assert again.flush(timeout_s=DEADLINE_S)
    assert up.event_ids() == [e.event_id for e in events]


def test_a_full_spool_drops_the_oldest_events_and_counts_them() -> None:
    """With the transport down and a small bound, the newest events are kept and the
    dropped ones counted; they are what is delivered once it is back."""
    transport = ListTransport()
    transport.down.set()
    sdk = client(transport, spool_max_bytes=16_384)
    events = workload(200)
    for event in events:
        sdk.emit(event)
    assert sdk.dropped_events > 0
    assert sdk.dropped_events + sdk.pending_events == 200
    transport.down.clear()
    assert sdk.flush(timeout_s=DEADLINE_S)
    assert transport.event_ids() == [e.event_id for e in events[sdk.dropped_events :]]
    sdk.close()


def test_refused_events_are_dropped_and_counted_without_blocking_the_rest() -> None:
    """An event the transport refuses for good leaves the spool, counted as rejected."""
    transport = ListTransport()
    sdk = client(transport)
    events = workload(10)
    transport.refuse = {events[0].event_id, events[5].event_id}
    for event in events:
        sdk.emit(event)
    assert sdk.flush(timeout_s=DEADLINE_S) and sdk.rejected_events == 2
    assert transport.event_ids() == [
        e.event_id for e in events if e.event_id not in transport.refuse
    ]
    sdk.close()


def test_schema_and_consent_violations_still_raise_into_the_host() -> None:
    """Only a refused event raises: an event made under consent wider than the user's
    current choice is refused as before, and nothing is spooled."""
    sdk = client(ListTransport(), consent=Consent.NONE)
    full = next(e for e in workload(50) if e.consent == "full")
    with pytest.raises(InvalidEvent):
        sdk.emit(full)
    assert sdk.pending_events == 0
    sdk.close()


def test_a_user_id_kept_on_the_client_is_not_sent_as_the_key_either() -> None:
    """With consent none the record's key is never the user id."""
    transport = ListTransport()
    sdk = client(transport)
    event = next(e for e in workload(200) if e.consent == "full" and not e.session_id)
    withheld = event.model_copy(update={"consent": "none"})
    sdk.emit(withheld)
    assert sdk.flush(timeout_s=DEADLINE_S)
    sdk.close()
    (record,) = transport.received
    assert event.user_id and event.user_id.encode() not in record.key + record.value


def test_emit_after_close_neither_raises_nor_sends(tmp_path: Path) -> None:
    """A thread still emitting while the host shuts down is counted, not raised into."""
    transport = ListTransport()
    sdk = client(transport, spool_path=tmp_path / "spool.db")
    sdk.close()
    sdk.emit(workload(1)[0])
    assert (sdk.dropped_events, transport.received) == (1, [])


def test_a_spool_bound_too_small_for_events_is_refused_when_the_client_is_made() -> None:
    """The bound must hold a few of the largest events the schema allows."""
    with pytest.raises(ValueError):
        client(ListTransport(), spool_max_bytes=1_000)


def test_failed_kafka_attempts_leave_no_event_loop_open_for_the_garbage_collector() -> None:
    """With no broker, each send attempt fails (KafkaError) and closes the network client
    that kafka-python's failed constructor leaves behind: the epoll selectors open do not
    grow with the attempts, even with the cyclic garbage collector off."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc (Linux) to see descriptors")

    def selectors_open() -> int:
        links = []
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                links.append(os.readlink(fd))
        return sum("eventpoll" in link for link in links)

    (port,) = free_ports(1)
    transport = KafkaTransport(f"127.0.0.1:{port}", "t", compression_type=None, timeout_s=0.3)
    gc.disable()
    try:
        before = selectors_open()
        for _ in range(4):
            with pytest.raises(KafkaError):
                transport.send([rec(0)])
        assert selectors_open() <= before
    finally:
        gc.enable()
        transport.close()
