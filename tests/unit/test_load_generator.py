"""The load generator's byte templates: every event it sends is one the collector accepts,
with a fresh event id, the send time as client time, and new user and session ids each time
round the templates."""

import orjson

from producers.load import LoadGenerator, event_templates
from schemas.validation import decode_event

APP = "bench.load"


def test_every_rendered_event_is_valid_and_new_each_cycle():
    templates = event_templates(APP, 300)
    generator = LoadGenerator(templates, batch=100)
    now_ms = 1_790_000_000_000
    sent = [orjson.loads(generator.body(now_ms)) for _ in range(7)]  # past two cycles
    events = [event for body in sent for event in body]
    assert len(events) == 700
    for event in events:
        decode_event(orjson.dumps(event), received_ms=now_ms)
        assert event["app_id"] == APP and event["client_time_ms"] == now_ms
    assert len({e["event_id"] for e in events}) == 700
    first, third = events[:300], events[600:]
    for one, other in zip(first, third, strict=False):
        assert one["event_type"] == other["event_type"]
        for name in ("user_id", "session_id"):
            if one.get(name):
                assert one[name] != other[name] and one[name].endswith("-c0"), name
                assert other[name].endswith("-c2")
    assert {e["event_type"] for e in events} >= {"login", "session_start", "quality_sample"}
