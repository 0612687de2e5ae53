"""The synthetic workload: seeded, valid, consent-respecting."""

import orjson
import pytest

from producers.sdk import apply_consent, prepare_event
from producers.workload import generate_workload
from schemas.consent import Consent
from schemas.examples import EXAMPLES
from schemas.reasons import ReasonCode
from schemas.validation import InvalidEvent, decode_event

END_MS = 1_764_300_000_000


def test_same_seed_same_events():
    """Two workloads from one seed are identical, event for event."""
    a = generate_workload(seed=7, clients=50, events=500, end_ms=END_MS, span_ms=3_600_000)
    b = generate_workload(seed=7, clients=50, events=500, end_ms=END_MS, span_ms=3_600_000)
    assert a == b and len(a) == 500
    assert {e.event_type for e in a} >= {"login", "session_start", "quality_sample"}


def test_every_prepared_event_passes_validation():
    """What the SDK sends is exactly what the stream step accepts."""
    for event in generate_workload(seed=3, clients=40, events=400, end_ms=END_MS,
                                   span_ms=3_600_000):  # fmt: skip
        decode_event(prepare_event(event, END_MS), received_ms=None)


def test_sdk_withholds_ids_without_consent():
    """With consent none, the SDK sends neither the user id nor the referrer."""
    event = decode_event(orjson.dumps({**EXAMPLES["login"], "consent": "none"}), received_ms=None)
    sent = orjson.loads(prepare_event(event, EXAMPLES["login"]["collector_time_ms"]))
    assert "user_id" not in sent and "referrer" not in sent
    assert apply_consent(event).user_id is None


def test_events_made_before_consent_was_narrowed_are_not_sent():
    """After the user narrows consent, an event made under the wider one is refused."""
    event = decode_event(orjson.dumps(EXAMPLES["login"]), received_ms=None)
    now = EXAMPLES["login"]["collector_time_ms"]
    with pytest.raises(InvalidEvent) as caught:
        prepare_event(event, now, Consent.ANONYMOUS)
    assert caught.value.reason is ReasonCode.CONSENT_WITHDRAWN
    assert prepare_event(event, now, Consent.FULL)
