"""Session events as a client sends them, for the stream tests that follow calls."""

import uuid

from schemas.events import EVENT_MODELS, Envelope
from schemas.examples import EXAMPLES


def session_event(event_type: str, session: str, client_time_ms: int) -> Envelope:
    """One event of ``session`` (its user ``u-<session>``), with a fresh event id and without
    the collector's stamps; an end says ``normal``."""
    fields = {
        **EXAMPLES[event_type],
        "event_id": str(uuid.uuid4()),
        "user_id": f"u-{session}",
        "session_id": session,
        "client_time_ms": client_time_ms,
    }
    for stamp in ("ip", "collector_time_ms"):
        fields.pop(stamp, None)
    if event_type == "session_end":
        fields["end_reason"] = "normal"
    return EVENT_MODELS[(event_type, fields["schema_version"])].model_validate(fields)
