"""Decode and validate one encoded event, or say why not with exactly one reason code.

Nothing here ever puts a rejected value into an exception, a log line or a reason: an
``InvalidEvent`` names the reason and, at most, a declared field name. Pydantic's own errors
(which quote the input) are caught and dropped, and refusals are raised outside the
handler so that not even ``__context__`` holds them.
"""

from typing import Any, Final

import orjson
from pydantic import ValidationError

from schemas.events import ALL_FIELD_NAMES, EVENT_MODELS, EVENT_TYPES, MAX_EVENT_BYTES, Envelope
from schemas.reasons import ReasonCode

MAX_FUTURE_SKEW_MS: Final = 5 * 60_000
"""How far ahead of its receipt a client clock may run."""
MAX_DELAY_MS: Final = 7 * 24 * 3_600_000
"""How long a client may hold an event (offline) before sending it."""

_TEXT_EXEMPT: Final = frozenset({"user_agent"})
"""Fields whose values legitimately have many words; parsed and discarded at the stream step."""
_MAX_WORDS: Final = 3
_MIN_TEXT_CHARS: Final = 2 * _MAX_WORDS + 1
"""The shortest string with more than ``_MAX_WORDS`` words ("a b c d")."""
_SCALARS: Final = frozenset({int, float, bool, type(None)})


class InvalidEvent(ValueError):
    """An event refused with one reason code; carries no part of the event's values.

    ``event_type`` is kept only when it is one of the declared types, so it cannot carry
    text either; dead letters report it.
    """

    def __init__(
        self, reason: ReasonCode, field: str | None = None, event_type: object = None
    ) -> None:
        self.reason = reason
        self.field = field if field in ALL_FIELD_NAMES else None
        self.event_type = event_type if event_type in EVENT_TYPES else None
        super().__init__(f"{reason.value} ({self.field})" if self.field else reason.value)


def looks_like_text(value: str) -> bool:
    """Whether a string reads like words someone typed (chat content), not a code or id."""
    return len(value.split(None, _MAX_WORDS)) > _MAX_WORDS


def nested_forbidden_content(value: Any) -> bool:
    """Whether a list or object anywhere holds an unknown key or text (no field is nested,
    so this runs only on events that are invalid anyway)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if looks_like_text(item):
                return True
        elif isinstance(item, dict):
            if any(not isinstance(k, str) or k not in ALL_FIELD_NAMES for k in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _first_forbidden_content(obj: dict[str, Any]) -> str | None:
    """The first key that is outside the allowlist or holds text; '' when the key itself is.

    Runs on every event at the collector and the stream step, so the common case (known
    keys, numbers, short strings) costs a set test and a type test a field."""
    for key, value in obj.items():
        if key not in ALL_FIELD_NAMES:
            return ""
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is str:
            if (
                len(value) >= _MIN_TEXT_CHARS
                and key not in _TEXT_EXEMPT
                and len(value.split(None, _MAX_WORDS)) > _MAX_WORDS
            ):
                return key
        elif isinstance(value, dict | list) and nested_forbidden_content(value):
            return key
    return None


def decode_event(raw: bytes, *, received_ms: int | None) -> Envelope:
    """Decode one JSON event and validate it against its declared (type, version).

    Clock skew is judged against the event's collector time, else ``received_ms`` (the
    Kafka timestamp), so a replay long after the fact judges it as it was judged live; with
    neither, the clock is not checked. Raises ``InvalidEvent`` and nothing else.
    """
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(ReasonCode.TOO_LARGE)
    return validate_event_object(parse_json(raw), received_ms=received_ms)


def parse_json(raw: bytes) -> Any:
    """The JSON value of ``raw``, or None when it is not JSON; never raises, so that no
    exception (or its context) holds the input."""
    try:
        return orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        return None


def validate_event_object(obj: Any, *, received_ms: int | None) -> Envelope:
    """Validate an already parsed event: every check of ``decode_event`` after size and
    JSON syntax, in the same order (a batch's events are parsed with their batch).

    The declared model is tried first: an event it accepts holds no content (no declared
    field takes text or a nested value; tests/unit/test_validation.py holds every model to
    that), so the content scan, the costliest check after the model, runs only on events
    that are refused anyway, to name the first reason in the order above.
    """
    if not isinstance(obj, dict):
        raise InvalidEvent(ReasonCode.MALFORMED_JSON)
    event_type = obj.get("event_type")
    version = obj.get("schema_version")
    model = (
        EVENT_MODELS.get((event_type, version))
        if type(event_type) is str and type(version) is int
        else None
    )
    event: Envelope | None = None
    if model is not None:
        try:
            event = model.model_validate(obj)
        except ValidationError:
            event = None  # judged below, where the reason is chosen
    if event is None:
        raise _refusal(obj)
    received_ms = event.collector_time_ms or received_ms
    if received_ms is not None:
        ahead = event.client_time_ms - received_ms
        if ahead > MAX_FUTURE_SKEW_MS or -ahead > MAX_DELAY_MS:
            raise InvalidEvent(ReasonCode.CLOCK_SKEW, "client_time_ms", event_type)
    return event


def _refusal(obj: dict[str, Any]) -> InvalidEvent:
    """Why ``obj`` is refused, the first reason in the order: content, event type, version,
    fields."""
    event_type = obj.get("event_type")
    forbidden = _first_forbidden_content(obj)
    if forbidden is not None:
        return InvalidEvent(ReasonCode.CONTENT_FORBIDDEN, forbidden or None, event_type)
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        return InvalidEvent(ReasonCode.UNKNOWN_EVENT_TYPE, "event_type")
    version = obj.get("schema_version")
    if type(version) is not int:
        return InvalidEvent(ReasonCode.INVALID_FIELD, "schema_version", event_type)
    model = EVENT_MODELS.get((event_type, version))
    if model is None:
        return InvalidEvent(ReasonCode.UNSUPPORTED_VERSION, "schema_version", event_type)
    refusal: InvalidEvent | None = None
    try:
        model.model_validate(obj)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False, include_context=False)
        if any(e["type"] == "extra_forbidden" for e in errors):
            refusal = InvalidEvent(ReasonCode.CONTENT_FORBIDDEN, None, event_type)
        else:
            loc = errors[0]["loc"] if errors else ()
            field = str(loc[0]) if loc else None
            refusal = InvalidEvent(ReasonCode.INVALID_FIELD, field, event_type)
    if refusal is None:  # the model accepts it now: it cannot be refused by it
        refusal = InvalidEvent(ReasonCode.PROCESSING_ERROR)
    return refusal  # built outside the handler: pydantic's error, which quotes input, is gone


def encode_event(event: Envelope) -> bytes:
    """The wire form of an event: compact JSON without unset optional fields."""
    return orjson.dumps(event.model_dump(exclude_none=True))
