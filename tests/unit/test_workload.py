"""The synthetic workload: seeded, valid, consent-respecting."""

import orjson
import pytest

from producers.sdk import apply_consent, prepare_event
from producers.workload import APP_IDS, generate_workload, sender_of
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


def test_workload_has_the_mix_of_real_clients():
    """Browser and desktop apps, every channel, consent choices, login failures from the auth
    server, and poor networks whose calls drop more often and lose more packets."""
    workload = generate_workload(seed=11, clients=300, events=6000, end_ms=END_MS,
                                 span_ms=3_600_000)  # fmt: skip
    assert {e.app_id for e in workload} == set(APP_IDS.values())
    assert {e.channel for e in workload} == {"stable", "beta", "nightly"}
    assert {e.consent for e in workload} == {"full", "anonymous", "none"}
    assert all(e.referrer is None for e in workload if e.app_id == APP_IDS["desktop"])
    logins = [e for e in workload if e.event_type == "login"]
    assert {sender_of(e) for e in logins} == {"server"}
    assert {sender_of(e) for e in workload if e.event_type != "login"} == {"client"}
    assert 0.03 < sum(e.outcome == "failure" for e in logins) / len(logins) < 0.3
    samples = [e for e in workload if e.event_type == "quality_sample"]
    lossy = sum(e.packet_loss_pct > 5 for e in samples) / len(samples)
    assert 0.02 < lossy < 0.3, "a share of calls on poor networks"
    ends = [e for e in workload if e.event_type == "session_end"]
    dropped = sum(e.end_reason == "dropped" for e in ends) / len(ends)
    assert 0.03 < dropped < 0.2
