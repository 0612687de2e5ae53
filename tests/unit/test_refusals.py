"""The dead-letter limit trips once on a flood of refusals, names only reason codes, ignores
duplicates and small windows, forgets what left the window, and re-arms after recovery."""

import pytest

from schemas.reasons import ReasonCode
from streams.refusals import RefusalWatch

BAD = ReasonCode.CONTENT_FORBIDDEN
UNKNOWN = ReasonCode.UNKNOWN_EVENT_TYPE


def _watch(now: list[float]) -> RefusalWatch:
    return RefusalWatch(share=0.5, window_s=60, min_events=100, clock=lambda: now[0])


def test_a_flood_trips_once_with_its_top_reasons_and_rearms_after_recovery() -> None:
    now = [1000.0]
    watch = _watch(now)
    assert watch.record([None] * 80) is None
    assert watch.record([BAD] * 15 + [UNKNOWN] * 5) is None, "under the share"
    alarm = watch.record([BAD] * 60 + [UNKNOWN] * 20)
    assert alarm is not None and alarm.events == 180
    assert alarm.share == pytest.approx(100 / 180)
    assert alarm.top_reasons == (("content_forbidden", 75), ("unknown_event_type", 25))
    assert "content_forbidden 75" in alarm.describe()
    assert watch.record([BAD] * 100) is None, "tripped once, not on every batch"
    now[0] += 61  # the flood leaves the window
    assert watch.record([None] * 200) is None and not watch.tripped
    assert watch.record([BAD] * 300) is not None, "re-armed after the recovery"


def test_duplicates_and_small_windows_never_trip() -> None:
    now = [0.0]
    watch = _watch(now)
    assert watch.record([ReasonCode.DUPLICATE] * 500) is None
    assert watch.record([BAD] * 99) is None, "99 events are too few to mean anything"


@pytest.mark.parametrize("share", [0.0, 1.5, float("nan")])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError):
        RefusalWatch(share=share)
