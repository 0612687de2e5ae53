"""Hypothesis strategies derived from the event declarations themselves.

Derived rather than written by hand, so a field added to a declaration is generated at once,
valid (``event_dicts``) and broken (``broken_values``).
"""

import ipaddress
import math
import random
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from schemas.events import ALL_FIELD_NAMES, EARLIEST_MS, EVENT_MODELS, LATEST_MS, Envelope
from tests.profile import IN_CI


def examples(full_count: int, floor: int = 25) -> int:
    """Examples for one property test: the full count in CI, a twentieth on a quick run
    (never fewer than ``floor``)."""
    return full_count if IN_CI else max(floor, full_count // 20)


_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    # from_regex is slow on long repeats ({1,480}, {1,2040}); these build the same languages
    # as the declared patterns from a token and a printable tail, at a tenth of the cost;
    # str(UUID) is exactly the event id pattern (lowercase hex 8-4-4-4-12), drawn 5x faster.
    "event_id": st.uuids(allow_nil=True).map(str),
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


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_ORACLES: Final[dict[str, Callable[[str], bool]]] = {"ip": _is_ip_address}
"""Independent checks for fields whose declaration adds a validator to its pattern; a field
with a validator and no oracle here makes ``broken_values`` refuse to guess."""


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


@cache
def field_strategy(model: type[BaseModel], name: str) -> st.SearchStrategy[Any]:
    """Valid values of one declared field (built once per field: building is costly)."""
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


# ---- broken values: what each declaration refuses ----------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """What one declared field accepts, read from its annotation and metadata."""

    name: str
    base: type  # int, float or str: the JSON type of its values
    choices: tuple[Any, ...] | None  # a closed list (Literal), else None
    bounds: dict[str, Any]  # ge, le, pattern, max_length
    nullable: bool
    required: bool


def field_spec(model: type[BaseModel], name: str) -> FieldSpec:
    """The declaration of ``model.name`` in a form a test can reason about."""
    info = model.model_fields[name]
    annotation: Any = info.annotation
    metadata: list[Any] = list(info.metadata)
    nullable = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *more = get_args(annotation)
            metadata += more
        elif origin in (Union, types.UnionType):
            inner = [a for a in get_args(annotation) if a is not type(None)]
            if len(inner) != 1:
                raise TypeError(f"{name}: a union of several types is not a declared shape")
            nullable = nullable or len(inner) < len(get_args(annotation))
            annotation = inner[0]
        else:
            break
    choices: tuple[Any, ...] | None = None
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            raise TypeError(f"{name}: a closed list mixes types {kinds}")
        annotation = kinds.pop()
    if annotation not in (int, float, str):
        raise TypeError(f"{name}: no JSON type for {annotation!r}")
    if any(isinstance(m, AfterValidator) for m in metadata) and name not in _ORACLES:
        raise TypeError(f"{name} has a validator: add an independent oracle to _ORACLES")
    return FieldSpec(
        name=name,
        base=annotation,
        choices=choices,
        bounds=_bounds(metadata),
        nullable=nullable,
        required=info.is_required(),
    )


def accepts(spec: FieldSpec, value: Any) -> bool:
    """Whether the declaration accepts ``value``, judged independently of pydantic: by
    Python's ``re`` on the declared pattern (full match, anchored or not), the declared
    bounds and closed list, and an oracle for a field with its own validator."""
    if value is None:
        return spec.nullable
    json_types = (int, float) if spec.base is float else (spec.base,)  # 1 is a float too
    if type(value) not in json_types:
        return False
    if spec.choices is not None and value not in spec.choices:
        return False
    b = spec.bounds
    if ("ge" in b and value < b["ge"]) or ("le" in b and value > b["le"]):
        return False
    if spec.base is str:
        if "pattern" in b and not re.fullmatch(b["pattern"], value):
            return False
        if "max_length" in b and len(value) > b["max_length"]:
            return False
        if spec.name in _ORACLES and not _ORACLES[spec.name](value):
            return False
    return True


MISSING: Final = object()
"""Stands for a field left out of the event."""

_NO_SPACE = st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"))
"""Characters that are not whitespace (so a string of them is one word: never taken for
chat text) and that JSON can carry (no lone surrogates)."""
_WORDS = st.text(_NO_SPACE, max_size=24)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _WORDS
)
_CONTAINERS = st.lists(_SCALARS, max_size=3) | st.dictionaries(
    st.sampled_from(sorted(ALL_FIELD_NAMES)), _SCALARS, max_size=3
)
"""Lists and objects that pass the content scan (declared keys, one-word strings), so that
only the field's own check can refuse them."""

_WRONG_TYPES: Final[dict[type, st.SearchStrategy[Any]]] = {
    str: st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _CONTAINERS,
    int: st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)  # 1.0 is not an integer either
    | st.integers(-(10**15), 10**15).map(str)
    | _WORDS
    | _CONTAINERS,
    float: st.booleans() | st.integers(0, 100).map(str) | _WORDS | _CONTAINERS,
}


def _near_misses(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Strings one edit away from valid ones: a character added at either end, one cut, the
    last repeated past any length limit, the case changed; and unrelated words."""
    texts = valid.filter(lambda v: isinstance(v, str))
    return st.one_of(
        st.builds(lambda v, c: v + c, texts, _NO_SPACE),
        st.builds(lambda v, c: c + v, texts, _NO_SPACE),
        texts.map(lambda v: v[:-1]),
        st.builds(lambda v, n: v + (v[-1:] or "x") * n, texts, st.integers(1, 70)),
        texts.map(str.swapcase),
        _WORDS,
    )


@cache
def broken_values(
    model: type[BaseModel], name: str, also_valid: frozenset[Any] = frozenset()
) -> st.SearchStrategy[tuple[str, Any]]:
    """(how, value): a value the declaration of ``model.name`` refuses, and how it breaks
    it: ``wrong_type``, ``null``, ``missing`` (value ``MISSING``), ``out_of_range``,
    ``bad_choice`` (outside a closed list) or ``bad_string`` (outside a pattern). Strings are
    never whitespace, so they cannot be taken for chat text. ``also_valid`` names values
    accepted for another reason (another version of the type, say), never drawn."""
    spec = field_spec(model, name)
    valid = field_strategy(model, name)

    def refused(value: Any) -> bool:
        also = any(type(value) is type(a) and value == a for a in also_valid)
        return not also and not accepts(spec, value)

    ways: list[st.SearchStrategy[tuple[str, Any]]] = [
        _WRONG_TYPES[spec.base].filter(refused).map(lambda v: ("wrong_type", v))
    ]
    if not spec.nullable:
        ways.append(st.just(("null", None)))
    if spec.required:
        ways.append(st.just(("missing", MISSING)))
    if spec.choices is not None:
        if spec.base is int:
            bad: st.SearchStrategy[Any] = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(
                spec.choices
            ).flatmap(lambda c: st.sampled_from([c - 1, c + 1]))
        else:
            bad = _near_misses(valid)
        ways.append(bad.filter(refused).map(lambda v: ("bad_choice", v)))
    elif spec.base is str:
        ways.append(_near_misses(valid).filter(refused).map(lambda v: ("bad_string", v)))
    if "ge" in spec.bounds or "le" in spec.bounds:
        out: list[st.SearchStrategy[Any]] = []
        if "ge" in spec.bounds:  # below ge: integers, and floats up to the next one down
            ge = spec.bounds["ge"]
            out.append(st.integers(-(2**63), math.ceil(ge) - 1))
            if spec.base is float:
                out.append(st.floats(max_value=math.nextafter(ge, -math.inf), allow_infinity=False))
        if "le" in spec.bounds:
            le = spec.bounds["le"]
            out.append(st.integers(math.floor(le) + 1, 2**64 - 1))
            if spec.base is float:
                out.append(st.floats(min_value=math.nextafter(le, math.inf), allow_infinity=False))
        ways.append(st.one_of(out).filter(refused).map(lambda v: ("out_of_range", v)))
    return st.one_of(ways)


# ---- byte-level mutations ----------------------------------------------------------------

_ANY_BYTES: Final = b'{}[]:,"\\ -.+eE_09azAZ17tfn\x00\x7f\x80\xc3\xff'
"""JSON's own punctuation, digits, letters, and a few bytes that are not UTF-8."""
_TOKEN_BYTES: Final = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_.-"
"""Bytes of names, numbers and words: edits with them mostly keep the JSON well formed."""


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """One or two byte-level edits of ``raw``: flip a bit, overwrite, insert or delete bytes,
    or truncate. Most edits land in the first bytes of a JSON value (after a ``:``) and put
    digits into numbers and name bytes into words, so that types, versions, times and values
    are reached, not only the punctuation that makes the JSON; the rest land anywhere with
    any bytes."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 2)):
        colons = [i for i, b in enumerate(data) if b == ord(":")]
        if colons and rng.random() < 0.6:
            pos = rng.choice(colons) + 1
            pos += data[pos : pos + 1] == b'"'  # into a string, past its quote
            pos = min(pos + rng.randrange(rng.randint(1, 14)), len(data))  # mostly early
            # a digit becomes a digit, a letter a letter or digit: the JSON stays well formed
            digit = pos < len(data) and chr(data[pos]).isdigit()
            alphabet = b"0123456789" if digit else _TOKEN_BYTES
        else:
            pos, alphabet = rng.randrange(len(data) + 1), _ANY_BYTES
        kind = rng.choice(["flip", "overwrite", "overwrite", "insert", "delete", "cut"])
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "overwrite" and pos < len(data):
            data[pos] = rng.choice(alphabet)
        elif kind == "insert":
            data[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
        elif kind == "delete":
            del data[pos : pos + rng.randint(1, 3)]
        elif kind == "cut":
            del data[pos:]
    return bytes(data)


def single_byte_edits(raw: bytes) -> Iterator[bytes]:
    """Every edit of one byte of ``raw``: each of its bits flipped, the byte deleted, a digit
    or a letter written over it or put before it, and ``raw`` cut there."""
    for pos in range(len(raw)):
        for bit in range(8):
            yield raw[:pos] + bytes([raw[pos] ^ (1 << bit)]) + raw[pos + 1 :]
        yield raw[:pos] + raw[pos + 1 :]
        for byte in (b"7", b"q"):
            yield raw[:pos] + byte + raw[pos + 1 :]
            yield raw[:pos] + byte + raw[pos:]
        yield raw[:pos]
