"""The declarations, the exported JSON Schema files and the ClickHouse DDL agree."""

import json
import re
import typing

import pytest

from schemas.consent import Consent
from schemas.enriched import ENRICHED_COLUMNS, EnrichedEnvelope, table_name
from schemas.events import EVENT_MODELS, ConsentLevel, Envelope, specific_fields
from schemas.export import JSONSCHEMA_DIR, render_json_schemas
from schemas.reasons import REASON_DESCRIPTIONS, ReasonCode
from sinks.migrations import event_table_ddl


def test_exported_json_schemas_are_current():
    """The committed JSON Schema files are exactly what the declarations render."""
    rendered = render_json_schemas()
    committed = {p.name: p.read_text() for p in JSONSCHEMA_DIR.glob("*.json")}
    assert committed == rendered, "run: python -m schemas.export"


@pytest.mark.parametrize("event_type", sorted({t for t, _ in EVENT_MODELS}))
def test_ddl_has_exactly_the_declared_columns(event_type):
    """Each table's DDL names the enriched envelope, then the type's own fields, in order."""
    ddl = event_table_ddl(event_type)
    assert ddl.startswith(f"CREATE TABLE IF NOT EXISTS {table_name(event_type)} (")
    body = ddl[ddl.index("(") + 1 : ddl.index("\n)")]
    declared = [line.strip().rstrip(",").split(" ", 1) for line in body.strip().splitlines()]
    expected = list(EnrichedEnvelope.model_fields)
    for (etype, _), model in sorted(EVENT_MODELS.items()):
        if etype == event_type:
            expected += [f for f in specific_fields(model) if f not in expected]
    assert [name for name, _ in declared] == expected
    assert [tuple(c) for c in declared] == list(ENRICHED_COLUMNS[event_type])


def test_no_field_is_free_text():
    """Every string field of every event is bounded by a pattern or a closed list."""
    for model in EVENT_MODELS.values():
        schema = model.model_json_schema()
        for name, prop in schema["properties"].items():
            variants = prop.get("anyOf", [prop])
            for v in variants:
                if v.get("type") == "string":
                    assert "pattern" in v or "enum" in v or "const" in v, f"{name} is free text"


def test_consent_levels_are_declared_once():
    """The schema's consent literal and the Consent enum are the same three levels."""
    assert set(typing.get_args(ConsentLevel)) == {c.value for c in Consent}


def test_every_reason_code_is_documented():
    """The closed list of reasons has a description for each code."""
    assert set(REASON_DESCRIPTIONS) == set(ReasonCode)
    assert all(re.fullmatch(r"[a-z_]+", r.value) for r in ReasonCode)


def test_json_schema_forbids_unknown_fields():
    """SDK authors see the allowlist: additionalProperties is false in every file."""
    for text in render_json_schemas().values():
        assert json.loads(text)["additionalProperties"] is False


def test_envelope_fields_come_first_in_every_model():
    """Types only add to the envelope; they never drop one of its fields."""
    for model in EVENT_MODELS.values():
        assert set(Envelope.model_fields) <= set(model.model_fields)


def test_schemas_readme_documents_every_reason_and_consent_level():
    """The documented list of reason codes and consent levels is the declared one."""
    readme = (JSONSCHEMA_DIR.parent / "README.md").read_text()
    for code in ReasonCode:
        assert f"| `{code.value}` |" in readme
    for level in Consent:
        assert f"| `{level.value}` |" in readme
