"""Validation: total, one reason per refusal, and silent about what it refused."""

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import ALL_FIELD_NAMES, EVENT_MODELS, MAX_EVENT_BYTES
from schemas.examples import EXAMPLES
from schemas.reasons import ReasonCode
from schemas.validation import InvalidEvent, decode_event, encode_event, looks_like_text
from tests.strategies import event_dicts, examples, field_strategy, valid_events

CHAT_LINE = "hey are you coming to the standup at nine"
SECRET_MARK = "zq7SECRETzq7"


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


@settings(max_examples=examples(2000))
@given(st.binary(max_size=MAX_EVENT_BYTES + 10))
def test_random_bytes_only_ever_raise_invalid_event(raw):
    """Arbitrary bytes either decode or raise InvalidEvent, never anything else."""
    try:
        decode_event(raw, received_ms=None)
    except InvalidEvent as err:
        assert isinstance(err.reason, ReasonCode)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=examples(1500))
@given(st.dictionaries(st.sampled_from(sorted(ALL_FIELD_NAMES)) | st.text(), json_values))
def test_arbitrary_json_objects_only_ever_raise_invalid_event(obj):
    """Any JSON object, however shaped, is either valid or refused with a reason."""
    try:
        raw = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return
    try:
        decode_event(raw, received_ms=None)
    except InvalidEvent as err:
        assert isinstance(err.reason, ReasonCode)


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


def test_failure_reason_only_with_a_failed_login():
    """A successful login that gives a failure reason is refused."""
    event = {**EXAMPLES["login"], "outcome": "success"}
    assert reason_of(orjson.dumps(event)) is ReasonCode.INVALID_FIELD


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
         {"t": SECRET_MARK}, -1]
    ),
)  # fmt: skip
def test_refusals_never_contain_the_rejected_value(event_type, field, value):
    """No reason, exception text, repr or traceback note of a refusal quotes the value."""
    event = {**EXAMPLES[event_type], field: value}
    try:
        decode_event(orjson.dumps(event), received_ms=None)
    except InvalidEvent as err:
        shown = " ".join([str(err), repr(err), str(err.args), str(err.__cause__),
                          str(err.__context__), str(err.field), err.reason.value])  # fmt: skip
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
