"""The one closed list of reasons an event is rejected.

Shared by the SDKs, the HTTP collector, the stream agents, the dead-letter topic and the
metrics, so that a count of ``content_forbidden`` means the same thing everywhere.
"""

from enum import StrEnum


class ReasonCode(StrEnum):
    """Why an event was refused. Values are stable: dashboards and alerts key on them."""

    TOO_LARGE = "too_large"
    MALFORMED_JSON = "malformed_json"
    CONTENT_FORBIDDEN = "content_forbidden"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_FIELD = "invalid_field"
    CLOCK_SKEW = "clock_skew"
    DUPLICATE = "duplicate"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    PROCESSING_ERROR = "processing_error"
    APP_MISMATCH = "app_mismatch"
    TOO_LATE = "too_late"
    STORAGE_REJECTED = "storage_rejected"


REASON_DESCRIPTIONS: dict[ReasonCode, str] = {
    ReasonCode.TOO_LARGE: (
        "the encoded event is larger than MAX_EVENT_BYTES, or a batch is larger than "
        "MAX_BATCH_BYTES or holds more than MAX_BATCH_EVENTS events"
    ),
    ReasonCode.MALFORMED_JSON: "not UTF-8 JSON, or not a JSON object",
    ReasonCode.CONTENT_FORBIDDEN: (
        "a field outside the allowlist, or a value that looks like free text (chat content); "
        "the value is dropped unseen"
    ),
    ReasonCode.UNKNOWN_EVENT_TYPE: (
        "event_type missing or not one of the declared types, or a batch_type other than "
        "tally.batch"
    ),
    ReasonCode.UNSUPPORTED_VERSION: (
        "schema_version of the type (or of the batch) is not one this build knows"
    ),
    ReasonCode.INVALID_FIELD: "a declared field is missing, of the wrong type or out of range",
    ReasonCode.CLOCK_SKEW: "client_time_ms too far from the time the event was checked",
    ReasonCode.DUPLICATE: "an event id already seen within the deduplication window",
    ReasonCode.CONSENT_WITHDRAWN: "the user's consent level does not allow this event",
    ReasonCode.PROCESSING_ERROR: "a bug in a stage; the event is kept out, the worker goes on",
    ReasonCode.APP_MISMATCH: (
        "the event's app_id is not the app of the request (of its key, or of the request's "
        "first event)"
    ),
    ReasonCode.TOO_LATE: (
        "an event later than TALLY_ALLOWED_LATENESS_S allows: its session was already "
        "summarized, or (by client time) it happened longer ago than that"
    ),
    ReasonCode.STORAGE_REJECTED: (
        "ClickHouse refused the record for good (a type mismatch, a missing table or column); "
        "the rest of its batch was stored"
    ),
}
