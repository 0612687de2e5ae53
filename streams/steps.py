"""One raw Kafka message to its outgoing messages: each event enriched, or a dead letter with a
reason.

A message holds one event or a batch (``schemas.batch``). A batch refused as a whole gives one
dead letter; otherwise each of its events gives one outcome, in the batch's order, and the dead
letter of a refused event carries its index in the batch.

Pure and total: whatever the bytes, it returns outcomes and never raises, so one bad event
can neither vanish nor stop a worker.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import orjson

from schemas.batch import decode_message, join_enriched_records
from schemas.consent import Consent
from schemas.dead_letter import dead_letter
from schemas.events import Envelope
from schemas.reasons import ReasonCode
from schemas.validation import InvalidEvent, decode_event
from streams.dedupe import RecentEventIds
from streams.enrich import Lookups, Place, enrich

MAX_ENRICHED_MESSAGE_BYTES: Final = 256 * 1024
"""Most bytes of records joined into one enriched message, well under Kafka's default
message.max.bytes (1 MiB) however many summaries a quiet spell closes at once."""


@dataclass(frozen=True)
class Outcome:
    """Where a raw message goes next, and its key and value there."""

    destination: Literal["enriched", "dead"]
    key: bytes | None
    value: bytes
    reason: ReasonCode | None = None
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The enriched record that ``value`` encodes, for the stateful steps after this one."""
    received_ms: int = field(default=0, compare=False)
    """When the event reached Tally (collector, else Kafka): the sessions' clock."""
    index: int | None = field(default=None, compare=False)
    """The event's index in its batch; None for a single event."""


@dataclass(frozen=True)
class Outgoing:
    """One message to send: several enriched records joined, or one dead letter."""

    destination: Literal["enriched", "dead"]
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


def _dead(
    origin: Origin,
    reason: ReasonCode,
    field: str | None = None,
    event_type: object = None,
    index: int | None = None,
) -> Outcome:
    letter = dead_letter(
        reason,
        field=field,
        source_topic=origin.topic,
        partition=origin.partition,
        offset=origin.offset,
        received_ms=origin.timestamp_ms,
        event_type=event_type,
        index=index,
    )
    return Outcome("dead", None, letter, reason)


def _judge(
    item: Envelope | InvalidEvent,
    origin: Origin,
    lookups: Lookups,
    recent: RecentEventIds | None,
    index: int | None,
) -> Outcome:
    """The outcome of one decoded event, or the dead letter of its refusal."""
    if isinstance(item, InvalidEvent):
        return _dead(origin, item.reason, item.field, item.event_type, index)
    try:
        if recent is not None and recent.seen_before(item.event_id):
            return _dead(origin, ReasonCode.DUPLICATE, "event_id", item.event_type, index)
        received_ms = item.collector_time_ms or origin.timestamp_ms
        record = enrich(item, received_ms, lookups)
        key = (record["user_pseudonym"] or record["event_id"]).encode()
        value = orjson.dumps(record)
    except Exception:  # a bug must cost one event, not the worker; the reason says so
        return _dead(origin, ReasonCode.PROCESSING_ERROR, None, item.event_type, index)
    return Outcome("enriched", key, value, None, record, received_ms, index)


def validate_and_enrich(
    raw: bytes | None,
    origin: Origin,
    lookups: Lookups,
    recent: RecentEventIds | None = None,
) -> Outcome:
    """Validate one raw event and enrich it; any refusal becomes a redacted dead letter."""
    try:
        item: Envelope | InvalidEvent = decode_event(raw or b"", received_ms=origin.timestamp_ms)
    except InvalidEvent as err:
        item = err.with_traceback(None)
    except Exception:  # decode_event raises nothing else; should a bug make it, one event
        return _dead(origin, ReasonCode.PROCESSING_ERROR)
    return _judge(item, origin, lookups, recent, None)


def _once_per_message(lookups: Lookups) -> Lookups:
    """The lookups with the geo lookup made once per distinct IP and each pseudonym once per
    distinct id: a batch's events share the address stamped on its envelope, and one
    client's user and session ids."""
    places: dict[str, Place] = {}
    pseudonyms: dict[tuple[str | None, Consent, str], str] = {}

    def locate(ip: str) -> Place:
        place = places.get(ip)
        if place is None:
            place = places[ip] = lookups.locate(ip)
        return place

    def pseudonymize_id(raw_id: str | None, consent: Consent, day: str) -> str:
        asked = (raw_id, consent, day)
        pseudonym = pseudonyms.get(asked)
        if pseudonym is None:
            pseudonym = pseudonyms[asked] = lookups.pseudonymize_id(raw_id, consent, day)
        return pseudonym

    return replace(lookups, locate=locate, pseudonymize_id=pseudonymize_id)


def outcomes_of_message(
    raw: bytes | None,
    origin: Origin,
    lookups: Lookups,
    recent: RecentEventIds | None = None,
) -> list[Outcome]:
    """Every outgoing message of one raw message: one per event of a batch, in order (a dead
    letter with the event's index for each refused one), one for a single event, and one
    dead letter for a message refused as a whole."""
    try:
        decoded = decode_message(raw or b"", received_ms=origin.timestamp_ms)
    except InvalidEvent as err:
        return [_dead(origin, err.reason, err.field, err.event_type)]
    except Exception:  # decode_message raises nothing else; should a bug make it, one letter
        return [_dead(origin, ReasonCode.PROCESSING_ERROR)]
    if not decoded.batched:
        return [_judge(decoded.events[0], origin, lookups, recent, None)]
    lookups = _once_per_message(lookups)
    return [
        _judge(item, origin, lookups, recent, index) for index, item in enumerate(decoded.events)
    ]


def outgoing_messages(
    outcomes: list[Outcome], max_bytes: int = MAX_ENRICHED_MESSAGE_BYTES
) -> list[Outgoing]:
    """The messages to send for one raw message's outcomes (or a timer's summaries): the
    enriched records joined, as few messages as keep each under ``max_bytes`` (each keyed by
    its first record's key), then each dead letter alone."""
    messages = []
    chunk: list[Outcome] = []
    size = 0
    for outcome in outcomes:
        if outcome.destination != "enriched":
            continue
        if chunk and size + len(outcome.value) + 1 > max_bytes:
            messages.append(_joined(chunk))
            chunk, size = [], 0
        chunk.append(outcome)
        size += len(outcome.value) + 1
    if chunk:
        messages.append(_joined(chunk))
    messages.extend(Outgoing("dead", o.key, o.value) for o in outcomes if o.destination == "dead")
    return messages


def _joined(chunk: list[Outcome]) -> Outgoing:
    return Outgoing("enriched", chunk[0].key, join_enriched_records([o.value for o in chunk]))


def refused_after_enrichment(outcome: Outcome, origin: Origin, reason: ReasonCode) -> Outcome:
    """The dead letter of an event a later step (its session) refused after enriching it."""
    event_type = outcome.record["event_type"] if outcome.record else None
    return _dead(origin, reason, None, event_type, outcome.index)
