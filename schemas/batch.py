"""The batch envelope: the accepted events of one request, travelling as one Kafka message.

Per-message costs downstream (a Kafka record, a consumer wake-up, a send) are then paid once
per request rather than once per event. A raw-topic message is either one event, as declared
in ``schemas.events`` (what the SDK sends), or one batch, declared here and versioned like
events; ``decode_message`` reads both. What tells them apart is the ``batch_type`` key, which
no event has.

A batch whose envelope is broken is refused as a whole with one reason code; a sound envelope
yields each of its events, validated as it would be alone, or an ``InvalidEvent`` in its place.
As in ``schemas.validation``, no refusal ever holds a rejected value.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from schemas.events import MAX_EVENT_BYTES, AppId, Envelope, EpochMs, EventId, IpText
from schemas.reasons import ReasonCode
from schemas.validation import (
    InvalidEvent,
    looks_like_text,
    nested_forbidden_content,
    parse_json,
    validate_event_object,
)

BATCH_TYPE: Final = "tally.batch"
"""The value of ``batch_type``; its presence is what makes a message a batch."""
MAX_BATCH_EVENTS: Final = 500
"""Most events one batch may hold; a request with more is split by the collector."""
MAX_BATCH_BYTES: Final = 512 * 1024
"""Largest accepted encoded batch: half of Kafka's default message.max.bytes (1 MiB), so an
uncompressed batch always fits on the raw topic with room for headers and key."""

STAMPED_FIELDS: Final = ("ip", "collector_time_ms")
"""Event fields the collector stamps once, on the envelope, for every event of the batch."""
STAMPED_FIELDS_SET: Final = frozenset(STAMPED_FIELDS)


class BatchV1(BaseModel):
    """The accepted events of one request to the HTTP collector, as one raw-topic message.

    Kafka key: the collector keys the message by a client or session key of its choosing
    (never a raw user id in clear), so that one client's batches go to one partition and
    are read in the order they were produced; the events inside keep the order of the
    request. The key is the producer's choice and is not part of this declaration.

    Stamping: ``ip`` and ``collector_time_ms`` are stamped once here, not on every event. An
    event without its own value (absent or null) takes the envelope's; one with its own value
    keeps it (``encode_batch`` overwrites and leaves them out, so a collector using it never
    passes on a client's claim). ``app_id`` is the app the request was for: every event must
    name the same app, or that event alone is refused (``app_mismatch``, ``app_id``), so a
    consumer may count or route a batch by its app without opening it.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    batch_type: Literal["tally.batch"]
    schema_version: Literal[1]
    batch_id: EventId
    """A random UUID per request; a retried produce repeats it (and its events' ids)."""
    app_id: AppId
    collector_time_ms: EpochMs
    """When the collector received the request; the reference for its events' clock check."""
    ip: IpText | None = None
    """The client's address as the collector saw it; dropped after the geo lookup."""
    events: Annotated[
        list[Any],
        Field(min_length=1, max_length=MAX_BATCH_EVENTS),
        WithJsonSchema(
            {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_EVENTS,
                "items": {"type": "object"},
                "description": (
                    "Events, each as declared in <event_type>.v<schema_version>.json; ip and "
                    "collector_time_ms may be left to the envelope."
                ),
            }
        ),
    ]
    """Each element is judged alone, as an event; one that is not an object is refused
    (``malformed_json``) in its place."""


BATCH_MODELS: Final[dict[int, type[BatchV1]]] = {1: BatchV1}
"""Every batch schema version this build reads. Old versions stay here for good."""

BATCH_FIELD_NAMES: Final[frozenset[str]] = frozenset(
    name for model in BATCH_MODELS.values() for name in model.model_fields
)


class InvalidBatch(InvalidEvent):
    """A batch refused as a whole, with one reason code; its field is at most a declared
    envelope field, and it names no event type."""

    def __init__(self, reason: ReasonCode, field: str | None = None) -> None:
        super().__init__(reason)
        self.field = field if field in BATCH_FIELD_NAMES else None
        self.args = (f"batch {reason.value}" + (f" ({self.field})" if self.field else ""),)


@dataclass(frozen=True)
class DecodedMessage:
    """What one raw message holds: one valid event, or a batch's events in their order, each
    the event or the refusal in its place (an ``InvalidEvent`` without a traceback, so it
    keeps no frame that saw the values)."""

    events: tuple[Envelope | InvalidEvent, ...]
    batched: bool


def _first_forbidden_envelope_content(obj: dict[str, Any]) -> str | None:
    """The first envelope key outside the allowlist or holding text; '' when the key itself
    is. A list of events is not looked into here: each event is judged alone."""
    for key, value in obj.items():
        if key not in BATCH_FIELD_NAMES:
            return ""
        if key == "events" and isinstance(value, list):
            continue
        if type(value) is str:
            if looks_like_text(value):
                return key
        elif isinstance(value, dict | list) and nested_forbidden_content(value):
            return key
    return None


def _validate_envelope(obj: dict[str, Any]) -> BatchV1:
    """The envelope checks, by precedence: content, batch type, version, count, fields."""
    forbidden = _first_forbidden_envelope_content(obj)
    if forbidden is not None:
        raise InvalidBatch(ReasonCode.CONTENT_FORBIDDEN, forbidden or None)
    if type(obj["batch_type"]) is not str or obj["batch_type"] != BATCH_TYPE:
        raise InvalidBatch(ReasonCode.UNKNOWN_EVENT_TYPE, "batch_type")
    version = obj.get("schema_version")
    if type(version) is not int:
        raise InvalidBatch(ReasonCode.INVALID_FIELD, "schema_version")
    model = BATCH_MODELS.get(version)
    if model is None:
        raise InvalidBatch(ReasonCode.UNSUPPORTED_VERSION, "schema_version")
    events = obj.get("events")
    if isinstance(events, list) and len(events) > MAX_BATCH_EVENTS:
        raise InvalidBatch(ReasonCode.TOO_LARGE, "events")
    return _validated(model, obj)


def _validated(model: type[BatchV1], obj: dict[str, Any]) -> BatchV1:
    """The envelope's declared fields checked; a refusal names the first field at fault."""
    refusal: InvalidBatch | None = None
    try:
        batch = model.model_validate(obj)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False, include_context=False)
        loc = errors[0]["loc"] if errors else ()
        refusal = InvalidBatch(ReasonCode.INVALID_FIELD, str(loc[0]) if loc else None)
    if refusal is not None:
        raise refusal  # outside the handler: pydantic's error, which quotes input, is gone
    return batch


def _encoded_size(obj: dict[str, Any]) -> int:
    """The size of an event as compact JSON; 0 when it nests too deep to encode (no event
    nests at all: its own checks refuse it)."""
    try:
        return len(orjson.dumps(obj))
    except orjson.JSONEncodeError:
        return 0


def _event_in_batch(obj: Any, batch: BatchV1) -> Envelope:
    """One event of a sound batch, judged as alone once the envelope's stamps are filled in;
    then its app must be the batch's."""
    if not isinstance(obj, dict):
        raise InvalidEvent(ReasonCode.MALFORMED_JSON)
    if _encoded_size(obj) > MAX_EVENT_BYTES:
        raise InvalidEvent(ReasonCode.TOO_LARGE)
    if (batch.ip is not None and obj.get("ip") is None) or obj.get("collector_time_ms") is None:
        obj = {**obj}
        if batch.ip is not None and obj.get("ip") is None:
            obj["ip"] = batch.ip
        if obj.get("collector_time_ms") is None:
            obj["collector_time_ms"] = batch.collector_time_ms
    event = validate_event_object(obj, received_ms=None)
    if event.app_id != batch.app_id:
        raise InvalidEvent(ReasonCode.APP_MISMATCH, "app_id", event.event_type)
    return event


def _judged(obj: Any, batch: BatchV1) -> Envelope | InvalidEvent:
    """The event, or its refusal; a bug judging one event costs that event, not the batch."""
    try:
        return _event_in_batch(obj, batch)
    except InvalidEvent as err:
        return err.with_traceback(None)
    except Exception:  # dropped whole: it may quote the event
        return InvalidEvent(ReasonCode.PROCESSING_ERROR)


def decode_message(raw: bytes, *, received_ms: int | None) -> DecodedMessage:
    """Decode one raw-topic message: a single event (exactly as ``decode_event`` would) or a
    batch. Raises ``InvalidEvent`` when the message is refused as a whole: a single invalid
    event, or a batch whose envelope is broken (then an ``InvalidBatch``); otherwise a
    batch's invalid events are refused each in its place.

    Batch precedence: size (MAX_BATCH_BYTES), JSON, content of the envelope, batch type,
    version, event count (MAX_BATCH_EVENTS), envelope fields; then per event: not an object,
    size (MAX_EVENT_BYTES), the checks of ``decode_event``, and its app.
    """
    if len(raw) > MAX_BATCH_BYTES:
        raise InvalidEvent(ReasonCode.TOO_LARGE)
    obj = parse_json(raw)
    if not isinstance(obj, dict) or "batch_type" not in obj:
        if len(raw) > MAX_EVENT_BYTES:
            raise InvalidEvent(ReasonCode.TOO_LARGE)
        return DecodedMessage((validate_event_object(obj, received_ms=received_ms),), False)
    batch = _validate_envelope(obj)
    return DecodedMessage(tuple(_judged(event, batch) for event in batch.events), True)


def encode_batch(
    events: Sequence[Envelope],
    *,
    app_id: str,
    collector_time_ms: int,
    ip: str | None = None,
    batch_id: str | None = None,
) -> bytes:
    """The wire form of one request's accepted events, in their order.

    ``ip`` and ``collector_time_ms`` are the collector's: they overwrite whatever the events
    carried and are sent once, in the envelope. Raises ``InvalidBatch`` for a batch the
    stream step would refuse (no events, too many or too large: split the request; an
    envelope field out of its declaration) and ``InvalidEvent`` (``app_mismatch``,
    ``app_id``) for an event of another app.
    """
    exclude = set(STAMPED_FIELDS)
    return encode_batch_objects(
        [e.model_dump(exclude_none=True, exclude=exclude) for e in events],
        app_id=app_id,
        collector_time_ms=collector_time_ms,
        ip=ip,
        batch_id=batch_id,
    )


def encode_batch_objects(
    events: Sequence[dict[str, Any]],
    *,
    app_id: str,
    collector_time_ms: int,
    ip: str | None = None,
    batch_id: str | None = None,
) -> bytes:
    """``encode_batch`` for events already validated, as JSON objects without the stamped
    fields (the collector's fast path: it holds the objects it validated)."""
    if not events or len(events) > MAX_BATCH_EVENTS:
        raise InvalidBatch(ReasonCode.INVALID_FIELD if not events else ReasonCode.TOO_LARGE,
                           "events")  # fmt: skip
    for event in events:
        if event.get("app_id") != app_id:
            raise InvalidEvent(ReasonCode.APP_MISMATCH, "app_id", event.get("event_type"))
        if not STAMPED_FIELDS_SET.isdisjoint(event):
            raise ValueError("the stamped fields belong on the envelope")
    header = {
        "batch_type": BATCH_TYPE,
        "schema_version": 1,
        "batch_id": batch_id or str(uuid.uuid4()),
        "app_id": app_id,
        "collector_time_ms": collector_time_ms,
    }
    if ip is not None:
        header["ip"] = ip
    _validated(BatchV1, {**header, "events": [{}]})  # the envelope's own fields
    raw = orjson.dumps({**header, "events": events})
    if len(raw) > MAX_BATCH_BYTES:
        raise InvalidBatch(ReasonCode.TOO_LARGE, "events")
    return raw


def join_enriched_records(values: Sequence[bytes]) -> bytes:
    """One enriched-topic message from several encoded records: a JSON array. The stream
    step sends one such message per raw batch, so Kafka's per-message cost is paid once."""
    return b"[" + b",".join(values) + b"]"


def split_enriched_message(raw: bytes) -> list[Any]:
    """The records of one enriched-topic message: a JSON array of them, or one record alone
    (what earlier workers wrote). Raises orjson.JSONDecodeError when it is not JSON."""
    decoded = orjson.loads(raw)
    return decoded if isinstance(decoded, list) else [decoded]
