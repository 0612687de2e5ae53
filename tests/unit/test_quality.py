"""Per-session call quality: E-model MOS, percentiles, classes, the bounded rollup."""

import json
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.quality import (
    MAX_KEPT_SAMPLES,
    QualityRollup,
    QualityThresholds,
    classify_quality,
    estimate_mos,
    percentile,
    r_factor_to_mos,
)
from tests.strategies import examples

THRESHOLDS = QualityThresholds(400, 30, 5, 300, 20, 1)

rtts = st.floats(0, 60_000)
jitters = st.floats(0, 60_000)
losses = st.floats(0, 100)
values = st.lists(st.floats(0, 1e6), min_size=1, max_size=60)


def test_a_perfect_network_scores_the_e_model_ceiling():
    """No delay, jitter or loss: d = 10 ms, R = 93.2 - 0.25 = 92.95, MOS about 4.40."""
    assert estimate_mos(0, 0, 0) == pytest.approx(4.4044, abs=1e-4)


def test_known_points_of_the_simplified_e_model():
    """The delay impairment bends at 160 ms effective latency without a jump; loss costs
    2.5 R per percent."""
    knee_rtt = 2 * (160 - 10)  # d = rtt/2 + 10 = 160
    assert estimate_mos(knee_rtt - 1e-9, 0, 0) == pytest.approx(estimate_mos(knee_rtt, 0, 0))
    assert estimate_mos(knee_rtt, 0, 0) == pytest.approx(r_factor_to_mos(93.2 - 4))
    assert estimate_mos(600, 0, 0) == pytest.approx(r_factor_to_mos(93.2 - (310 - 120) / 10))
    assert estimate_mos(0, 0, 4) == pytest.approx(r_factor_to_mos(93.2 - 10 / 40 - 10))
    assert estimate_mos(0, 25, 0) == estimate_mos(100, 0, 0)  # 2 x jitter = rtt / 2


def test_mos_from_r_follows_g107_and_is_clamped():
    """G.107's cubic between the clamps: 1 at or below R = 0, 4.5 at or above 100, and
    never under 1 where the cubic dips (R below about 6.5)."""
    assert r_factor_to_mos(-5) == 1.0
    assert r_factor_to_mos(0) == 1.0
    assert r_factor_to_mos(3.2) == 1.0
    assert r_factor_to_mos(100) == 4.5
    assert r_factor_to_mos(70) == pytest.approx(1 + 0.035 * 70 + 70 * 10 * 30 * 7e-6)


@settings(max_examples=examples(2000))
@given(st.floats(-50, 150), st.floats(-50, 150))
def test_mos_from_r_is_monotone(r1, r2):
    low, high = sorted((r1, r2))
    assert 1 <= r_factor_to_mos(low) <= r_factor_to_mos(high) + 1e-12 <= 4.5 + 1e-12


@settings(max_examples=examples(2000))
@given(rtts, jitters, losses, st.sampled_from(range(3)), st.floats(0, 1000))
def test_mos_stays_in_range_and_never_improves_as_a_measure_worsens(rtt, jitter, loss, i, more):
    """Within [1, 4.5] everywhere, and monotone non-increasing in each input."""
    base = [rtt, jitter, loss]
    worse = list(base)
    worse[i] = min(worse[i] + more, 100 if i == 2 else 60_000)
    assert 1 <= estimate_mos(*base) <= 4.5
    assert estimate_mos(*worse) <= estimate_mos(*base) + 1e-12


def test_quality_classes_and_their_reasons():
    """p95 above a poor limit: poor; else above a fair limit: fair; the first metric in the
    order rtt, jitter, loss names the reason, and a limit itself does not pass."""
    assert classify_quality(100, 5, 0.1, THRESHOLDS) == ("good", "")
    assert classify_quality(300, 20, 1, THRESHOLDS) == ("good", "")
    assert classify_quality(301, 5, 0.1, THRESHOLDS) == ("fair", "rtt")
    assert classify_quality(100, 21, 0.1, THRESHOLDS) == ("fair", "jitter")
    assert classify_quality(100, 5, 1.5, THRESHOLDS) == ("fair", "loss")
    assert classify_quality(401, 5, 0.1, THRESHOLDS) == ("poor", "rtt")
    assert classify_quality(350, 25, 6, THRESHOLDS) == ("poor", "loss")  # worst class first
    assert classify_quality(500, 50, 50, THRESHOLDS) == ("poor", "rtt")
    assert classify_quality(100, 31, 6, THRESHOLDS) == ("poor", "jitter")


def test_thresholds_refuse_a_fair_limit_past_the_poor_one():
    with pytest.raises(ValueError, match="fair_jitter_ms"):
        QualityThresholds(400, 30, 5, 300, 40, 1)


def test_percentile_interpolates_between_ranks():
    """Type 7 (numpy's default): exact at sample values, linear between them."""
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([4, 1, 3, 2], 0.95) == pytest.approx(3.85)
    assert percentile(list(range(101)), 0.95) == 95
    with pytest.raises(ValueError):
        percentile([], 0.5)


@settings(max_examples=examples(1000))
@given(values.filter(lambda v: len(v) >= 2), st.randoms(use_true_random=False))
def test_percentiles_ignore_order_and_agree_with_statistics(data, rng):
    shuffled = list(data)
    rng.shuffle(shuffled)
    for fraction, index in ((0.5, 9), (0.95, 18)):
        assert percentile(shuffled, fraction) == percentile(data, fraction)
        expected = statistics.quantiles(data, n=20, method="inclusive")[index]
        assert percentile(data, fraction) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _rollup(samples: list[tuple[float, float, float, float, str | None, float | None]]):
    rollup = QualityRollup()
    for sample in samples:
        rollup = rollup.with_sample(*sample)
    return rollup


def _samples(count: int, seed: int = 7):
    rng = random.Random(seed)
    return [
        (
            rng.uniform(10, 600),
            rng.uniform(0, 50),
            rng.uniform(0, 8),
            rng.uniform(100, 3000),
            rng.choice([None, "audio_only", "360p", "720p", "1080p"]),
            rng.choice([None, rng.uniform(1, 5)]),
        )
        for _ in range(count)
    ]


def test_rollup_is_exact_up_to_the_cap_whatever_the_order():
    """With MAX_KEPT_SAMPLES samples, every value is kept: percentiles are those of all of
    them, in any arrival order; means and the worst resolution are exact."""
    samples = _samples(MAX_KEPT_SAMPLES)
    shuffled = random.Random(1).sample(samples, len(samples))
    columns = _rollup(samples).columns(THRESHOLDS)
    other = _rollup(shuffled).columns(THRESHOLDS)
    for name in ("rtt_p50_ms", "rtt_p95_ms", "jitter_p95_ms", "loss_p50_pct", "loss_p95_pct"):
        assert columns[name] == other[name]
    assert columns["rtt_p95_ms"] == percentile([s[0] for s in samples], 0.95)
    assert columns["jitter_p50_ms"] == percentile([s[1] for s in samples], 0.5)
    assert columns["loss_p95_pct"] == percentile([s[2] for s in samples], 0.95)
    assert columns["sample_count"] == MAX_KEPT_SAMPLES
    assert columns["bitrate_mean_kbps"] == pytest.approx(statistics.fmean(s[3] for s in samples))
    assert columns["worst_resolution"] == "audio_only"
    sent_mos = [s[5] for s in samples if s[5] is not None]
    assert columns["client_mos"] == pytest.approx(statistics.fmean(sent_mos))
    estimates = [estimate_mos(*s[:3]) for s in samples]
    assert columns["mos_estimate"] == pytest.approx(statistics.fmean(estimates))
    assert (columns["quality_class"], columns["quality_reason"]) == classify_quality(
        columns["rtt_p95_ms"], columns["jitter_p95_ms"], columns["loss_p95_pct"], THRESHOLDS
    )


def test_past_the_cap_every_other_sample_goes_and_the_stride_doubles():
    """Kept values stay between half the cap and the cap, and are exactly the samples whose
    arrival index is a multiple of the stride: deterministic and evenly spread."""
    rollup = QualityRollup()
    for index in range(5000):
        rollup = rollup.with_sample(float(index), 1.0, 0.5, 1000.0)
        assert len(rollup.rtt_ms) <= MAX_KEPT_SAMPLES
    assert rollup.count == 5000 and rollup.stride == 8
    assert len(rollup.rtt_ms) >= MAX_KEPT_SAMPLES // 2
    assert rollup.rtt_ms == tuple(float(i) for i in range(0, 5000, 8))
    assert len(rollup.rtt_ms) == len(rollup.jitter_ms) == len(rollup.loss_pct)
    columns = rollup.columns(THRESHOLDS)
    assert columns["rtt_p50_ms"] == pytest.approx(2499.5, abs=8)
    assert columns["rtt_p95_ms"] == pytest.approx(4749.05, abs=8)
    assert columns["bitrate_mean_kbps"] == 1000.0


def test_a_session_without_samples_has_no_measures_and_no_class():
    columns = QualityRollup().columns(THRESHOLDS)
    assert columns.pop("sample_count") == 0
    assert (columns.pop("quality_class"), columns.pop("quality_reason")) == ("", "")
    assert set(columns.values()) == {None}


def test_no_client_mos_when_no_sample_sent_one():
    columns = _rollup([(80, 5, 0.1, 900, "720p", None)] * 3).columns(THRESHOLDS)
    assert columns["client_mos"] is None
    assert columns["mos_estimate"] == pytest.approx(estimate_mos(80, 5, 0.1))
    assert columns["quality_class"] == "good"


def test_rollup_round_trips_through_json():
    rollup = _rollup(_samples(1000))
    assert QualityRollup.from_json(json.loads(json.dumps(rollup.to_json()))) == rollup
