"""Hypothesis strategies derived from the event declarations themselves.

Derived rather than written by hand, so a field added to a declaration is generated at once.
"""

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from schemas.events import EARLIEST_MS, EVENT_MODELS, LATEST_MS, Envelope
from tests.profile import IN_CI


def examples(full_count: int) -> int:
    """Examples for one property test: the full count in CI, a twentieth on a quick run."""
    return full_count if IN_CI else max(25, full_count // 20)


_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    # from_regex is slow on long repeats ({1,480}, {1,2040}); these build the same languages
    # as the declared patterns from a token and a printable tail, at a tenth of the cost.
    "ip": st.ip_addresses().map(str),
    "user_agent": st.builds(
        "{}/{}".format,
        st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,31}", fullmatch=True),
        st.text(_PRINTABLE, min_size=1, max_size=480),
    ),
    "referrer": st.builds(
        "{}://{}".format,
        st.sampled_from(["http", "https"]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=2040),
    ),
}


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, FieldInfo):
            out.update(_bounds(m.metadata))
        for name in ("ge", "le", "pattern", "max_length"):
            value = getattr(m, name, None)
            if value is not None:
                out[name] = value
    return out


def _for_type(annotation: Any, metadata: list[Any], name: str) -> st.SearchStrategy[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *more = get_args(annotation)
        return _for_type(base, [*metadata, *more], name)
    if origin is Literal:
        return st.sampled_from(get_args(annotation))
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return st.one_of(*(_for_type(a, metadata, name) for a in inner))
    bounds = _bounds(metadata)
    if name in _BY_NAME:
        return _BY_NAME[name]
    if annotation is int:
        return st.integers(bounds.get("ge", 0), bounds.get("le", 2**31))
    if annotation is float:
        return st.floats(bounds.get("ge", 0.0), bounds.get("le", 1e6), allow_nan=False)
    if annotation is str:
        strategy = st.from_regex(bounds["pattern"], fullmatch=True)
        if "max_length" in bounds:
            strategy = strategy.filter(lambda s: len(s) <= bounds["max_length"])
        return strategy
    raise TypeError(f"no strategy for {name}: {annotation!r}")


def field_strategy(model: type[BaseModel], name: str) -> st.SearchStrategy[Any]:
    """Valid values of one declared field."""
    info = model.model_fields[name]
    return _for_type(info.annotation, list(info.metadata), name)


@st.composite
def event_dicts(draw: st.DrawFn, model: type[Envelope] | None = None) -> dict[str, Any]:
    """A valid event as a JSON-ready dict; optional fields present or absent."""
    if model is None:
        model = draw(st.sampled_from(list(EVENT_MODELS.values())))
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if not info.is_required() and draw(st.booleans()):
            continue
        out[name] = draw(field_strategy(model, name))
    if out.get("outcome") == "failure":
        out["failure_reason"] = draw(field_strategy(model, "failure_reason").filter(bool))
    elif "outcome" in out:
        out.pop("failure_reason", None)
    # a clock skew check is part of validity: put the receipt beside the client's clock
    out["client_time_ms"] = draw(st.integers(EARLIEST_MS + 10**10, LATEST_MS - 10**10))
    if "collector_time_ms" in out:
        out["collector_time_ms"] = out["client_time_ms"] + draw(st.integers(-(10**5), 10**8))
    return out


def valid_events() -> st.SearchStrategy[Envelope]:
    return event_dicts().map(
        lambda d: EVENT_MODELS[(d["event_type"], d["schema_version"])].model_validate(d)
    )
