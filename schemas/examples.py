"""One valid example payload per event type: documentation for SDK authors and test fixtures."""

from typing import Any, Final

_ENVELOPE: Final[dict[str, Any]] = {
    "schema_version": 1,
    "client_time_ms": 1_764_300_000_000,
    "collector_time_ms": 1_764_300_000_250,
    "app_id": "conferendo.desktop",
    "channel": "stable",
    "software_version": "4.2.1",
    "consent": "full",
    "user_id": "u-000042",
    "user_agent": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
    ),
    "ip": "81.2.69.160",
    "referrer": "https://www.example.org/blog/post?id=7",
}

EXAMPLES: Final[dict[str, dict[str, Any]]] = {
    "login": {
        **_ENVELOPE, "event_id": "6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8a01", "event_type": "login",
        "outcome": "failure", "failure_reason": "bad_credentials", "auth_method": "password",
    },
    "logout": {
        **_ENVELOPE, "event_id": "6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8a02", "event_type": "logout",
        "logout_reason": "user",
    },
    "session_start": {
        **_ENVELOPE, "event_id": "6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8a03",
        "event_type": "session_start", "session_id": "s-9001", "session_kind": "video",
        "participants_bucket": "3-5",
    },
    "session_end": {
        **_ENVELOPE, "event_id": "6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8a04",
        "event_type": "session_end", "session_id": "s-9001", "end_reason": "dropped",
        "error_code": "ICE_TIMEOUT", "duration_ms": 754_000,
    },
    "client_info": {
        **_ENVELOPE, "event_id": "6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8a05",
        "event_type": "client_info", "platform": "windows", "screen_class": "large",
    },
    "quality_sample": {
        **_ENVELOPE, "event_id": "6f1c2c0e-8a8b-4f55-9d55-0c1a3e9d8a06",
        "event_type": "quality_sample", "session_id": "s-9001", "rtt_ms": 84.5,
        "jitter_ms": 6.25, "packet_loss_pct": 0.8, "bitrate_kbps": 1450.0, "frame_rate": 29.97,
        "resolution_class": "720p", "network_type": "wifi",
    },
}  # fmt: skip
