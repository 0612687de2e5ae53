"""Dead letters: what is kept of a refused event, which is only why and where it came from.

Part of the contract: the stream step and the sink both write them, and alerts read them.

A dead letter never holds a value of the event: no content, no raw id, no IP. The event type
and version are kept only when they are declared ones, so even those cannot smuggle text.

``index`` is the refused event's position in its batch (``schemas.batch``), counted from 0,
so that it can be found at the source offset; it is null for a message holding one event and
for a batch refused as a whole.
"""

from typing import Any

import orjson

from schemas.events import EVENT_TYPES
from schemas.reasons import ReasonCode


def dead_letter(
    reason: ReasonCode,
    *,
    field: str | None,
    source_topic: str,
    partition: int,
    offset: int,
    received_ms: int,
    event_type: Any = None,
    index: int | None = None,
) -> bytes:
    """The redacted record sent to the dead-letter topic."""
    record = {
        "reason": reason.value,
        "field": field,
        "event_type": event_type if event_type in EVENT_TYPES else None,
        "source": {"topic": source_topic, "partition": partition, "offset": offset},
        "index": index if type(index) is int else None,
        "received_ms": received_ms,
    }
    return orjson.dumps(record)
