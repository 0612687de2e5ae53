"""The chat sessions of the raw partitions a worker owns, held in memory and made durable in a
Faust table: ``streams.sessions`` decides, this keeps the states and their changelog.

One table entry per session, written once per batch that touched it (after the batch's output
is on the broker), with the raw partition and the offset of the last message applied to it.
A message replayed after a crash (its output sent, the offset not yet committed) is not
applied twice to a session whose entry already counts it; its events are sent again as they
were, which the event tables' keys absorb. A replayed event the session had refused the first
time is the one case this cannot repeat exactly: it leaves as enriched, not dead-lettered.

An event that comes after its session closed (a summary is out) but within the allowed
lateness is kept in its event table and left out of the summary; a later one (more than the
allowed lateness between its client time and its arrival) and a second start or end of a
session are dead-lettered, as ``too_late`` and ``duplicate``.

Sessions time out on the arrival clock of their partition (the latest arrival read, advanced
by the wall clock while the partition is idle), so a backlog read after an outage is
sessionized as it was live.
"""

from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from schemas.reasons import ReasonCode
from streams.dedupe import TableWrite
from streams.sessions import (
    SessionRules,
    SessionState,
    apply_session_event,
    expire_session,
    is_sessionized,
)
from streams.steps import Origin, Outcome, refused_after_enrichment


class _Held(NamedTuple):
    partition: int
    applied_offset: int
    state: SessionState


class _Clock(NamedTuple):
    arrival_ms: int
    read_at_wall_ms: int


def summary_outcome(summary: dict[str, Any]) -> Outcome:
    """A session summary as an enriched outcome, keyed by its session."""
    return Outcome(
        "enriched",
        summary["session_pseudonym"].encode(),
        orjson.dumps(summary),
        None,
        summary,
    )


class OpenSessions:
    """Session states by pseudonym, and the table writes still to send."""

    def __init__(self, rules: SessionRules) -> None:
        self.rules = rules
        self._held: dict[str, _Held] = {}
        self._changed: dict[str, int] = {}
        """Pseudonyms whose entry changed since ``take_writes``, with their partition."""
        self._clocks: dict[int, _Clock] = {}

    def __len__(self) -> int:
        return len(self._held)

    def rebuild(
        self, table_items: Iterable[tuple[bytes, bytes]], partitions: set[int], wall_ms: int
    ) -> None:
        """Start again from the table's entries of the partitions this worker owns now."""
        self._held = {}
        self._changed = {}
        for key, value in table_items:
            decoded = orjson.loads(value)
            if decoded["p"] in partitions:
                state = SessionState.from_json(decoded["s"])
                self._held[key.decode()] = _Held(decoded["p"], decoded["o"], state)
        self._clocks = {}
        for partition in partitions:
            latest = max(
                (h.state.last_seen_ms for h in self._held.values() if h.partition == partition),
                default=wall_ms,
            )
            self._clocks[partition] = _Clock(latest, wall_ms)

    def apply(
        self, outcomes: list[Outcome], origin: Origin, wall_ms: int
    ) -> tuple[list[Outcome], list[dict[str, Any]]]:
        """One raw message's outcomes with the events their session refused turned into
        dead letters, and the summaries of the sessions this message closed."""
        partition, offset = origin.partition, origin.offset
        judged: list[Outcome] = []
        summaries: list[dict[str, Any]] = []
        touched: set[str] = set()
        latest_arrival = self._clocks.get(partition, _Clock(0, wall_ms)).arrival_ms
        for outcome in outcomes:
            record = outcome.record
            if outcome.destination != "enriched" or record is None or not is_sessionized(record):
                judged.append(outcome)
                continue
            pseudonym = record["session_pseudonym"]
            held = self._held.get(pseudonym)
            if held is not None and held.partition == partition and held.applied_offset >= offset:
                judged.append(outcome)  # replayed: already counted in its session
                continue
            latest_arrival = max(latest_arrival, outcome.received_ms)
            step = apply_session_event(
                held.state if held else None, record, outcome.received_ms, self.rules
            )
            self._keep(pseudonym, partition, held.applied_offset if held else -1, step.state)
            touched.add(pseudonym)
            if step.summary is not None:
                summaries.append(step.summary)
            if step.refusal is None or self._late_but_allowed(step.refusal, record, outcome):
                judged.append(outcome)
            else:
                judged.append(refused_after_enrichment(outcome, origin, step.refusal))
        for pseudonym in touched:
            held = self._held.get(pseudonym)
            if held is not None:
                self._held[pseudonym] = held._replace(applied_offset=offset)
        self._clocks[partition] = _Clock(latest_arrival, wall_ms)
        return judged, summaries

    def _late_but_allowed(
        self, refusal: ReasonCode, record: dict[str, Any], outcome: Outcome
    ) -> bool:
        """An event its session's summary came too late for, but itself within the allowed
        lateness (client time to arrival), is kept in its own table: only the summary misses
        it. Events later than that, and second starts or ends, are dead-lettered."""
        lateness_ms = outcome.received_ms - record["event_time"] * 1000
        return refusal is ReasonCode.TOO_LATE and lateness_ms <= self.rules.allowed_lateness_ms

    def expire(self, wall_ms: int) -> list[dict[str, Any]]:
        """Close the sessions silent past the timeout and drop old tombstones, each on its
        partition's arrival clock; the summaries to emit."""
        summaries = []
        for pseudonym, held in list(self._held.items()):
            clock = self._clocks.get(held.partition, _Clock(wall_ms, wall_ms))
            now_ms = clock.arrival_ms + max(0, wall_ms - clock.read_at_wall_ms)
            if now_ms < held.state.deadline_ms(self.rules):
                continue
            step = expire_session(held.state, now_ms, self.rules)
            self._keep(pseudonym, held.partition, held.applied_offset, step.state)
            if step.summary is not None:
                summaries.append(step.summary)
        return summaries

    def _keep(
        self, pseudonym: str, partition: int, applied_offset: int, state: SessionState | None
    ) -> None:
        held = self._held.get(pseudonym)
        if held is not None and held.state is state:
            return
        if state is None:
            self._held.pop(pseudonym, None)
        else:
            self._held[pseudonym] = _Held(partition, applied_offset, state)
        self._changed[pseudonym] = partition

    def take_writes(self) -> list[TableWrite]:
        """The table writes for every session changed since the last call."""
        writes = []
        for pseudonym, partition in self._changed.items():
            held = self._held.get(pseudonym)
            value = (
                None
                if held is None
                else orjson.dumps(
                    {"p": held.partition, "o": held.applied_offset, "s": held.state.to_json()}
                )
            )
            writes.append(TableWrite(partition, pseudonym.encode(), value))
        self._changed = {}
        return writes
