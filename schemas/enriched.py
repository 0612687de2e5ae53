"""The enriched event: what leaves the stream step, travels on the enriched topic and becomes
one ClickHouse row. It holds no raw id, no IP, no user agent and no full URL by construction.

Records the stream step derives (``schemas.summaries``) travel and are stored the same way,
with the columns of their own declaration.
"""

from functools import cache
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.events import CH, EVENT_MODELS, EVENT_TYPES, specific_fields
from schemas.summaries import OUTPUT_MODELS

Pseudonym = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$"), CH("String")]
"""Hex HMAC-SHA256, or '' where consent keeps no id."""
Text = Annotated[str, StringConstraints(max_length=64), CH("String")]
EpochSeconds = Annotated[int, Field(ge=0), CH("DateTime('UTC')")]


class EnrichedEnvelope(BaseModel):
    """Common columns of every enriched event. Type-specific fields follow them unchanged."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    event_id: Annotated[str, CH("String")]
    event_type: Annotated[str, CH("String")]
    schema_version: Annotated[int, CH("UInt16")]
    event_time: EpochSeconds
    """Client time, in seconds: when it happened as the user saw it."""
    received_time: EpochSeconds
    """Collector or Kafka time: when it reached Tally."""
    app_id: Text
    channel: Text
    software_version: Text
    consent: Text
    key_id: Text
    """Which HMAC key made the pseudonyms; destroying that key unlinks them for good."""
    user_pseudonym: Pseudonym
    session_pseudonym: Pseudonym
    browser_family: Text
    browser_version: Text
    os_family: Text
    os_version: Text
    device_class: Text
    country_code: Text
    region_code: Text
    referrer_domain: Annotated[str, StringConstraints(max_length=253), CH("String")]


def _clickhouse_type(model: type[BaseModel], name: str) -> str:
    markers = [m for m in model.model_fields[name].metadata if isinstance(m, CH)]
    if len(markers) != 1:
        raise TypeError(f"{model.__name__}.{name} declares no ClickHouse type")
    return markers[0].type


def _columns_of(event_type: str) -> tuple[tuple[str, str], ...]:
    columns = {n: _clickhouse_type(EnrichedEnvelope, n) for n in EnrichedEnvelope.model_fields}
    for (etype, _), model in sorted(EVENT_MODELS.items()):
        if etype == event_type:
            for name in specific_fields(model):
                columns.setdefault(name, _clickhouse_type(model, name))
    return tuple(columns.items())


ENRICHED_COLUMNS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    **{t: _columns_of(t) for t in EVENT_TYPES},
    **{
        t: tuple((n, _clickhouse_type(m, n)) for n in m.model_fields)
        for t, m in OUTPUT_MODELS.items()
    },
}
"""(column, ClickHouse type) per event type: envelope columns, then the type's own fields
across all its versions (later versions only add optional fields); a derived record's are
its declaration's fields."""


def table_name(event_type: str) -> str:
    """The ClickHouse table that holds one event type."""
    return f"{event_type}_events"


@cache
def enriched_fields(event_type: str) -> tuple[str, ...]:
    """Column names of a type's table, in order: the keys of its enriched record."""
    return tuple(name for name, _ in ENRICHED_COLUMNS[event_type])


def check_enriched(record: dict[str, Any]) -> None:
    """Raise if a stream output record does not have exactly its type's columns."""
    expected = enriched_fields(record["event_type"])
    if tuple(record) != expected:
        raise ValueError(f"enriched {record['event_type']} has fields out of contract")
    derived = OUTPUT_MODELS.get(record["event_type"])
    if derived is not None:
        derived.model_validate(record)
    else:
        EnrichedEnvelope.model_validate({k: record[k] for k in EnrichedEnvelope.model_fields})
