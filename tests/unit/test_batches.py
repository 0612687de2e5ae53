"""Batches: one request's events as one message, unpacked by the stream step event by event;
a broken envelope refused whole with one reason, a broken event alone with its index."""

import json
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from schemas import batch as batch_module
from schemas.batch import (
    BATCH_FIELD_NAMES,
    BATCH_MODELS,
    BATCH_TYPE,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    BatchV1,
    DecodedMessage,
    InvalidBatch,
    decode_message,
    encode_batch,
    split_enriched_message,
)
from schemas.events import EARLIEST_MS, EVENT_MODELS, LATEST_MS, MAX_EVENT_BYTES, Envelope
from schemas.examples import EXAMPLES
from schemas.export import BATCH_JSONSCHEMA_DIR, render_batch_json_schemas
from schemas.reasons import ReasonCode
from schemas.validation import (
    MAX_DELAY_MS,
    MAX_FUTURE_SKEW_MS,
    InvalidEvent,
    decode_event,
    encode_event,
    parse_json,
)
from streams.dedupe import RecentEventIds
from streams.enrich import GeoLookup, Lookups, Place
from streams.pseudonymize import HmacKey, Pseudonymizer
from streams.steps import (
    Origin,
    Outcome,
    outcomes_of_message,
    outgoing_messages,
    validate_and_enrich,
)
from tests.geo import DEFAULT_GEOIP_DATABASE
from tests.strategies import (
    MISSING,
    broken_values,
    event_dicts,
    examples,
    field_strategy,
    mutate_bytes,
)

KEY = HmacKey("k-test", b"0123456789abcdef0123456789abcdef")
ORIGIN = Origin("tally.events.raw", 2, 41, EXAMPLES["login"]["collector_time_ms"])
MARK = "zq7~SECRET~zq7"
"""No declared pattern allows a "~", so every field refuses it; it must never show again."""
APP = EXAMPLES["login"]["app_id"]
IP = EXAMPLES["login"]["ip"]
T0 = EXAMPLES["login"]["collector_time_ms"]


@pytest.fixture(scope="module")
def lookups():
    geo = GeoLookup(DEFAULT_GEOIP_DATABASE)
    yield Lookups(Pseudonymizer(KEY).pseudonymize_id, KEY.key_id, geo.locate)
    geo.close()


# ---- strategies ----------------------------------------------------------------------------


_EVENTS = event_dicts().filter(lambda e: len(orjson.dumps(e)) <= MAX_EVENT_BYTES - 200)
"""Valid events with room for the changes a batch makes (app id, times, stamps)."""


@st.composite
def sound_batches(draw: st.DrawFn, max_events: int = 6) -> dict[str, Any]:
    """A batch whose envelope and events are all valid, as a JSON-ready dict. Events keep
    or leave out their own ip and collector time; their clocks sit near their reference."""
    collector_ms = draw(st.integers(EARLIEST_MS + 10**10, LATEST_MS - 10**10))
    batch: dict[str, Any] = {
        "batch_type": BATCH_TYPE,
        "schema_version": 1,
        "batch_id": draw(st.uuids().map(str)),
        "app_id": draw(field_strategy(BatchV1, "app_id")),
        "collector_time_ms": collector_ms,
    }
    if draw(st.booleans()):
        batch["ip"] = draw(field_strategy(BatchV1, "ip"))
    events = draw(
        st.lists(_EVENTS, min_size=1, max_size=max_events, unique_by=lambda e: e["event_id"])
    )  # a repeated id is a duplicate at the stream step
    for event in events:
        event["app_id"] = batch["app_id"]
        event["client_time_ms"] = collector_ms + draw(
            st.integers(-MAX_DELAY_MS // 2, MAX_FUTURE_SKEW_MS // 2)
        )
        if "collector_time_ms" in event:  # its own reference, kept over the envelope's
            event["collector_time_ms"] = event["client_time_ms"] + draw(
                st.integers(-MAX_FUTURE_SKEW_MS // 2, MAX_DELAY_MS // 2)
            )
    batch["events"] = events
    return batch


def stamped(event: dict[str, Any], batch: dict[str, Any]) -> Envelope:
    """The event a batch's event stands for: the envelope's ip and collector time where it
    has none of its own."""
    filled = {k: batch[k] for k in ("ip", "collector_time_ms") if k in batch and k not in event}
    model = EVENT_MODELS[(event["event_type"], event["schema_version"])]
    return model.model_validate({**event, **filled})


def shown(err: BaseException) -> str:
    """Everything an exception can show: text, repr, args, cause, context, notes."""
    return " ".join([str(err), repr(err), str(err.args), str(err.__cause__),
                     str(err.__context__), *getattr(err, "__notes__", [])])  # fmt: skip


def letter_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.destination == "dead" and outcome.key is None
    assert MARK.encode() not in outcome.value
    letter: dict[str, Any] = orjson.loads(outcome.value)
    assert letter["source"] == {"topic": ORIGIN.topic, "partition": 2, "offset": 41}
    return letter


# ---- a sound batch -------------------------------------------------------------------------


@settings(max_examples=examples(500))
@given(sound_batches(), st.none() | st.uuids().map(str))
def test_a_batch_of_valid_events_round_trips(batch, batch_id):
    """encode_batch then decode_message gives back the same events, in order, with the
    collector's ip and time stamped on each; an event's own stamps are the collector's."""
    events = [EVENT_MODELS[(e["event_type"], e["schema_version"])].model_validate(e)
              for e in batch["events"]]  # fmt: skip
    raw = encode_batch(events, app_id=batch["app_id"], collector_time_ms=batch[
        "collector_time_ms"], ip=batch.get("ip"), batch_id=batch_id)  # fmt: skip
    decoded = decode_message(raw, received_ms=None)
    stamps = {"ip": batch.get("ip"), "collector_time_ms": batch["collector_time_ms"]}
    assert decoded == DecodedMessage(tuple(e.model_copy(update=stamps) for e in events), True)
    sent = orjson.loads(raw)
    assert all("ip" not in e and "collector_time_ms" not in e for e in sent["events"])
    assert sent["batch_id"] == (batch_id or sent["batch_id"])


@settings(max_examples=examples(500))
@given(sound_batches())
def test_events_without_their_own_stamps_take_the_envelopes(batch):
    """A batch as any producer may write it decodes to its events, each keeping its own ip
    and collector time and taking the envelope's where it has none."""
    decoded = decode_message(orjson.dumps(batch), received_ms=None)
    assert decoded == DecodedMessage(tuple(stamped(e, batch) for e in batch["events"]), True)


@settings(max_examples=examples(300))
@given(batch=sound_batches())
def test_the_stream_step_enriches_every_event_of_a_sound_batch_in_order(batch, lookups):
    """One enriched record per event, in the batch's order, the same record the event would
    give alone with the envelope's stamps."""
    outcomes = outcomes_of_message(orjson.dumps(batch), ORIGIN, lookups, RecentEventIds())
    assert [o.destination for o in outcomes] == ["enriched"] * len(batch["events"])
    alone = [validate_and_enrich(encode_event(stamped(e, batch)), ORIGIN, lookups)
             for e in batch["events"]]  # fmt: skip
    assert outcomes == alone


# ---- one broken event ----------------------------------------------------------------------

_DISPATCH = frozenset({"event_type", "schema_version"})


@st.composite
def batches_with_one_broken_event(
    draw: st.DrawFn,
) -> tuple[dict[str, Any], int, tuple[ReasonCode, str | None, str | None]]:
    """A sound batch with the event at one index broken, and the (reason, field, declared
    event type) its dead letter must carry."""
    batch = draw(sound_batches())
    index = draw(st.integers(0, len(batch["events"]) - 1))
    event = batch["events"][index]
    event_type = event["event_type"]
    model = EVENT_MODELS[(event_type, event["schema_version"])]
    expected: tuple[ReasonCode, str | None, str | None]
    defect = draw(st.sampled_from(["not_object", "unknown_key", "text", "type", "version",
                                   "field", "app", "too_large", "clock"]))  # fmt: skip
    if defect == "not_object":
        batch["events"][index] = draw(st.sampled_from([MARK, [MARK], 7, None, True]))
        return batch, index, (ReasonCode.MALFORMED_JSON, None, None)
    if defect == "unknown_key":
        event[draw(st.sampled_from(["message", "transcript", "body"]))] = MARK
        expected = (ReasonCode.CONTENT_FORBIDDEN, None, event_type)
    elif defect == "text":
        name = draw(st.sampled_from(sorted(set(model.model_fields) - {"user_agent"})))
        event[name] = f"{MARK} see you at nine"
        expected = (ReasonCode.CONTENT_FORBIDDEN, name,
                    None if name == "event_type" else event_type)  # fmt: skip
    elif defect == "type":
        event["event_type"] = draw(st.sampled_from(["chat_message", "", "LOGIN", 7, None]))
        expected = (ReasonCode.UNKNOWN_EVENT_TYPE, "event_type", None)
    elif defect == "version":
        event["schema_version"] = draw(
            st.integers(-(10**6), 10**6).filter(lambda v: (event_type, v) not in EVENT_MODELS)
        )
        expected = (ReasonCode.UNSUPPORTED_VERSION, "schema_version", event_type)
    elif defect == "field":
        name = draw(st.sampled_from(sorted(set(model.model_fields) - _DISPATCH)))
        _, value = draw(broken_values(model, name))
        if value is MISSING:
            event.pop(name, None)
        else:
            event[name] = value
        assume(len(orjson.dumps(event)) <= MAX_EVENT_BYTES)  # long strings, lengthened
        expected = (ReasonCode.INVALID_FIELD, name, event_type)
    elif defect == "app":
        event["app_id"] = draw(field_strategy(BatchV1, "app_id").filter(
            lambda a: a != batch["app_id"]))  # fmt: skip
        expected = (ReasonCode.APP_MISMATCH, "app_id", event_type)
    elif defect == "too_large":
        event["referrer"] = "https://example.org/" + "a" * MAX_EVENT_BYTES
        expected = (ReasonCode.TOO_LARGE, None, None)
    else:
        reference = event.get("collector_time_ms", batch["collector_time_ms"])
        event["client_time_ms"] = reference + draw(
            st.integers(MAX_FUTURE_SKEW_MS + 1, 10 * MAX_DELAY_MS)
            | st.integers(-10 * MAX_DELAY_MS, -MAX_DELAY_MS - 1)
        )
        expected = (ReasonCode.CLOCK_SKEW, "client_time_ms", event_type)
    return batch, index, expected


@settings(max_examples=examples(1000))
@given(case=batches_with_one_broken_event())
def test_one_broken_event_costs_that_event_alone(case, lookups):
    """A sound envelope with one broken event at index i: exactly one dead letter, with i and
    the event's reason, field and declared type; every other event enriched, in order."""
    batch, index, (reason, field, event_type) = case
    outcomes = outcomes_of_message(orjson.dumps(batch), ORIGIN, lookups)
    assert len(outcomes) == len(batch["events"])
    assert [o.destination == "dead" for o in outcomes] == [i == index for i in range(len(outcomes))]
    letter = letter_of(outcomes[index])
    assert (letter["reason"], letter["field"], letter["event_type"], letter["index"]) == (
        reason.value, field, event_type, index
    )  # fmt: skip
    decoded = decode_message(orjson.dumps(batch), received_ms=None)
    refusal = decoded.events[index]
    assert isinstance(refusal, InvalidEvent) and refusal.reason is reason
    assert refusal.__traceback__ is None and refusal.__context__ is None
    assert MARK not in shown(refusal)
    for i, event in enumerate(batch["events"]):
        if i != index:
            assert decoded.events[i] == stamped(event, batch)


# ---- a broken envelope ---------------------------------------------------------------------


def _dispatch_defect(name: str, how: str) -> tuple[ReasonCode, str | None]:
    """The reason and field a broken batch_type or schema_version must get."""
    if name == "batch_type":  # without it, the message is read as an event with batch keys
        return (ReasonCode.CONTENT_FORBIDDEN, None) if how == "missing" else (
            ReasonCode.UNKNOWN_EVENT_TYPE, "batch_type"
        )  # fmt: skip
    if how == "bad_choice":
        return ReasonCode.UNSUPPORTED_VERSION, "schema_version"
    return ReasonCode.INVALID_FIELD, "schema_version"


@st.composite
def batches_with_a_broken_envelope(
    draw: st.DrawFn,
) -> tuple[dict[str, Any], tuple[ReasonCode, str | None]]:
    """A batch with one envelope defect, and the one (reason, field) it must be refused for."""
    batch = draw(sound_batches(max_events=3))
    defect = draw(st.sampled_from(["unknown_key", "text", "dispatch", "field", "events"]))
    if defect == "unknown_key":
        batch[draw(st.sampled_from(["note", "message", "client"]))] = MARK
        return batch, (ReasonCode.CONTENT_FORBIDDEN, None)
    if defect == "text":
        name = draw(st.sampled_from(["batch_type", "batch_id", "app_id", "ip", "events"]))
        batch[name] = f"{MARK} see you at nine"
        return batch, (ReasonCode.CONTENT_FORBIDDEN, name)
    if defect == "dispatch":
        name = draw(st.sampled_from(["batch_type", "schema_version"]))
        how, value = draw(broken_values(BatchV1, name))
        if value is MISSING:
            batch.pop(name)
        else:
            batch[name] = value
        return batch, _dispatch_defect(name, how)
    if defect == "field":
        name = draw(st.sampled_from(["batch_id", "app_id", "collector_time_ms", "ip"]))
        _, value = draw(broken_values(BatchV1, name))
        if value is MISSING:
            batch.pop(name)
        else:
            batch[name] = value
        return batch, (ReasonCode.INVALID_FIELD, name)
    value = draw(st.sampled_from([MISSING, [], {"event_type": "login"}, MARK, None, 7]))
    if value is MISSING:
        batch.pop("events")
    else:
        batch["events"] = value
    return batch, (ReasonCode.INVALID_FIELD, "events")


def refused_whole(raw: bytes, lookups: Lookups) -> tuple[str, str | None]:
    """The one dead letter of a message refused as a whole, checked and returned as
    (reason, field); decode_message's refusal is checked to show nothing of the input."""
    with pytest.raises(InvalidEvent) as caught:
        decode_message(raw, received_ms=None)
    assert MARK not in shown(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    (outcome,) = outcomes_of_message(raw, ORIGIN, lookups)
    letter = letter_of(outcome)
    assert (letter["index"], letter["event_type"], letter["reason"]) == (
        None, None, caught.value.reason.value
    )  # fmt: skip
    return letter["reason"], letter["field"]


@settings(max_examples=examples(700))
@given(case=batches_with_a_broken_envelope())
def test_a_broken_envelope_is_refused_whole_with_its_one_reason(case, lookups):
    """One envelope defect: one dead letter with that defect's reason and field, no index,
    no event type, whatever the events."""
    batch, (reason, field) = case
    raw = orjson.dumps(batch)
    if "batch_type" not in batch and len(raw) > MAX_EVENT_BYTES:
        reason = ReasonCode.TOO_LARGE  # read as one event, and too large for one
    assert refused_whole(raw, lookups) == (reason.value, field)


def _sound() -> dict[str, Any]:
    return {"batch_type": BATCH_TYPE, "schema_version": 1,
            "batch_id": "0b7e7f3e-3c41-4f55-9d55-0c1a3e9d8a99", "app_id": APP,
            "collector_time_ms": T0, "ip": IP, "events": [EXAMPLES["login"]]}  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (orjson.dumps(_sound())[:-1], "malformed_json", None),
        (b"\xff" + orjson.dumps(_sound()), "malformed_json", None),
        (orjson.dumps([_sound()]), "malformed_json", None),
        (orjson.dumps(_sound()) + b" " * MAX_BATCH_BYTES, "too_large", None),
        (orjson.dumps({**_sound(), "events": [EXAMPLES["login"]] * (MAX_BATCH_EVENTS + 1)}),
         "too_large", "events"),
        (orjson.dumps({**_sound(), "batch_type": "tally.batch.v2"}), "unknown_event_type",
         "batch_type"),
        (orjson.dumps({**_sound(), "schema_version": 2}), "unsupported_version",
         "schema_version"),
        (orjson.dumps({**_sound(), "schema_version": True}), "invalid_field", "schema_version"),
        (orjson.dumps({**_sound(), "events": []}), "invalid_field", "events"),
    ],
)  # fmt: skip
def test_each_envelope_defect_gives_its_reason(raw, reason, field, lookups):
    """Broken JSON, too many bytes or events, another batch type or version, no events:
    each refuses the whole batch with its one reason."""
    assert refused_whole(raw, lookups) == (reason, field)


def test_the_most_events_a_batch_may_hold_are_accepted(lookups):
    """MAX_BATCH_EVENTS events are one batch; one more is too_large (above)."""
    events = [{**EXAMPLES["login"], "event_id": f"00000000-0000-4000-8000-{n:012d}"}
              for n in range(MAX_BATCH_EVENTS)]  # fmt: skip
    raw = orjson.dumps({**_sound(), "events": events})
    assert len(raw) <= MAX_BATCH_BYTES
    outcomes = outcomes_of_message(raw, ORIGIN, lookups, RecentEventIds())
    assert [o.destination for o in outcomes] == ["enriched"] * MAX_BATCH_EVENTS


# ---- single events -------------------------------------------------------------------------


def judged_alone(raw: bytes) -> Envelope | ReasonCode:
    try:
        return decode_event(raw, received_ms=T0)
    except InvalidEvent as err:
        return err.reason


def judged_as_message(raw: bytes) -> Envelope | ReasonCode:
    try:
        decoded = decode_message(raw, received_ms=T0)
    except InvalidEvent as err:
        return err.reason
    assert not decoded.batched and len(decoded.events) == 1
    assert isinstance(decoded.events[0], Envelope)
    return decoded.events[0]


MUTATION_BASES = [orjson.dumps(e) for e in EXAMPLES.values()]


@settings(max_examples=examples(1000))
@given(
    st.sampled_from(MUTATION_BASES).map(lambda r: (r, None))
    | st.tuples(st.sampled_from(MUTATION_BASES), st.randoms())
    | event_dicts().map(lambda e: (orjson.dumps(e), None))
    | st.binary(max_size=64).map(lambda r: (r, None))
)
def test_a_message_without_batch_type_is_judged_exactly_as_one_event(case):
    """Any message that is not a batch (valid events, mutated events, any bytes) gets the
    event or reason decode_event gives it: single events keep working unchanged."""
    raw, rng = case
    if rng is not None:
        raw = mutate_bytes(raw, rng)
    obj = parse_json(raw)
    assume(not (isinstance(obj, dict) and "batch_type" in obj))
    assert judged_as_message(raw) == judged_alone(raw)


def test_a_large_single_event_is_too_large_as_before(lookups):
    """An event over MAX_EVENT_BYTES is too_large, though a batch of that size is fine."""
    raw = orjson.dumps({**EXAMPLES["login"], "referrer": "https://a.example/" + "b" * 5000})
    assert refused_whole(raw, lookups) == ("too_large", None)


@pytest.mark.parametrize("event_type", sorted(EXAMPLES))
def test_the_stream_step_treats_a_single_event_as_before(event_type, lookups):
    """A single event, valid or not, gives the one outcome validate_and_enrich gives it."""
    for event in (EXAMPLES[event_type], {**EXAMPLES[event_type], "note": MARK}):
        raw = orjson.dumps(event)
        outcomes = outcomes_of_message(raw, ORIGIN, lookups)
        assert outcomes == [validate_and_enrich(raw, ORIGIN, lookups)]
        if outcomes[0].destination == "dead":
            assert letter_of(outcomes[0])["index"] is None


# ---- the stream step's per-batch work ------------------------------------------------------


def test_the_envelopes_ip_is_looked_up_once_per_batch(lookups):
    """Six events sharing the envelope's IP cost one geo lookup; an event with an IP of its
    own costs one more."""
    asked: list[str] = []

    def locate(ip: str) -> Place:
        asked.append(ip)
        return lookups.locate(ip)

    counting = Lookups(lookups.pseudonymize_id, lookups.key_id, locate)
    events = [decode_event(orjson.dumps(e), received_ms=None) for e in EXAMPLES.values()]
    raw = encode_batch(events, app_id=APP, collector_time_ms=T0, ip=IP)
    outcomes = outcomes_of_message(raw, ORIGIN, counting)
    assert [orjson.loads(o.value)["country_code"] for o in outcomes] == ["GB"] * 6
    assert asked == [IP]
    own = {**_sound(), "events": [EXAMPLES["login"], {**EXAMPLES["logout"], "ip": "8.8.8.8"}]}
    asked.clear()
    outcomes_of_message(orjson.dumps(own), ORIGIN, counting)
    assert asked == [IP, "8.8.8.8"]


def test_duplicates_and_bugs_inside_a_batch_cost_one_event_each(lookups):
    """An event id seen before is a duplicate at its index; a bug enriching one event is a
    processing_error at its index; the others are enriched."""

    def fragile(ip: str) -> Place:
        if ip == "10.0.0.7":
            raise RuntimeError(f"boom {ip}")
        return lookups.locate(ip)

    fragile_lookups = Lookups(lookups.pseudonymize_id, lookups.key_id, fragile)
    events = [EXAMPLES["login"], EXAMPLES["logout"], EXAMPLES["login"],
              {**EXAMPLES["client_info"], "ip": "10.0.0.7"}]  # fmt: skip
    raw = orjson.dumps({**_sound(), "events": events})
    outcomes = outcomes_of_message(raw, ORIGIN, fragile_lookups, RecentEventIds())
    assert [o.reason for o in outcomes] == [None, None, ReasonCode.DUPLICATE,
                                            ReasonCode.PROCESSING_ERROR]  # fmt: skip
    assert [letter_of(o)["index"] for o in outcomes[2:]] == [2, 3]
    assert all(b"10.0.0.7" not in o.value for o in outcomes)


def test_a_bug_decoding_one_event_costs_that_event_alone(lookups, monkeypatch):
    """Should checking one event of a batch raise an unexpected error, that event alone is a
    processing_error at its index, and the error (which quotes the event) is dropped."""
    checked = batch_module.validate_event_object

    def fragile(obj: Any, *, received_ms: int | None) -> Envelope:
        if obj.get("user_id") == MARK:
            raise RuntimeError(f"boom {obj}")
        return checked(obj, received_ms=received_ms)

    monkeypatch.setattr(batch_module, "validate_event_object", fragile)
    events = [EXAMPLES["login"], {**EXAMPLES["logout"], "user_id": MARK}, EXAMPLES["session_end"]]
    raw = orjson.dumps({**_sound(), "events": events})
    refusal = decode_message(raw, received_ms=None).events[1]
    assert isinstance(refusal, InvalidEvent) and MARK not in shown(refusal)
    outcomes = outcomes_of_message(raw, ORIGIN, lookups)
    assert [o.reason for o in outcomes] == [None, ReasonCode.PROCESSING_ERROR, None]
    assert letter_of(outcomes[1])["index"] == 1


# ---- encode_batch --------------------------------------------------------------------------


def _login(n: int, **changes: object) -> Envelope:
    fields = {**EXAMPLES["login"], "event_id": f"00000000-0000-4000-8000-{n:012d}", **changes}
    return decode_event(orjson.dumps(fields), received_ms=None)


@pytest.mark.parametrize(
    ("events", "options", "reason", "field"),
    [
        ([], {}, ReasonCode.INVALID_FIELD, "events"),
        ([_login(0)] * (MAX_BATCH_EVENTS + 1), {}, ReasonCode.TOO_LARGE, "events"),
        ([_login(n, referrer="https://example.org/" + "p" * 2000) for n in range(300)], {},
         ReasonCode.TOO_LARGE, "events"),
        ([_login(0), _login(1, app_id="other.app")], {}, ReasonCode.APP_MISMATCH, "app_id"),
        ([_login(0)], {"ip": MARK}, ReasonCode.INVALID_FIELD, "ip"),
        ([_login(0)], {"batch_id": MARK}, ReasonCode.INVALID_FIELD, "batch_id"),
        ([_login(0)], {"collector_time_ms": 7}, ReasonCode.INVALID_FIELD, "collector_time_ms"),
    ],
)  # fmt: skip
def test_encode_batch_refuses_what_the_stream_step_would(events, options, reason, field):
    """No events, too many or too large, another app, a bad envelope field: refused at the
    collector with the reason the stream step would give, and without the value."""
    with pytest.raises(InvalidEvent) as caught:
        encode_batch(events, **{"app_id": APP, "collector_time_ms": T0, **options})
    assert (caught.value.reason, caught.value.field) == (reason, field)
    assert MARK not in shown(caught.value)


def test_a_batch_refusal_names_only_envelope_fields():
    """InvalidBatch keeps a field only when it is a declared envelope field."""
    assert InvalidBatch(ReasonCode.INVALID_FIELD, "events").field == "events"
    assert InvalidBatch(ReasonCode.INVALID_FIELD, MARK).field is None
    assert MARK not in shown(InvalidBatch(ReasonCode.INVALID_FIELD, MARK))


# ---- the declaration -----------------------------------------------------------------------


def test_exported_batch_json_schema_is_current():
    """The committed batch JSON Schema files are exactly what the declarations render."""
    committed = {p.name: p.read_text() for p in BATCH_JSONSCHEMA_DIR.glob("*.json")}
    assert committed == render_batch_json_schemas(), "run: python -m schemas.export"
    assert sorted(committed) == [f"batch.v{v}.json" for v in sorted(BATCH_MODELS)]


def test_the_envelope_has_no_free_text_and_no_unknown_field():
    """Every string of the envelope is bounded by a pattern or a constant; unknown fields are
    refused, in the model and in the exported schema."""
    for text in render_batch_json_schemas().values():
        schema = json.loads(text)
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == BATCH_FIELD_NAMES
        for name, prop in schema["properties"].items():
            for variant in prop.get("anyOf", [prop]):
                if variant.get("type") == "string":
                    assert "pattern" in variant or "const" in variant, name
    for model in BATCH_MODELS.values():
        assert model.model_config.get("extra") == "forbid"
        assert model.model_config.get("strict") is True


@settings(max_examples=examples(100))
@given(batch=sound_batches())
def test_a_batch_leaves_as_one_enriched_message_the_sink_splits_back(batch, lookups):
    """The enriched records of one raw batch are joined into one message (keyed by the
    first), and what the sink splits back is every record, in order; dead letters stay one
    message each."""
    outcomes = outcomes_of_message(orjson.dumps(batch), ORIGIN, lookups, RecentEventIds())
    (message,) = outgoing_messages(outcomes)
    assert (message.destination, message.key) == ("enriched", outcomes[0].key)
    assert split_enriched_message(message.value) == [orjson.loads(o.value) for o in outcomes]
    assert [o.record for o in outcomes] == split_enriched_message(message.value)


def test_dead_letters_leave_one_message_each_after_the_joined_records(lookups):
    events = [EXAMPLES["login"], EXAMPLES["login"], {**EXAMPLES["logout"], "app_id": "Bad"}]
    raw = orjson.dumps({**_sound(), "events": events})
    messages = outgoing_messages(outcomes_of_message(raw, ORIGIN, lookups, RecentEventIds()))
    assert [m.destination for m in messages] == ["enriched", "dead", "dead"]
    assert len(split_enriched_message(messages[0].value)) == 1
    assert [orjson.loads(m.value)["index"] for m in messages[1:]] == [1, 2]
    assert outgoing_messages([]) == []


def test_the_sink_reads_a_single_record_message_as_before():
    record = {"event_id": "x", "event_type": "login"}
    assert split_enriched_message(orjson.dumps(record)) == [record]


def test_joined_records_are_split_to_stay_under_the_message_bound(lookups):
    """However many records come at once (a timer closing thousands of silent sessions),
    no enriched message passes the bound, and every record leaves once, in order."""
    batch = {**_sound(), "events": [{**EXAMPLES["login"], "event_id": str(uuid.uuid4())}
                                    for _ in range(40)]}  # fmt: skip
    outcomes = outcomes_of_message(orjson.dumps(batch), ORIGIN, lookups, RecentEventIds())
    bound = 3 * len(outcomes[0].value)
    messages = outgoing_messages(outcomes, max_bytes=bound)
    assert len(messages) > 10 and all(len(m.value) <= bound + 2 for m in messages)
    records = [r for m in messages for r in split_enriched_message(m.value)]
    assert records == [orjson.loads(o.value) for o in outcomes]
