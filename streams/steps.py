"""One raw Kafka message to one outgoing message: enriched, or a dead letter with a reason.

Pure and total: whatever the bytes, it returns an outcome and never raises, so one bad event
can neither vanish nor stop a worker.
"""

from dataclasses import dataclass
from typing import Literal

import orjson

from schemas.dead_letter import dead_letter
from schemas.reasons import ReasonCode
from schemas.validation import InvalidEvent, decode_event
from streams.dedupe import RecentEventIds
from streams.enrich import Lookups, enrich


@dataclass(frozen=True)
class Outcome:
    """Where a raw message goes next, and its key and value there."""

    destination: Literal["enriched", "dead"]
    key: bytes | None
    value: bytes
    reason: ReasonCode | None = None


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


def validate_and_enrich(
    raw: bytes | None,
    origin: Origin,
    lookups: Lookups,
    recent: RecentEventIds | None = None,
) -> Outcome:
    """Validate a raw event and enrich it; any refusal becomes a redacted dead letter."""
    event = None
    try:
        event = decode_event(raw or b"", received_ms=origin.timestamp_ms)
        if recent is not None and recent.seen_before(event.event_id):
            raise InvalidEvent(ReasonCode.DUPLICATE, "event_id", event.event_type)
        received_ms = event.collector_time_ms or origin.timestamp_ms
        record = enrich(event, received_ms, lookups)
    except InvalidEvent as err:
        reason, field, event_type = err.reason, err.field, err.event_type
    except Exception:  # a bug must cost one event, not the worker; the reason says so
        reason, field = ReasonCode.PROCESSING_ERROR, None
        event_type = event.event_type if event is not None else None
    else:
        key = (record["user_pseudonym"] or record["event_id"]).encode()
        return Outcome("enriched", key, orjson.dumps(record))
    letter = dead_letter(
        reason,
        field=field,
        source_topic=origin.topic,
        partition=origin.partition,
        offset=origin.offset,
        received_ms=origin.timestamp_ms,
        event_type=event_type,
    )
    return Outcome("dead", None, letter, reason)
