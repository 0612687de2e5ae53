"""The rules of compatible schema evolution, as a check that tests run over the registry.

A new version of an event type may only add optional fields. A field is never removed,
retyped or re-constrained, and a field name means one thing across all types, so an old
client's events keep validating and every ClickHouse column keeps one meaning.
"""

from collections import defaultdict
from collections.abc import Mapping
from itertools import pairwise

from schemas.events import EVENT_MODELS, Envelope

_PER_TYPE = frozenset({"event_type", "schema_version"})


def _shape(model: type[Envelope], name: str) -> tuple[object, ...]:
    field = model.model_fields[name]
    return (field.annotation, tuple(map(repr, field.metadata)))


def compatibility_problems(older: type[Envelope], newer: type[Envelope]) -> list[str]:
    """What makes ``newer`` an incompatible successor of ``older`` (empty: compatible)."""
    problems = []
    for name in older.model_fields:
        if name in _PER_TYPE:
            continue
        if name not in newer.model_fields:
            problems.append(f"{newer.__name__} removes {name}")
        elif _shape(newer, name) != _shape(older, name):
            problems.append(f"{newer.__name__} retypes {name}")
        elif newer.model_fields[name].is_required() and not older.model_fields[name].is_required():
            problems.append(f"{newer.__name__} makes {name} required")
    for name in newer.model_fields.keys() - older.model_fields.keys():
        if newer.model_fields[name].is_required():
            problems.append(f"{newer.__name__} adds required field {name}")
    return problems


def registry_problems(
    models: Mapping[tuple[str, int], type[Envelope]] = EVENT_MODELS,
) -> list[str]:
    """Every evolution rule broken anywhere in a registry of (type, version) -> model."""
    problems: list[str] = []
    by_type: dict[str, list[int]] = defaultdict(list)
    for event_type, version in models:
        by_type[event_type].append(version)
    for event_type, versions in by_type.items():
        versions.sort()
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"{event_type} versions are not 1..n: {versions}")
        for old, new in pairwise(versions):
            problems += compatibility_problems(models[(event_type, old)], models[(event_type, new)])
    shapes: dict[str, tuple[object, ...]] = {}
    for model in models.values():
        for name, field in model.model_fields.items():
            if name in _PER_TYPE or name == "session_id":
                continue  # session_id is optional in the envelope, required by some types
            shape = (field.annotation, tuple(map(repr, field.metadata)))
            if shapes.setdefault(name, shape) != shape:
                problems.append(f"{model.__name__}.{name} differs from another type's {name}")
    return problems
