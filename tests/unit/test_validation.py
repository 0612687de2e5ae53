"""Validation: total, one reason per refusal, and silent about what it refused."""

from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import event as record_event
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import (
    ALL_FIELD_NAMES,
    EVENT_MODELS,
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    Envelope,
    LoginV1,
)
from schemas.examples import EXAMPLES
from schemas.reasons import ReasonCode
from schemas.validation import (
    _TEXT_EXEMPT,
    MAX_DELAY_MS,
    MAX_FUTURE_SKEW_MS,
    InvalidEvent,
    decode_event,
    encode_event,
    looks_like_text,
)
from tests.strategies import (
    MISSING,
    broken_values,
    event_dicts,
    examples,
    field_strategy,
    mutate_bytes,
    single_byte_edits,
    valid_events,
)

CHAT_LINE = "hey are you coming to the standup at nine"
SECRET_MARK = "zq7~SECRET~zq7"
"""No declared pattern allows a "~" without a prefix of its own, so every field refuses it."""


def reason_of(raw: bytes, received_ms: int | None = None) -> ReasonCode:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(raw, received_ms=received_ms)
    return caught.value.reason


@settings(max_examples=examples(4000))
@given(valid_events())
def test_valid_events_round_trip(event):
    """Every valid event decodes from its encoding to an equal event."""
    assert decode_event(encode_event(event), received_ms=None) == event


@st.composite
def broken_events(draw: st.DrawFn) -> tuple[dict, ReasonCode]:
    """A valid event with one defect, and the reason that defect must yield."""
    event = draw(event_dicts())
    model = EVENT_MODELS[(event["event_type"], event["schema_version"])]
    defect = draw(st.sampled_from(["unknown_field", "text", "type", "version", "range", "drop"]))
    if defect == "unknown_field":
        event[draw(st.sampled_from(["message", "text", "body", "x", "transcript"]))] = 1
        return event, ReasonCode.CONTENT_FORBIDDEN
    if defect == "text":
        name = draw(st.sampled_from(sorted(k for k in event if k != "user_agent")))
        event[name] = CHAT_LINE
        return event, ReasonCode.CONTENT_FORBIDDEN
    if defect == "type":
        event["event_type"] = draw(st.sampled_from(["chat_message", "", "LOGIN", 7, None]))
        return event, ReasonCode.UNKNOWN_EVENT_TYPE
    if defect == "version":
        event["schema_version"] = draw(
            st.integers(-(10**6), 10**6).filter(
                lambda v: (event["event_type"], v) not in EVENT_MODELS
            )
        )
        return event, ReasonCode.UNSUPPORTED_VERSION
    if defect == "range":
        numeric = [n for n in ("duration_ms", "packet_loss_pct", "rtt_ms") if n in event]
        if numeric:
            event[draw(st.sampled_from(numeric))] = -1
        else:
            event["channel"] = "canary"
        return event, ReasonCode.INVALID_FIELD
    required = [n for n, f in model.model_fields.items() if f.is_required()]
    event.pop(draw(st.sampled_from(sorted(set(required) - {"event_type", "schema_version"}))))
    return event, ReasonCode.INVALID_FIELD


@settings(max_examples=examples(3000))
@given(broken_events())
def test_each_invalid_event_yields_its_one_reason(case):
    """An event with one defect is refused with exactly the reason for that defect."""
    event, reason = case
    assert reason_of(orjson.dumps(event)) is reason


def allowed_reasons(raw: bytes) -> set[ReasonCode | None]:
    """What the documented precedence (size, JSON, content, type, version, fields, clock)
    allows for ``raw``, judged independently of the validator; None stands for acceptance."""
    if len(raw) > MAX_EVENT_BYTES:
        return {ReasonCode.TOO_LARGE}
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {ReasonCode.MALFORMED_JSON}
    if not isinstance(obj, dict):
        return {ReasonCode.MALFORMED_JSON}
    if set(obj) - ALL_FIELD_NAMES or any(
        type(v) is str and k != "user_agent" and looks_like_text(v) for k, v in obj.items()
    ):
        return {ReasonCode.CONTENT_FORBIDDEN}
    # a list or an object is never a valid value; it is content if it nests text or a key
    # outside the allowlist
    nested = {ReasonCode.CONTENT_FORBIDDEN} if any(
        isinstance(v, list | dict) for v in obj.values()
    ) else set()  # fmt: skip
    event_type, version = obj.get("event_type"), obj.get("schema_version")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        return nested | {ReasonCode.UNKNOWN_EVENT_TYPE}
    if type(version) is not int:
        return nested | {ReasonCode.INVALID_FIELD}
    if (event_type, version) not in EVENT_MODELS:
        return nested | {ReasonCode.UNSUPPORTED_VERSION}
    if set(obj) - set(EVENT_MODELS[(event_type, version)].model_fields):
        return {ReasonCode.CONTENT_FORBIDDEN}  # another type's field, whatever else is wrong
    if nested:
        return nested | {ReasonCode.INVALID_FIELD}
    return {ReasonCode.INVALID_FIELD, ReasonCode.CLOCK_SKEW, None}


def outcome_of(raw: bytes) -> ReasonCode | None:
    """The reason ``raw`` is refused for, or None when it decodes (and then round-trips)."""
    try:
        decoded = decode_event(raw, received_ms=None)
    except InvalidEvent as err:
        return err.reason
    assert decode_event(encode_event(decoded), received_ms=None) == decoded
    return None


MUTATION_BASES = [orjson.dumps(e) for e in EXAMPLES.values()] + [
    orjson.dumps({**EXAMPLES["quality_sample"], "schema_version": 2, "mos": 4.1, "codec": "opus"})
]
"""Valid encodings of every type, quality_sample in both versions."""


@settings(max_examples=examples(3000))
@given(st.sampled_from(MUTATION_BASES), st.randoms())
def test_mutated_encodings_get_the_reason_of_the_first_stage_they_fail(raw, rng):
    """A valid event with bytes flipped, inserted, deleted or cut decodes or gets its reason."""
    mutated = mutate_bytes(raw, rng)
    reason = outcome_of(mutated)
    record_event(f"reason: {reason}")
    assert reason in allowed_reasons(mutated)


def test_single_byte_edits_reach_every_stage_of_decoding():
    """One-byte edits of valid events reach every stage after parsing, not only bad JSON."""
    seen = Counter(outcome_of(raw) for base in MUTATION_BASES for raw in single_byte_edits(base))
    later_stages = [
        ReasonCode.CONTENT_FORBIDDEN,
        ReasonCode.UNKNOWN_EVENT_TYPE,
        ReasonCode.UNSUPPORTED_VERSION,
        ReasonCode.INVALID_FIELD,
        ReasonCode.CLOCK_SKEW,
    ]
    assert all(seen[r] >= 10 for r in later_stages), seen
    assert seen[ReasonCode.MALFORMED_JSON] < sum(seen[r] for r in later_stages), seen


_TEXT = st.text(st.characters(exclude_categories=("Cs",)))  # JSON cannot carry lone surrogates
_DECLARED = st.sampled_from(sorted(ALL_FIELD_NAMES))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what JSON parsers read as integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(_DECLARED | _TEXT, inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def json_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Any JSON object: mostly one model's keys, its type and its version, so that it reaches
    the model, with any values (containers less often); sometimes other or unknown keys."""
    key, model = draw(st.sampled_from(sorted(EVENT_MODELS.items())))
    names = st.sampled_from(list(model.model_fields)) if draw(st.integers(0, 3)) else _DECLARED
    obj = draw(st.dictionaries(names, json_scalars | json_scalars | json_values, max_size=12))
    if draw(st.integers(0, 3)) == 0:
        obj.update(draw(st.dictionaries(_TEXT, json_values, min_size=1, max_size=3)))
    if draw(st.integers(0, 3)):
        obj["event_type"], obj["schema_version"] = key
    return obj


@settings(max_examples=examples(1500))
@given(json_objects())
def test_arbitrary_json_objects_get_the_reason_of_the_first_stage_they_fail(obj):
    """Any JSON object, however shaped, is valid or refused with the reason its defect gets."""
    raw = orjson.dumps(obj)  # every generated value is encodable: no case is skipped
    reason = outcome_of(raw)
    record_event(f"reason: {reason}")
    assert reason in allowed_reasons(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 5000 + b"]" * 5000, ReasonCode.TOO_LARGE),
        (b"[" * 2000 + b"]" * 2000, ReasonCode.MALFORMED_JSON),
        (
            b'{"a":' * 600 + b"1" + b"}" * 600,
            ReasonCode.CONTENT_FORBIDDEN,
        ),  # parses; "a" isn't ours
        (b"\xff\xfe{}", ReasonCode.MALFORMED_JSON),
        (b'{"event_type": "login", "schema_version": 1e400}', ReasonCode.MALFORMED_JSON),
        (  # orjson reads an integer past 64 bits as a float: not an integer time
            orjson.dumps(EXAMPLES["login"]).replace(b"1764300000000", b"9" * 30),
            ReasonCode.INVALID_FIELD,
        ),
        (b"", ReasonCode.MALFORMED_JSON),
        (b"null", ReasonCode.MALFORMED_JSON),
        (b" " * (MAX_EVENT_BYTES + 1), ReasonCode.TOO_LARGE),
    ],
)
def test_hostile_inputs_are_refused_with_a_reason(raw, reason):
    """Deep nesting, invalid UTF-8, huge numbers and oversize input get a reason code."""
    assert reason_of(raw) is reason


def test_schema_version_must_be_an_integer_not_a_boolean():
    """`true` is not version 1, though Python calls it equal."""
    event = {**EXAMPLES["login"], "schema_version": True}
    assert reason_of(orjson.dumps(event)) is ReasonCode.INVALID_FIELD


@settings(max_examples=examples(500))
@given(event_dicts(LoginV1), st.booleans())
def test_failure_reason_only_with_a_failed_login(event, explicit_null):
    """A login whose outcome disagrees with its failure reason is refused, naming no field."""
    # the rule spans two fields; a failure without a reason has it absent or null
    if event["outcome"] == "success":
        event["outcome"] = "failure"  # no failure_reason: absent, or null
        if explicit_null:
            event["failure_reason"] = None
    else:
        event["outcome"] = "success"  # keeps its failure_reason
    with pytest.raises(InvalidEvent) as caught:
        decode_event(orjson.dumps(event), received_ms=None)
    assert (caught.value.reason, caught.value.field) == (ReasonCode.INVALID_FIELD, None)


def _dispatch_values(model: type[Envelope], name: str) -> frozenset[Any]:
    """Values of ``name`` that select another declared model rather than break this one."""
    (event_type,) = [t for (t, v), m in EVENT_MODELS.items() if m is model]
    if name == "event_type":
        return frozenset(EVENT_TYPES)
    if name == "schema_version":
        return frozenset(v for t, v in EVENT_MODELS if t == event_type)
    return frozenset()


def expected_refusal(name: str, how: str) -> tuple[ReasonCode, str]:
    """The reason and field a one-field defect must get: the envelope's dispatch fields are
    checked before the model and have reasons of their own."""
    if name == "event_type":
        return ReasonCode.UNKNOWN_EVENT_TYPE, name
    if name == "schema_version" and how == "bad_choice":
        return ReasonCode.UNSUPPORTED_VERSION, name
    return ReasonCode.INVALID_FIELD, name


VALID_EVENTS = {model: event_dicts(model) for model in EVENT_MODELS.values()}
"""One strategy per model, built once: building and checking a strategy costs more than a
draw."""
MODEL_FIELDS = [
    pytest.param(model, name, id=f"{event_type}.v{version}.{name}")
    for (event_type, version), model in sorted(EVENT_MODELS.items())
    for name in model.model_fields
]


@pytest.mark.parametrize(("model", "name"), MODEL_FIELDS)
@settings(max_examples=examples(20, floor=4))
@given(data=st.data())
def test_an_event_with_one_broken_field_is_refused_naming_that_field(model, name, data):
    """A valid event with exactly one field broken is refused for it, naming that field."""
    # broken: wrong JSON type, null, missing, out of range, outside the pattern or closed list
    event = data.draw(VALID_EVENTS[model], label="valid event")
    received_ms = event["client_time_ms"]  # the clock is checked, and passes, for the rest
    how, value = data.draw(broken_values(model, name, _dispatch_values(model, name)), "defect")
    if value is MISSING:
        event.pop(name, None)
    else:
        event[name] = value
    raw = orjson.dumps(event)
    assume(len(raw) <= MAX_EVENT_BYTES)  # a long referrer and user agent, lengthened further
    record_event(how)
    with pytest.raises(InvalidEvent) as caught:
        decode_event(raw, received_ms=received_ms)
    assert (caught.value.reason, caught.value.field) == expected_refusal(name, how)


@settings(max_examples=examples(600))
@given(
    event_dicts(),
    st.integers(-(10**8), 10**8),
    st.sampled_from(["ahead", "behind", "within"]),
    st.data(),
)
def test_clock_skew_is_refused_beyond_the_limits_and_only_there(event, received, way, data):
    """A client clock over 5 min ahead of or 7 days behind its reference time is refused."""
    # the reference is the collector's time when the event has one, else the receipt's
    received_ms = event["client_time_ms"] + received
    reference = event.get("collector_time_ms") or received_ms
    offset = data.draw(
        {
            "ahead": st.integers(MAX_FUTURE_SKEW_MS + 1, 10 * MAX_DELAY_MS),
            "behind": st.integers(-10 * MAX_DELAY_MS, -MAX_DELAY_MS - 1),
            "within": st.integers(-MAX_DELAY_MS, MAX_FUTURE_SKEW_MS),
        }[way]
    )
    event["client_time_ms"] = reference + offset
    raw = orjson.dumps(event)
    if way == "within":
        decode_event(raw, received_ms=received_ms)
    else:
        with pytest.raises(InvalidEvent) as caught:
            decode_event(raw, received_ms=received_ms)
        assert (caught.value.reason, caught.value.field) == (
            ReasonCode.CLOCK_SKEW,
            "client_time_ms",
        )


@pytest.mark.parametrize(
    ("client_offset_ms", "valid"),
    [(-6 * 24 * 3_600_000, True), (4 * 60_000, True), (6 * 60_000, False),
     (-8 * 24 * 3_600_000, False)],
)  # fmt: skip
def test_clock_skew_is_judged_against_receipt(client_offset_ms, valid):
    """A client clock up to 5 min fast or 7 days behind its receipt is accepted."""
    received = EXAMPLES["login"]["collector_time_ms"]
    event = {**EXAMPLES["login"], "client_time_ms": received + client_offset_ms}
    raw = orjson.dumps(event)
    if valid:
        decode_event(raw, received_ms=None)
    else:
        assert reason_of(raw) is ReasonCode.CLOCK_SKEW


def test_every_example_is_valid():
    """The documented example of each type passes validation."""
    for event in EXAMPLES.values():
        decode_event(orjson.dumps(event), received_ms=None)


@settings(max_examples=examples(600))
@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.sampled_from([*sorted(ALL_FIELD_NAMES - {"event_type", "schema_version"}), "message"]),
    st.sampled_from(
        [f"{SECRET_MARK} how are you", SECRET_MARK, f"{SECRET_MARK}" * 40, [SECRET_MARK],
         {"t": SECRET_MARK}, {"app_id": SECRET_MARK}]
    ),
)  # fmt: skip
def test_refusals_never_contain_the_rejected_value(event_type, field, value):
    """No reason, exception text, repr or traceback note of a refusal quotes the value."""
    event = {**EXAMPLES[event_type], field: value}
    with pytest.raises(InvalidEvent) as caught:  # every one of these values is refused
        decode_event(orjson.dumps(event), received_ms=None)
    err = caught.value
    shown = " ".join([str(err), repr(err), str(err.args), str(err.__cause__),
                      str(err.__context__), str(err.field), err.reason.value,
                      *getattr(err, "__notes__", [])])  # fmt: skip
    assert SECRET_MARK not in shown
    assert err.__cause__ is None and err.__context__ is None


@given(field_strategy(EVENT_MODELS[("login", 1)], "os_family"))
def test_declared_short_names_never_look_like_text(value):
    """No value the schema allows in a name field is taken for chat content."""
    assert not looks_like_text(value)


def test_text_detection_is_not_fooled_by_numbers():
    """A few words are a name; a sentence is content."""
    assert looks_like_text(CHAT_LINE)
    assert not looks_like_text("Chrome Mobile WebView")


TEXTS = ("hello there how are you", "a b c d", "ok\tso\nwe meet", "Chrome Mobile Web View")


@pytest.mark.parametrize("declared", sorted(EVENT_MODELS), ids=lambda d: f"{d[0]}.v{d[1]}")
def test_no_declared_field_takes_text_or_a_nested_value(declared: tuple[str, int]) -> None:
    """What validate_event_object's fast path stands on: a model never accepts text (more
    than three words) or a list or object in any field but the exempt user agent, so an
    event its model accepts has no content to scan for."""
    model = EVENT_MODELS[declared]
    base = {**EXAMPLES[declared[0]], "schema_version": declared[1]}
    assert model.model_validate(base)
    for name in model.model_fields:
        if name in _TEXT_EXEMPT:
            continue
        for value in (*TEXTS, ["a"], {"a": 1}):
            with pytest.raises(ValidationError):
                model.model_validate({**base, name: value})
