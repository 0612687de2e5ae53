"""The collector's edge, without HTTP: read a request body, judge each event, stamp it, and
say what was accepted and why the rest was not.

Pure functions, so every rule (bounds, stamping, refusals) is tested without a server. A
refusal carries a reason code from ``schemas.reasons``, at most a declared field name and the
event's index: never a value of the event, so nothing a client sent is echoed back or logged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from schemas.batch import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    STAMPED_FIELDS,
    encode_batch_objects,
)
from schemas.events import ALL_FIELD_NAMES, MAX_EVENT_BYTES, Envelope
from schemas.reasons import ReasonCode
from schemas.validation import InvalidEvent, parse_json, validate_event_object

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ENVELOPE_ROOM: Final = 1024
"""Bytes kept free in a batch for its envelope (ids, stamps, keys), so a chunk of events
under MAX_BATCH_BYTES minus this always encodes under MAX_BATCH_BYTES."""


class RequestRefusal(StrEnum):
    """Why a whole request was refused (``{"error": code}``): a closed list, as the metrics'
    ``reason`` label. Refusals of single events use ``schemas.reasons.ReasonCode``."""

    UNKNOWN_KEY = "unknown_key"
    """401: no key, or a key that is unknown or revoked."""
    SECRET_KEY_IN_URL = "secret_key_in_url"
    """401: a secret key in the query string, where proxies log it."""
    ORIGIN_FORBIDDEN = "origin_forbidden"
    """403: a write key from an Origin its app did not register (or a preflight from one)."""
    RATE_LIMITED = "rate_limited"
    """429: the key's requests per second are spent."""
    OVERLOADED = "overloaded"
    """503: too many events already wait for Kafka's acknowledgement."""
    TOO_LARGE = ReasonCode.TOO_LARGE.value
    """413: the body (as sent or decoded), or the events in it, over the bound."""
    MALFORMED_JSON = ReasonCode.MALFORMED_JSON.value
    """400: not a JSON array, or not gzip when it says so."""
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    """415: a Content-Encoding other than gzip or identity."""
    KAFKA_UNAVAILABLE = "kafka_unavailable"
    """503: Kafka did not acknowledge in time; nothing of the request was accepted."""


class RequestRefused(Exception):
    """The whole request is refused: ``status`` is the HTTP status, ``reason`` the code. The
    message is the reason code alone, never a byte of the body."""

    def __init__(self, status: int, reason: RequestRefusal | ReasonCode) -> None:
        super().__init__(str(reason))
        self.status = status
        self.reason = str(reason)


@dataclass(frozen=True)
class Refusal:
    """One refused event: its position in the request and why (a field name at most)."""

    index: int
    reason: ReasonCode
    field: str | None = None


@dataclass(frozen=True)
class Judged:
    """What a request's events came to: the accepted ones in request order, the refusals."""

    accepted: tuple[Envelope, ...]
    refused: tuple[Refusal, ...]
    app_id: str | None
    """The app of the batch: the request's app if known, else the first accepted event's."""
    collector_time_ms: int
    ip: str | None
    wire: tuple[Wire, ...]
    """Each accepted event as it goes into its batch, in the order of ``accepted``."""


@dataclass(frozen=True)
class Wire:
    """An accepted event's JSON object as its batch carries it (the stamps left to the
    envelope, nulls left out) and an upper bound of its encoded size. Taken from the
    validated input rather than re-dumped from the model: the models are strict, so the
    values are the ones validated, and a model dump per event is the collector's largest
    cost after validation itself."""

    obj: dict[str, Any]
    size: int


def read_body(raw: bytes, content_encoding: str | None, *, max_bytes: int) -> list[Any]:
    """The JSON array of a request body, gzip-decoded when so declared, at most ``max_bytes``
    both as sent and decoded (a small gzip body may inflate without limit otherwise).

    Raises ``RequestRefused`` and nothing else: 413 ``too_large``, 415 for an encoding other
    than gzip or identity, 400 ``malformed_json`` for a body that is not a JSON array (or not
    gzip when it says so).
    """
    if len(raw) > max_bytes:
        raise RequestRefused(413, ReasonCode.TOO_LARGE)
    if is_gzip(content_encoding):
        raw = _gunzip(raw, max_bytes=max_bytes)
    value = parse_json(raw)
    if not isinstance(value, list):
        raise RequestRefused(400, ReasonCode.MALFORMED_JSON)
    return value


def is_gzip(content_encoding: str | None) -> bool:
    """Whether a body is gzip (else identity); 415 for any other Content-Encoding."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("gzip", "identity"):
        raise RequestRefused(415, RequestRefusal.UNSUPPORTED_ENCODING)
    return encoding == "gzip"


def _gunzip(raw: bytes, *, max_bytes: int) -> bytes:
    """One gzip member decoded, refusing as soon as the output would pass ``max_bytes``."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    refusal: RequestRefused | None = None
    try:
        out = inflater.decompress(raw, max_bytes + 1)
        if len(out) > max_bytes or inflater.unconsumed_tail:
            refusal = RequestRefused(413, ReasonCode.TOO_LARGE)
        elif not inflater.eof:
            refusal = RequestRefused(400, ReasonCode.MALFORMED_JSON)
    except zlib.error:
        refusal = RequestRefused(400, ReasonCode.MALFORMED_JSON)
    if refusal is not None:
        raise refusal  # outside the handler: no context holding the body
    return out


def parse_trusted_proxies(text: str) -> tuple[IpNetwork, ...]:
    """Comma-separated addresses or CIDR networks; raises ValueError naming the bad item's
    position (never needed for secrets: these are infrastructure addresses)."""
    networks: list[IpNetwork] = []
    for position, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"item {position} is not an IP address or network") from None
    return tuple(networks)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_ip(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[IpNetwork]
) -> str | None:
    """The client's address: the socket peer's, or, only when the peer is a trusted proxy,
    the nearest address in ``X-Forwarded-For`` that is not a trusted proxy itself (read from
    the right: the left part is whatever the client claimed). None when unknown or not an IP.
    """
    address = _ip(peer)
    if address is None:
        return None
    if not forwarded_for or not any(address in net for net in trusted):
        return str(address)
    hops = forwarded_for.split(",")
    for hop in reversed(hops):
        hop_address = _ip(hop)
        if hop_address is None:
            return None  # a garbled chain: no address is better than a guessed one
        if not any(hop_address in net for net in trusted):
            return str(hop_address)
    return str(_ip(hops[0]))  # every hop a trusted proxy: the first is the origin


def judge_events(
    items: Sequence[Any],
    *,
    collector_time_ms: int,
    ip: str | None,
    app_id: str | None = None,
    max_events: int,
) -> Judged:
    """Each item stamped with the collector's time and IP (a client's own claims removed),
    then validated exactly as the stream step will, in request order.

    ``app_id`` is the app the request was authorized for (its key's), when known; otherwise
    the first accepted event's app is the request's. An event of another app is refused
    alone (``app_mismatch``, ``app_id``). More than ``max_events`` items: 413 ``too_large``.
    """
    if len(items) > max_events:
        raise RequestRefused(413, ReasonCode.TOO_LARGE)
    accepted: list[Envelope] = []
    wire: list[Wire] = []
    refused: list[Refusal] = []
    stamps = {"collector_time_ms": collector_time_ms} | ({"ip": ip} if ip is not None else {})
    for index, item in enumerate(items):
        try:
            event, bare, size = _judge_one(item, stamps)
            if app_id is None:
                app_id = event.app_id
            if event.app_id != app_id:
                raise InvalidEvent(ReasonCode.APP_MISMATCH, "app_id", event.event_type)
        except InvalidEvent as err:
            refused.append(Refusal(index, err.reason, err.field))
            continue
        except Exception:  # a bug judging one event costs that event; it may quote it
            refused.append(Refusal(index, ReasonCode.PROCESSING_ERROR))
            continue
        accepted.append(event)
        wire.append(Wire(bare, size))
    return Judged(tuple(accepted), tuple(refused), app_id, collector_time_ms, ip, tuple(wire))


def _judge_one(item: Any, stamps: dict[str, Any]) -> tuple[Envelope, dict[str, Any], int]:
    """One event, its JSON object without the stamps and nulls, and its encoded size:
    object, size, then stamped and validated (clock against the stamp). A null is as good
    as an absent field to the models (every nullable field defaults to null)."""
    if not isinstance(item, dict):
        raise InvalidEvent(ReasonCode.MALFORMED_JSON)
    size = _encoded_size(item)
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(ReasonCode.TOO_LARGE)
    bare = {
        k: v
        for k, v in item.items()
        if k not in STAMPED_FIELDS and (v is not None or k not in ALL_FIELD_NAMES)
    }  # an unknown key is kept, even with null, to be refused
    return validate_event_object({**bare, **stamps}, received_ms=None), bare, size


def _encoded_size(obj: dict[str, Any]) -> int:
    """Compact JSON size; more than any bound when it cannot be encoded at all."""
    try:
        return len(orjson.dumps(obj))
    except (orjson.JSONEncodeError, TypeError):
        return MAX_EVENT_BYTES + 1


def partition_key(app_id: str, events: Sequence[Envelope], fallback: str) -> bytes:
    """The Kafka key of a request's batches: sha256 (hex) of the app and the first event's
    session id, else its user id, else ``fallback`` (the request's batch id).

    One client's requests then land on one partition, read in order, while the key never
    shows a raw id in clear to the tools that print keys. It is no pseudonym (an id can be
    guessed back); the stream step keys its output by the keyed HMAC pseudonym.
    """
    first = events[0] if events else None
    if first is not None and first.session_id:
        basis = f"s:{first.session_id}"
    elif first is not None and first.user_id:
        basis = f"u:{first.user_id}"
    else:
        basis = f"b:{fallback}"
    return hashlib.sha256(f"{app_id}\x00{basis}".encode()).hexdigest().encode()


def encode_batches(judged: Judged, *, batch_id: str) -> list[bytes]:
    """The accepted events as consecutive batches, in order, each within MAX_BATCH_EVENTS
    and MAX_BATCH_BYTES; the first batch has ``batch_id``, later ones derived ids."""
    if not judged.accepted or judged.app_id is None:
        return []
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for event in judged.wire:
        if chunks[-1] and (
            len(chunks[-1]) >= MAX_BATCH_EVENTS
            or size + event.size + 1 > MAX_BATCH_BYTES - _ENVELOPE_ROOM
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(event.obj)
        size += event.size + 1
    return [
        encode_batch_objects(
            chunk,
            app_id=judged.app_id,
            collector_time_ms=judged.collector_time_ms,
            ip=judged.ip,
            batch_id=batch_id if n == 0 else _derived_id(batch_id, n),
        )
        for n, chunk in enumerate(chunks)
    ]


def _derived_id(batch_id: str, n: int) -> str:
    """A stable UUID-shaped id for the n-th batch of a request (a retry repeats it)."""
    digest = hashlib.sha256(f"{batch_id}/{n}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


def response_body(judged: Judged) -> dict[str, Any]:
    """The 2xx answer: accepted ids, in request order, and each refusal's index and reason
    (and declared field name, if any): never a value."""
    return {
        "accepted": [event.event_id for event in judged.accepted],
        "refused": [
            {"index": r.index, "reason": r.reason.value} | ({"field": r.field} if r.field else {})
            for r in judged.refused
        ],
    }
