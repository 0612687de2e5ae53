"""Sessionization: a chat session's start, end and quality samples paired into one summary.

Pure and clock-injected; the caller keeps one ``SessionState`` per session pseudonym in a
changelogged table (``to_json``/``from_json``), feeds it every enriched session event of that
session in arrival order, and calls ``expire_session`` now and then (at ``deadline_ms``).

The session clock is arrival time (collector, else Kafka, in ms), never the client's: the
silence timeout, the server-side duration and the life of a closed session's tombstone are
all measured on it. ``apply_session_event`` first expires the state as of the event's
arrival, so the outcome depends on the events alone, not on when timers happened to fire.
The ``now_ms`` given to ``expire_session`` should be on the same clock: the highest arrival
time read so far (advanced by the wall clock while the partition is idle), so that a
backlog read after an outage is sessionized as it was live.

Decisions on the edge cases:

- A session opens with its first event, whichever type it is. It closes when both its start
  and its end have come (at once: a sample arriving after the end is ``too_late``), or when
  nothing of it arrived for ``silence_timeout_s``.
- Start without end: closed by the timeout, ``end_reason`` ``timeout``, server duration from
  the start's arrival to the last event's.
- End without start: the session stays open waiting for the start until the silence
  timeout, so a late start still pairs. If it never comes, the summary keeps the client's
  end reason and duration, with the start's fields and the server duration null. A start
  that arrives after the end pairs, but its server duration is null (arrivals reversed).
- Samples in any order: percentiles do not depend on it (``streams.quality``).
- A second start or end of a session that already has one, open or closed, is refused as
  ``duplicate`` (a retried send has another event id, so the id check upstream misses it).
- Anything else for a closed session is refused as ``too_late``: its summary is out. The
  closed session is kept as a small tombstone for ``allowed_lateness_s`` after it closed
  so that such events do not open a new session; after that, an event that would open a
  session more than ``allowed_lateness_s`` after it happened (client time to arrival) is
  ``too_late`` too. A session silent past the timeout whose client clock then reports newer
  events only after the tombstone is gone is summarized again, under the same event id but
  a later event time (so ClickHouse keeps both rows).

A refusal concerns the summary only: the event itself was already written to its own table.
Records with an empty session pseudonym (consent ``none`` keeps none) cannot be told apart
by session; the caller skips them (``is_sessionized``), and they still count in the event
tables. With ``anonymous`` consent the pseudonym changes at UTC midnight (client time), so a
session across midnight is summarized as two.
"""

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from schemas.enriched import enriched_fields
from schemas.reasons import ReasonCode
from streams.quality import QualityRollup, QualityThresholds, evolve

SESSION_EVENT_TYPES: Final = frozenset({"session_start", "session_end", "quality_sample"})
SUMMARY_ID_NAMESPACE: Final = uuid.UUID("5b0f4a57-3c1e-4d8e-9a6f-2f7c1e0d9b43")
"""Namespace of the summaries' UUIDv5 event ids; changing it would duplicate every summary."""
STATE_FORMAT: Final = 1
"""Version of ``SessionState.to_json``'s layout, checked on reading the changelog back."""

ATTRIBUTE_COLUMNS: Final = (
    "app_id", "channel", "software_version", "consent", "key_id", "user_pseudonym",
    "browser_family", "os_family", "device_class", "country_code",
)  # fmt: skip
"""Columns a summary takes from its session's events: the start's, else the first event's."""
_UINT32_MAX: Final = 2**32 - 1


@dataclass(frozen=True)
class SessionRules:
    """The settings sessionization runs by (``TALLY_SESSION_SILENCE_TIMEOUT_S``,
    ``TALLY_ALLOWED_LATENESS_S`` and the ``TALLY_QUALITY_*`` thresholds)."""

    silence_timeout_s: float
    allowed_lateness_s: float
    thresholds: QualityThresholds

    @property
    def silence_timeout_ms(self) -> int:
        return round(self.silence_timeout_s * 1000)

    @property
    def allowed_lateness_ms(self) -> int:
        return round(self.allowed_lateness_s * 1000)


@dataclass(frozen=True)
class SessionState:
    """One session so far, or, once ``closed_ms`` is set, the tombstone of a summarized one
    (which keeps only what judging a late event needs)."""

    session_pseudonym: str
    first_event_time: int
    """Earliest client time (s) of its events: the summary's time when no start came."""
    last_seen_ms: int
    """Latest arrival of its events."""
    attributes: Mapping[str, Any]
    start_received_ms: int | None = None
    start_event_time: int | None = None
    session_kind: str | None = None
    participants_bucket: str | None = None
    end_received_ms: int | None = None
    end_reason: str | None = None
    client_duration_ms: int | None = None
    quality: QualityRollup = field(default_factory=QualityRollup)
    closed_ms: int | None = None

    @property
    def is_closed(self) -> bool:
        return self.closed_ms is not None

    def deadline_ms(self, rules: SessionRules) -> int:
        """When ``expire_session`` will next change this state (on the arrival clock)."""
        if self.closed_ms is not None:
            return self.closed_ms + rules.allowed_lateness_ms
        return self.last_seen_ms + rules.silence_timeout_ms

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict: a few hundred bytes, plus up to 3 x 720 kept quality
        values (about 15 KB at most) while open."""
        return {
            "format": STATE_FORMAT,
            "session_pseudonym": self.session_pseudonym,
            "first_event_time": self.first_event_time,
            "last_seen_ms": self.last_seen_ms,
            "attributes": dict(self.attributes),
            "start_received_ms": self.start_received_ms,
            "start_event_time": self.start_event_time,
            "session_kind": self.session_kind,
            "participants_bucket": self.participants_bucket,
            "end_received_ms": self.end_received_ms,
            "end_reason": self.end_reason,
            "client_duration_ms": self.client_duration_ms,
            "quality": self.quality.to_json(),
            "closed_ms": self.closed_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SessionState":
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"session state format {data.get('format')!r} is not {STATE_FORMAT}")
        return cls(
            session_pseudonym=data["session_pseudonym"],
            first_event_time=data["first_event_time"],
            last_seen_ms=data["last_seen_ms"],
            attributes=dict(data["attributes"]),
            start_received_ms=data["start_received_ms"],
            start_event_time=data["start_event_time"],
            session_kind=data["session_kind"],
            participants_bucket=data["participants_bucket"],
            end_received_ms=data["end_received_ms"],
            end_reason=data["end_reason"],
            client_duration_ms=data["client_duration_ms"],
            quality=QualityRollup.from_json(data["quality"]),
            closed_ms=data["closed_ms"],
        )


@dataclass(frozen=True)
class SessionStep:
    """What one event or one expiry did to a session.

    ``state`` is what to store under the session's key (None: delete the key); it is the
    very object passed in when nothing changed, so the caller may skip the write.
    ``summary`` is a ``session_summary`` record to emit; ``refusal`` the reason the event
    was not counted in its session (dead-letter it).
    """

    state: SessionState | None
    summary: dict[str, Any] | None = None
    refusal: ReasonCode | None = None


def is_sessionized(record: Mapping[str, Any]) -> bool:
    """Whether an enriched record belongs to a session table: a session event that carries a
    session pseudonym."""
    return record["event_type"] in SESSION_EVENT_TYPES and bool(record["session_pseudonym"])


def summary_event_id(session_pseudonym: str) -> str:
    """The one event id of a session's summary, however often it is emitted."""
    return str(uuid.uuid5(SUMMARY_ID_NAMESPACE, session_pseudonym))


def apply_session_event(
    state: SessionState | None,
    record: Mapping[str, Any],
    received_ms: int,
    rules: SessionRules,
) -> SessionStep:
    """Add one enriched session event, arrived at ``received_ms``, to its session's state.

    Expires ``state`` as of that arrival first (which may give the summary of a session that
    timed out before this event; the event then finds its tombstone). Raises ValueError for
    a record ``is_sessionized`` refuses or one of another session.
    """
    if not is_sessionized(record):
        raise ValueError("not a session event with a session pseudonym")
    summary = None
    if state is not None:
        if state.session_pseudonym != record["session_pseudonym"]:
            raise ValueError("the event belongs to another session")
        if received_ms >= state.deadline_ms(rules):
            expired = expire_session(state, received_ms, rules)
            state, summary = expired.state, expired.summary
    event_type = record["event_type"]
    if state is not None and state.is_closed:
        return SessionStep(state, summary, _refusal_when_closed(state, event_type))
    if state is None:
        if received_ms - record["event_time"] * 1000 > rules.allowed_lateness_ms:
            return SessionStep(None, summary, ReasonCode.TOO_LATE)
        state = _opened(record, received_ms)
    if (event_type == "session_start" and state.start_received_ms is not None) or (
        event_type == "session_end" and state.end_received_ms is not None
    ):
        return SessionStep(state, summary, ReasonCode.DUPLICATE)
    state = _with_event(
        state,
        record,
        received_ms,
        last_seen_ms=max(state.last_seen_ms, received_ms),
        first_event_time=min(state.first_event_time, record["event_time"]),
    )
    if state.start_received_ms is not None and state.end_reason is not None:
        closed_ms = state.last_seen_ms
        return SessionStep(
            _tombstone(state, closed_ms),
            _summary(state, state.end_reason, closed_ms, rules.thresholds),
        )
    return SessionStep(state, summary)


def expire_session(state: SessionState, now_ms: int, rules: SessionRules) -> SessionStep:
    """Close a session silent for ``silence_timeout_s`` as of ``now_ms`` (its summary ends as
    ``timeout``, or as its end said when only the start was missing), and drop a tombstone
    ``allowed_lateness_s`` old (state None). The close time is the moment the silence reached
    the timeout, not ``now_ms``, so the summary does not depend on when this runs."""
    summary = None
    if state.closed_ms is None and now_ms >= state.deadline_ms(rules):
        closed_ms = state.deadline_ms(rules)
        summary = _summary(state, state.end_reason or "timeout", closed_ms, rules.thresholds)
        state = _tombstone(state, closed_ms)
    if state.closed_ms is not None and now_ms >= state.deadline_ms(rules):
        return SessionStep(None, summary)
    return SessionStep(state, summary)


def _refusal_when_closed(tombstone: SessionState, event_type: str) -> ReasonCode:
    if (event_type == "session_start" and tombstone.start_received_ms is not None) or (
        event_type == "session_end" and tombstone.end_received_ms is not None
    ):
        return ReasonCode.DUPLICATE
    return ReasonCode.TOO_LATE


def _opened(record: Mapping[str, Any], received_ms: int) -> SessionState:
    return SessionState(
        session_pseudonym=record["session_pseudonym"],
        first_event_time=record["event_time"],
        last_seen_ms=received_ms,
        attributes={name: record[name] for name in ATTRIBUTE_COLUMNS},
    )


def _with_event(
    state: SessionState, record: Mapping[str, Any], received_ms: int, **changes: Any
) -> SessionState:
    """The state with one more event; ``changes`` are made in the same copy."""
    event_type = record["event_type"]
    if event_type == "session_start":
        return evolve(
            state,
            **changes,
            attributes={name: record[name] for name in ATTRIBUTE_COLUMNS},
            start_received_ms=received_ms,
            start_event_time=record["event_time"],
            session_kind=record["session_kind"],
            participants_bucket=record["participants_bucket"],
        )
    if event_type == "session_end":
        return evolve(
            state,
            **changes,
            end_received_ms=received_ms,
            end_reason=record["end_reason"],
            client_duration_ms=record["duration_ms"],
        )
    quality = state.quality.with_sample(
        rtt_ms=record["rtt_ms"],
        jitter_ms=record["jitter_ms"],
        loss_pct=record["packet_loss_pct"],
        bitrate_kbps=record["bitrate_kbps"],
        resolution_class=record.get("resolution_class"),
        client_mos=record.get("mos"),
    )
    return evolve(state, quality=quality, **changes)


def _tombstone(state: SessionState, closed_ms: int) -> SessionState:
    return SessionState(
        session_pseudonym=state.session_pseudonym,
        first_event_time=state.first_event_time,
        last_seen_ms=state.last_seen_ms,
        attributes={},
        start_received_ms=state.start_received_ms,
        end_received_ms=state.end_received_ms,
        closed_ms=closed_ms,
    )


def _server_duration_ms(state: SessionState) -> int | None:
    if state.start_received_ms is None:
        return None
    until_ms = state.end_received_ms if state.end_received_ms is not None else state.last_seen_ms
    elapsed = until_ms - state.start_received_ms
    return min(elapsed, _UINT32_MAX) if elapsed >= 0 else None


def _summary(
    state: SessionState, end_reason: str, closed_ms: int, thresholds: QualityThresholds
) -> dict[str, Any]:
    """The ``session_summary`` record of a closing session, columns in table order."""
    record = {
        "event_id": summary_event_id(state.session_pseudonym),
        "event_type": "session_summary",
        "schema_version": 1,
        "event_time": (
            state.start_event_time if state.start_event_time is not None
            else state.first_event_time
        ),
        "received_time": closed_ms // 1000,
        **state.attributes,
        "session_pseudonym": state.session_pseudonym,
        "session_kind": state.session_kind,
        "participants_bucket": state.participants_bucket,
        "end_reason": end_reason,
        "server_duration_ms": _server_duration_ms(state),
        "client_duration_ms": state.client_duration_ms,
        **state.quality.columns(thresholds),
    }  # fmt: skip
    return {name: record[name] for name in enriched_fields("session_summary")}
