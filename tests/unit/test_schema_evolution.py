"""Compatible evolution: each version of a type only adds optional fields to the previous one,
and no field name means two things anywhere."""

import itertools
from collections import defaultdict

from schemas.events import EVENT_MODELS, Envelope


def _versions() -> dict[str, list[type[Envelope]]]:
    by_type: dict[str, list[type[Envelope]]] = defaultdict(list)
    for (event_type, _), model in sorted(EVENT_MODELS.items()):
        by_type[event_type].append(model)
    return by_type


def test_versions_are_consecutive_from_one():
    """Versions of a type run 1, 2, 3... without gaps."""
    for event_type, models in _versions().items():
        versions = sorted(v for t, v in EVENT_MODELS if t == event_type)
        assert versions == list(range(1, len(models) + 1))


def test_each_version_only_adds_optional_fields():
    """A later version keeps every field of the one before, with the same type, and any
    field it adds is optional, so old clients keep validating."""
    for models in _versions().values():
        for older, newer in itertools.pairwise(models):
            for name, field in older.model_fields.items():
                if name in ("schema_version",):
                    continue
                assert name in newer.model_fields, f"{newer.__name__} drops {name}"
                assert newer.model_fields[name].annotation == field.annotation
            for name in set(newer.model_fields) - set(older.model_fields):
                assert not newer.model_fields[name].is_required(), f"{name} must be optional"


def test_a_field_name_has_one_type_everywhere():
    """No field name is reused with another type across event types and versions."""
    seen: dict[str, object] = {}
    for model in EVENT_MODELS.values():
        for name, field in model.model_fields.items():
            if name in ("event_type", "schema_version", "session_id"):
                continue  # literals per type; session_id is required where a type needs it
            assert seen.setdefault(name, field.annotation) == field.annotation, name
