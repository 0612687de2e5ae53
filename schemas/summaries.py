"""Records the stream step derives from events, declared like the events themselves.

They are output only: not in ``EVENT_MODELS``, so a client sending one is refused as
``unknown_event_type`` (or ``content_forbidden`` for its fields). Each becomes one row of its
own table through ``schemas.enriched.ENRICHED_COLUMNS``, with no special case in the sink.
"""

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.events import CH, AppId, Channel, ConsentLevel, EventId, Version

SessionPseudonym = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$"), CH("String")]
"""A session is only summarized under a pseudonym: consent ``none`` keeps none."""
UserPseudonym = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$"), CH("String")]
Text = Annotated[str, StringConstraints(max_length=64), CH("String")]
EpochSeconds = Annotated[int, Field(ge=0), CH("DateTime('UTC')")]
Percentile = Annotated[float | None, Field(ge=0), CH("Nullable(Float32)")]
"""Null when the session had no quality sample."""
DurationMs = Annotated[int | None, Field(ge=0, le=2**32 - 1), CH("Nullable(UInt32)")]

SessionEndReason = Literal["normal", "dropped", "error", "timeout"]
QualityClass = Literal["good", "fair", "poor", ""]
"""'' when the session had no quality sample: unknown, not good."""
QualityReason = Literal["rtt", "jitter", "loss", ""]
"""The metric that made a session ``poor`` or ``fair``; '' when ``good`` or unknown."""


class SessionSummaryV1(BaseModel):
    """One chat session, paired and rolled up by the stream step when it closes.

    ``event_id`` is a UUIDv5 of the session pseudonym, so a summary re-emitted after a crash
    collapses into the same row. ``event_time`` is the start's client time (else the
    earliest client time seen); ``received_time`` is when the session closed.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: EventId
    event_type: Annotated[Literal["session_summary"], CH("String")]
    schema_version: Annotated[Literal[1], CH("UInt16")]
    event_time: EpochSeconds
    received_time: EpochSeconds
    app_id: AppId
    channel: Annotated[Channel, CH("String")]
    software_version: Version
    consent: Annotated[ConsentLevel, CH("String")]
    key_id: Text
    session_pseudonym: SessionPseudonym
    user_pseudonym: UserPseudonym
    browser_family: Text
    os_family: Text
    device_class: Text
    country_code: Text
    session_kind: Annotated[Literal["video", "audio", "text"] | None, CH("Nullable(String)")]
    """Null when the session's start never came."""
    participants_bucket: Annotated[
        Literal["2", "3-5", "6-10", "11+"] | None, CH("Nullable(String)")
    ]
    end_reason: Annotated[SessionEndReason, CH("String")]
    """The client's, or ``timeout`` when the session went silent without an end."""
    server_duration_ms: DurationMs
    """Arrival of the start to arrival of the end (to the last event, for a timeout); null
    without a start, or when the start arrived after the end."""
    client_duration_ms: DurationMs
    """The end's own ``duration_ms``; null without an end."""
    sample_count: Annotated[int, Field(ge=0, le=2**32 - 1), CH("UInt32")]
    rtt_p50_ms: Percentile
    rtt_p95_ms: Percentile
    jitter_p50_ms: Percentile
    jitter_p95_ms: Percentile
    loss_p50_pct: Percentile
    loss_p95_pct: Percentile
    bitrate_mean_kbps: Percentile
    worst_resolution: Annotated[
        Literal["audio_only", "240p", "360p", "480p", "720p", "1080p", "1440p", "2160p"] | None,
        CH("Nullable(String)"),
    ]
    """The lowest resolution class any sample reported; null when none reported one."""
    mos_estimate: Annotated[float | None, Field(ge=1, le=4.5), CH("Nullable(Float32)")]
    """Mean over the samples of the simplified ITU-T G.107 E-model estimate."""
    client_mos: Annotated[float | None, Field(ge=1, le=5), CH("Nullable(Float32)")]
    """Mean of the clients' own ``mos`` (quality_sample v2); null when no sample sent one."""
    quality_class: Annotated[QualityClass, CH("String")]
    quality_reason: Annotated[QualityReason, CH("String")]


OUTPUT_MODELS: Final[dict[str, type[BaseModel]]] = {"session_summary": SessionSummaryV1}
"""Every derived record type, by ``event_type``: one table each, never accepted from a client."""
