"""Call quality of one session, rolled up from its quality samples: percentiles, an estimated
MOS and a good/fair/poor class. Pure, and small enough to live in a changelogged table.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from schemas.summaries import QualityClass, QualityReason

MAX_KEPT_SAMPLES: Final = 720
"""Raw values kept per metric: two hours of samples at one per 10 s. Percentiles are exact up
to this many samples and approximate past it (``QualityRollup``)."""

_MEASURES: Final = (
    "rtt_p50_ms", "rtt_p95_ms", "jitter_p50_ms", "jitter_p95_ms", "loss_p50_pct",
    "loss_p95_pct", "bitrate_mean_kbps", "worst_resolution", "mos_estimate", "client_mos",
)  # fmt: skip
"""Summary columns that are null for a session without samples."""

RESOLUTIONS_WORST_FIRST: Final[tuple[str, ...]] = (
    "audio_only", "240p", "360p", "480p", "720p", "1080p", "1440p", "2160p",
)  # fmt: skip

_D = TypeVar("_D")


def evolve(instance: _D, **changes: Any) -> _D:
    """``dataclasses.replace`` without a call to ``__init__``: several times cheaper, which
    counts at one call per quality sample. Only for dataclasses whose ``__init__`` checks
    nothing (no ``__post_init__``)."""
    copy = object.__new__(type(instance))
    copy.__dict__.update(instance.__dict__)
    copy.__dict__.update(changes)
    return copy


@dataclass(frozen=True)
class QualityThresholds:
    """Limits on a session's 95th percentiles; past a ``poor_`` one it is poor, else past a
    ``fair_`` one it is fair (``TALLY_QUALITY_*``)."""

    poor_rtt_ms: float
    poor_jitter_ms: float
    poor_loss_pct: float
    fair_rtt_ms: float
    fair_jitter_ms: float
    fair_loss_pct: float

    def __post_init__(self) -> None:
        for metric in ("rtt_ms", "jitter_ms", "loss_pct"):
            if not getattr(self, f"fair_{metric}") <= getattr(self, f"poor_{metric}"):
                raise ValueError(f"fair_{metric} must not pass poor_{metric}")


def r_factor_to_mos(r_factor: float) -> float:
    """MOS from the E-model's transmission rating R (ITU-T G.107, Annex B).

    The cubic dips just under 1 for R below about 6.5; clamping to [1, 4.5] keeps the
    result monotone in R.
    """
    if r_factor <= 0:
        return 1.0
    if r_factor >= 100:
        return 4.5
    mos = 1 + 0.035 * r_factor + r_factor * (r_factor - 60) * (100 - r_factor) * 7e-6
    return min(4.5, max(1.0, mos))


def estimate_mos(rtt_ms: float, jitter_ms: float, loss_pct: float) -> float:
    """Estimated mean opinion score (1 to 4.5) of a call from network measurements alone.

    The E-model of ITU-T G.107 in its common simplification for network monitoring: the
    default rating R0 - Is = 93.2 (G.107's default parameters), less a delay impairment Id
    from an effective latency d = rtt/2 + 2 * jitter + 10 ms (one-way delay, with jitter
    counted twice as the jitter buffer's cost, and 10 ms for the codec), taken as d/40 up to
    160 ms and (d - 120)/10 past it, and less a loss impairment Ie of 2.5 per percent lost;
    then MOS from R by G.107's formula. It ignores codec, echo and loss burstiness, so it
    compares sessions with each other rather than predicting what a user would rate.
    """
    latency_ms = rtt_ms / 2 + 2 * jitter_ms + 10
    delay_impairment = latency_ms / 40 if latency_ms < 160 else (latency_ms - 120) / 10
    loss_impairment = 2.5 * loss_pct
    return r_factor_to_mos(93.2 - delay_impairment - loss_impairment)


def classify_quality(
    p95_rtt_ms: float, p95_jitter_ms: float, p95_loss_pct: float, thresholds: QualityThresholds
) -> tuple[QualityClass, QualityReason]:
    """``poor`` when a 95th percentile passes (is above) its poor limit, else ``fair`` when
    one passes its fair limit, else ``good``; with the metric that decided it, the first of
    rtt, jitter, loss at the worse class ('' when good)."""
    measured: tuple[tuple[QualityReason, float, float, float], ...] = (
        ("rtt", p95_rtt_ms, thresholds.poor_rtt_ms, thresholds.fair_rtt_ms),
        ("jitter", p95_jitter_ms, thresholds.poor_jitter_ms, thresholds.fair_jitter_ms),
        ("loss", p95_loss_pct, thresholds.poor_loss_pct, thresholds.fair_loss_pct),
    )
    for metric, value, poor_limit, _ in measured:
        if value > poor_limit:
            return "poor", metric
    for metric, value, _, fair_limit in measured:
        if value > fair_limit:
            return "fair", metric
    return "good", ""


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by linear interpolation between closest ranks (Hyndman and
    Fan's type 7, numpy's default): order-independent, and exact at the sample's values."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


@dataclass(frozen=True)
class QualityRollup:
    """The quality samples of one session so far.

    Means (bitrate, estimated and client MOS) are exact running sums. For percentiles the
    raw RTT, jitter and loss are kept while there are at most ``MAX_KEPT_SAMPLES``, which
    makes them exact; past that, every other kept sample is dropped and from then on only
    every ``stride``-th arriving sample is kept (stride doubling at each decimation), so
    the kept values are a systematic sample, in arrival order, of between half the cap and
    the cap. Percentiles of a long call are then those of that sample: close, except for
    quality that varies with a period matching the stride. Deterministic, so a replay of
    the same events yields the same summary.
    """

    count: int = 0
    stride: int = 1
    rtt_ms: tuple[float, ...] = ()
    jitter_ms: tuple[float, ...] = ()
    loss_pct: tuple[float, ...] = ()
    bitrate_sum_kbps: float = 0.0
    mos_estimate_sum: float = 0.0
    client_mos_sum: float = 0.0
    client_mos_count: int = 0
    worst_resolution: str | None = None

    def with_sample(
        self,
        rtt_ms: float,
        jitter_ms: float,
        loss_pct: float,
        bitrate_kbps: float,
        resolution_class: str | None = None,
        client_mos: float | None = None,
    ) -> "QualityRollup":
        """A new rollup with one more sample (self is left as it was)."""
        rtts, jitters, losses, stride = self.rtt_ms, self.jitter_ms, self.loss_pct, self.stride
        if self.count % stride == 0:
            rtts, jitters, losses = (*rtts, rtt_ms), (*jitters, jitter_ms), (*losses, loss_pct)
            if len(rtts) > MAX_KEPT_SAMPLES:
                rtts, jitters, losses, stride = rtts[::2], jitters[::2], losses[::2], stride * 2
        worst = self.worst_resolution
        if resolution_class is not None and (
            worst is None
            or RESOLUTIONS_WORST_FIRST.index(resolution_class)
            < RESOLUTIONS_WORST_FIRST.index(worst)
        ):
            worst = resolution_class
        return evolve(
            self,
            count=self.count + 1,
            stride=stride,
            rtt_ms=rtts,
            jitter_ms=jitters,
            loss_pct=losses,
            bitrate_sum_kbps=self.bitrate_sum_kbps + bitrate_kbps,
            mos_estimate_sum=self.mos_estimate_sum + estimate_mos(rtt_ms, jitter_ms, loss_pct),
            client_mos_sum=self.client_mos_sum + (client_mos or 0.0),
            client_mos_count=self.client_mos_count + (client_mos is not None),
            worst_resolution=worst,
        )

    def columns(self, thresholds: QualityThresholds) -> dict[str, Any]:
        """The quality columns of a session summary. Without samples every measure is null
        and the class is '' (unknown: a session that sent nothing is neither good nor bad)."""
        if self.count == 0:
            return {
                "sample_count": 0,
                **dict.fromkeys(_MEASURES),
                "quality_class": "",
                "quality_reason": "",
            }
        rtt_p95 = percentile(self.rtt_ms, 0.95)
        jitter_p95 = percentile(self.jitter_ms, 0.95)
        loss_p95 = percentile(self.loss_pct, 0.95)
        quality_class, quality_reason = classify_quality(rtt_p95, jitter_p95, loss_p95, thresholds)
        return {
            "sample_count": self.count,
            "rtt_p50_ms": percentile(self.rtt_ms, 0.5),
            "rtt_p95_ms": rtt_p95,
            "jitter_p50_ms": percentile(self.jitter_ms, 0.5),
            "jitter_p95_ms": jitter_p95,
            "loss_p50_pct": percentile(self.loss_pct, 0.5),
            "loss_p95_pct": loss_p95,
            "bitrate_mean_kbps": self.bitrate_sum_kbps / self.count,
            "worst_resolution": self.worst_resolution,
            "mos_estimate": min(4.5, max(1.0, self.mos_estimate_sum / self.count)),
            "client_mos": (
                min(5.0, max(1.0, self.client_mos_sum / self.client_mos_count))
                if self.client_mos_count
                else None
            ),
            "quality_class": quality_class,
            "quality_reason": quality_reason,
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict (lists for the kept values)."""
        return {
            "count": self.count,
            "stride": self.stride,
            "rtt_ms": list(self.rtt_ms),
            "jitter_ms": list(self.jitter_ms),
            "loss_pct": list(self.loss_pct),
            "bitrate_sum_kbps": self.bitrate_sum_kbps,
            "mos_estimate_sum": self.mos_estimate_sum,
            "client_mos_sum": self.client_mos_sum,
            "client_mos_count": self.client_mos_count,
            "worst_resolution": self.worst_resolution,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "QualityRollup":
        return cls(
            count=int(data["count"]),
            stride=int(data["stride"]),
            rtt_ms=tuple(float(v) for v in data["rtt_ms"]),
            jitter_ms=tuple(float(v) for v in data["jitter_ms"]),
            loss_pct=tuple(float(v) for v in data["loss_pct"]),
            bitrate_sum_kbps=float(data["bitrate_sum_kbps"]),
            mos_estimate_sum=float(data["mos_estimate_sum"]),
            client_mos_sum=float(data["client_mos_sum"]),
            client_mos_count=int(data["client_mos_count"]),
            worst_resolution=data["worst_resolution"],
        )
