"""Compatible evolution: checked over the registry, and the checker itself catches breaks."""

from typing import Annotated, Literal

import orjson
from pydantic import Field

from schemas.enriched import ENRICHED_COLUMNS
from schemas.events import EVENT_MODELS, QualitySampleV1, QualitySampleV2
from schemas.evolution import compatibility_problems, registry_problems
from schemas.examples import EXAMPLES
from schemas.validation import decode_event


def test_the_registry_follows_the_rules():
    """Every declared version only adds optional fields to the one before it."""
    assert registry_problems() == []
    assert compatibility_problems(QualitySampleV1, QualitySampleV2) == []


class RetypesRtt(QualitySampleV1):
    schema_version: Literal[2]  # type: ignore[assignment]
    rtt_ms: Annotated[float, Field(ge=0, le=10)]  # type: ignore[assignment]


class AddsRequired(QualitySampleV1):
    schema_version: Literal[2]  # type: ignore[assignment]
    mos: float


def test_the_checker_catches_a_retyped_field_and_a_new_required_one():
    """Tightening a field's range or adding a required field is reported."""
    assert compatibility_problems(QualitySampleV1, RetypesRtt) == ["RetypesRtt retypes rtt_ms"]
    assert compatibility_problems(QualitySampleV1, AddsRequired) == [
        "AddsRequired adds required field mos"
    ]
    registry = {**EVENT_MODELS, ("quality_sample", 3): AddsRequired}
    assert registry_problems(registry)


def test_the_checker_catches_a_gap_in_versions():
    """Versions of a type run 1..n without gaps."""
    registry = {**EVENT_MODELS, ("quality_sample", 5): QualitySampleV2}
    assert any("not 1..n" in p for p in registry_problems(registry))


def test_old_clients_keep_working():
    """A version 1 quality sample still validates, and the table holds v2's new columns."""
    event = decode_event(orjson.dumps(EXAMPLES["quality_sample"]), received_ms=None)
    assert type(event) is QualitySampleV1
    columns = dict(ENRICHED_COLUMNS["quality_sample"])
    assert columns["mos"] == "Nullable(Float32)" and columns["codec"] == "Nullable(String)"
    newer = {**EXAMPLES["quality_sample"], "schema_version": 2, "mos": 4.1, "codec": "opus"}
    assert type(decode_event(orjson.dumps(newer), received_ms=None)) is QualitySampleV2
