"""The declarations, the exported JSON Schema files and the ClickHouse DDL agree."""

import json
import re
import typing

import pytest
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

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
    rendered = render_json_schemas()
    assert sorted(rendered) == sorted(f"{t}.v{v}.json" for t, v in EVENT_MODELS)
    for text in rendered.values():
        assert json.loads(text)["additionalProperties"] is False


def _declaration(info: FieldInfo) -> tuple[object, ...]:
    """What a field accepts and how it is named on the wire: type with its constraints and
    validators (strictness among them), required-ness, default, aliases."""
    return (
        info.rebuild_annotation(),
        info.is_required(),
        info.default,
        info.default_factory,
        info.alias,
        info.validation_alias,
        info.serialization_alias,
    )


def _narrows(envelope: FieldInfo, model: FieldInfo) -> bool:
    """Whether ``model`` requires, with the same type and constraints, a field the envelope
    leaves optional (as session events do with session_id)."""
    return (
        not envelope.is_required()
        and envelope.default is None
        and model.is_required()
        and envelope.rebuild_annotation() == model.rebuild_annotation() | None
        and _declaration(envelope)[3:] == _declaration(model)[3:]
    )


@pytest.mark.parametrize(
    ("key", "model"), [pytest.param(k, m, id=f"{k[0]}.v{k[1]}") for k, m in EVENT_MODELS.items()]
)
def test_envelope_fields_come_first_in_every_model(key, model):
    """A model starts with every envelope field, in order, declared as the envelope does."""
    event_type, version = key
    envelope = Envelope.model_fields
    assert list(model.model_fields)[: len(envelope)] == list(envelope)
    for setting in ("extra", "strict", "frozen"):
        assert model.model_config.get(setting) == Envelope.model_config.get(setting), setting
    # the two dispatch fields are pinned to the model's own key in the registry
    assert _declaration(model.model_fields["event_type"])[:3] == (
        typing.Literal[event_type], True, PydanticUndefined
    )  # fmt: skip
    assert _declaration(model.model_fields["schema_version"])[:3] == (
        typing.Literal[version], True, PydanticUndefined
    )  # fmt: skip
    for name, info in envelope.items():
        if name in ("event_type", "schema_version"):
            continue
        declared = model.model_fields[name]
        assert _declaration(declared) == _declaration(info) or _narrows(info, declared), name


def test_schemas_readme_documents_every_reason_and_consent_level():
    """The documented list of reason codes and consent levels is the declared one."""
    readme = (JSONSCHEMA_DIR.parent / "README.md").read_text()
    for code in ReasonCode:
        assert f"| `{code.value}` |" in readme
    for level in Consent:
        assert f"| `{level.value}` |" in readme
