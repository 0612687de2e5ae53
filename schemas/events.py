"""Event declarations: one pydantic model per (event type, schema version).

Each model is the single declaration from which validation (strict, allowlist only), the
exported JSON Schema files, the typed records the agents use and the ClickHouse columns
(``schemas.columns``) are derived. There is no free-text field anywhere: every string is
bounded by a pattern, so chat content has no place to go (privacy statement, "Collection of
Personal Information": TRUECONF does not read or record communications).

Compatible evolution (checked by tests/unit/test_schema_evolution.py): a new version of a
type may only add optional fields; a field name is never reused with another type or removed.
"""

import socket
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

MAX_EVENT_BYTES: Final = 4096
"""Largest accepted encoded event; the biggest valid event is well under 2 KiB."""

EARLIEST_MS: Final = 1_262_304_000_000  # 2010-01-01: older client clocks are broken, not old
LATEST_MS: Final = 4_102_444_800_000  # 2100-01-01


@dataclass(frozen=True)
class CH:
    """ClickHouse column type of a field, kept beside the field so the two cannot drift."""

    type: str


def _pattern(regex: str) -> Any:
    return StringConstraints(pattern=regex)


def _ip_address(value: str) -> str:
    """Check an IPv4 or IPv6 address (inet_pton: 20x cheaper than the ipaddress module); the
    text is kept as sent so that events round-trip."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
            return value
        except OSError:
            continue
    raise ValueError("not an IP address")


# Patterns use only syntax with one meaning in Python's re and Rust's regex (pydantic-core),
# and character classes rather than \d or \w, which are Unicode-wide in Rust.
EventId = Annotated[
    str, _pattern(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"), CH("String")
]
OpaqueId = Annotated[str, _pattern(r"^[A-Za-z0-9_.:-]{1,64}$")]
EpochMs = Annotated[int, Field(ge=EARLIEST_MS, le=LATEST_MS)]
AppId = Annotated[str, _pattern(r"^[a-z][a-z0-9_.-]{0,47}$"), CH("String")]
Version = Annotated[
    str, _pattern(r"^[0-9]{1,5}(\.[0-9]{1,5}){0,3}([-+][0-9A-Za-z.-]{1,24})?$"), CH("String")
]
ShortName = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._()/-]*( [A-Za-z0-9._()/-]+){0,2}$", max_length=32
    ),
    CH("String"),
]
"""A product name such as "Mac OS X" or "Chrome Mobile": at most three words, never text."""
UserAgent = Annotated[str, _pattern(r"^[A-Za-z][A-Za-z0-9._-]{0,31}/[\x20-\x7e]{1,480}$")]
IpText = Annotated[str, _pattern(r"^[0-9A-Fa-f:.]{2,45}$"), AfterValidator(_ip_address)]
Url = Annotated[str, _pattern(r"^https?://[\x21-\x7e]{1,2040}$")]
ErrorCode = Annotated[str, _pattern(r"^[A-Z0-9_]{1,32}$"), CH("String")]

Channel = Literal["stable", "beta", "nightly", "dev"]
ConsentLevel = Literal["full", "anonymous", "none"]


class Envelope(BaseModel):
    """Fields every event carries, before the stream step pseudonymizes and enriches it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: EventId
    event_type: str
    schema_version: int
    client_time_ms: EpochMs
    collector_time_ms: EpochMs | None = None
    """Set by the HTTP collector or the SDK at send time, never by application code."""
    app_id: AppId
    channel: Channel
    software_version: Version
    consent: ConsentLevel
    user_id: OpaqueId | None = None
    session_id: OpaqueId | None = None
    """The chat session (call or conversation), for session and quality events."""
    user_agent: UserAgent | None = None
    os_family: ShortName | None = None
    os_version: Version | None = None
    browser_family: ShortName | None = None
    browser_version: Version | None = None
    ip: IpText | None = None
    """Set only by the HTTP collector from the connection; dropped after the geo lookup."""
    referrer: Url | None = None
    """Cut down to its domain at the stream step; the full URL is never stored."""


LoginFailureReason = Literal[
    "bad_credentials", "unknown_account", "locked", "expired", "mfa_failed", "rate_limited",
    "server_error", "network_error",
]  # fmt: skip


class LoginV1(Envelope):
    """A login attempt, successful or not."""

    event_type: Literal["login"]
    schema_version: Literal[1]
    outcome: Annotated[Literal["success", "failure"], CH("String")]
    failure_reason: Annotated[LoginFailureReason | None, CH("Nullable(String)")] = None
    auth_method: Annotated[Literal["password", "sso", "token", "mfa"], CH("String")]

    @model_validator(mode="after")
    def _failure_reason_iff_failure(self) -> "LoginV1":
        if (self.outcome == "failure") != (self.failure_reason is not None):
            raise ValueError("failure_reason is required for a failure and only then")
        return self


class LogoutV1(Envelope):
    """The user signed out or was signed out."""

    event_type: Literal["logout"]
    schema_version: Literal[1]
    logout_reason: Annotated[Literal["user", "timeout", "forced"], CH("String")]


class SessionStartV1(Envelope):
    """A chat session (call or conversation) began on this client."""

    event_type: Literal["session_start"]
    schema_version: Literal[1]
    session_id: OpaqueId
    session_kind: Annotated[Literal["video", "audio", "text"], CH("String")]
    participants_bucket: Annotated[Literal["2", "3-5", "6-10", "11+"], CH("String")]


class SessionEndV1(Envelope):
    """A chat session ended; ``dropped`` and ``error`` ends feed the drop rate."""

    event_type: Literal["session_end"]
    schema_version: Literal[1]
    session_id: OpaqueId
    end_reason: Annotated[Literal["normal", "dropped", "error"], CH("String")]
    error_code: Annotated[ErrorCode | None, CH("Nullable(String)")] = None
    duration_ms: Annotated[int, Field(ge=0, le=7 * 24 * 3_600_000), CH("UInt32")]


class ClientInfoV1(Envelope):
    """Sent once at client start-up: what the client runs on."""

    event_type: Literal["client_info"]
    schema_version: Literal[1]
    platform: Annotated[Literal["windows", "macos", "linux", "android", "ios", "web"], CH("String")]
    screen_class: Annotated[Literal["small", "medium", "large", "xlarge"], CH("String")]


class QualitySampleV1(Envelope):
    """Call quality measured by the client, periodically during a session."""

    event_type: Literal["quality_sample"]
    schema_version: Literal[1]
    session_id: OpaqueId
    rtt_ms: Annotated[float, Field(ge=0, le=60_000), CH("Float32")]
    jitter_ms: Annotated[float, Field(ge=0, le=60_000), CH("Float32")]
    packet_loss_pct: Annotated[float, Field(ge=0, le=100), CH("Float32")]
    bitrate_kbps: Annotated[float, Field(ge=0, le=1_000_000), CH("Float32")]
    frame_rate: Annotated[float | None, Field(ge=0, le=240), CH("Nullable(Float32)")] = None
    resolution_class: Annotated[
        Literal["audio_only", "240p", "360p", "480p", "720p", "1080p", "1440p", "2160p"] | None,
        CH("Nullable(String)"),
    ] = None
    network_type: Annotated[
        Literal["wifi", "ethernet", "cellular", "other", "unknown"], CH("String")
    ]


class QualitySampleV2(QualitySampleV1):
    """Version 2 adds the client's own call-quality estimate and the codec in use."""

    # A subclass narrows the version literal; mypy reads that as an incompatible override.
    schema_version: Literal[2]  # type: ignore[assignment]
    mos: Annotated[float | None, Field(ge=1, le=5), CH("Nullable(Float32)")] = None
    """Mean opinion score (1-5) as the client's media engine estimates it."""
    codec: Annotated[
        Literal["opus", "vp8", "vp9", "h264", "av1"] | None, CH("Nullable(String)")
    ] = None


EVENT_MODELS: Final[dict[tuple[str, int], type[Envelope]]] = {
    ("login", 1): LoginV1,
    ("logout", 1): LogoutV1,
    ("session_start", 1): SessionStartV1,
    ("session_end", 1): SessionEndV1,
    ("client_info", 1): ClientInfoV1,
    ("quality_sample", 1): QualitySampleV1,
    ("quality_sample", 2): QualitySampleV2,
}
"""Every (event type, schema version) this build accepts. Old versions stay here for good."""

EVENT_TYPES: Final[tuple[str, ...]] = tuple(dict.fromkeys(t for t, _ in EVENT_MODELS))


def latest_model(event_type: str) -> type[Envelope]:
    """The newest declared version of a type: what producers emit."""
    version = max(v for t, v in EVENT_MODELS if t == event_type)
    return EVENT_MODELS[(event_type, version)]


@cache
def specific_fields(model: type[Envelope]) -> tuple[str, ...]:
    """Fields a type adds to the envelope, in declaration order."""
    return tuple(name for name in model.model_fields if name not in Envelope.model_fields)


ALL_FIELD_NAMES: Final[frozenset[str]] = frozenset(
    name for model in EVENT_MODELS.values() for name in model.model_fields
)
