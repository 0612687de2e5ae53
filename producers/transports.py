"""How the SDK's sender thread delivers spooled events: the ``Transport`` seam, Kafka and HTTP.

The SDK owns everything the transports share (consent, validation, the spool, ordering,
retries with backoff, counting); a transport only sends one batch and says, per record,
whether it is confirmed. Kafka is for services inside the data centre; HTTP to the collector
is for desktop apps, and uses the standard library alone (it is linked into those apps).
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import gzip
import http.client
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from kafka import KafkaProducer
from kafka.errors import (
    CorruptRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from kafka.net.compat import KafkaNetClient

from producers.spool import Record

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What became of one record in a batch."""

    DELIVERED = "delivered"
    """Confirmed: acknowledged by all in-sync replicas (Kafka ``acks=all``), or a 2xx."""
    RETRY = "retry"
    """Not confirmed (unreachable, timed out, 5xx, 429): it stays spooled and is sent again
    after a backoff; it may have arrived, so the event id makes the re-send harmless."""
    REJECTED = "rejected"
    """Refused for good (too large, a 4xx no retry can fix): dropped from the spool and
    counted, so one bad record never blocks those behind it."""


class Transport(Protocol):
    """One way to deliver batches of spooled records; called only from the sender thread."""

    max_batch_records: int
    """Most records handed to one ``send``."""
    max_batch_bytes: int
    """Most bytes of keys and values handed to one ``send`` (one record may exceed it)."""

    def send(self, records: Sequence[Record]) -> Sequence[Outcome]:
        """Deliver ``records`` (oldest first) and return one outcome per record, in order.

        Must return within a bounded time (the SDK's ``close`` waits for it), and must not
        report DELIVERED before the confirmation. May raise instead: every record is then
        RETRY (``RetryLater`` also says how long the far end asked us to wait at least).
        Never sees a record twice at once; may see it again after RETRY.
        """
        ...

    def close(self) -> None:
        """Release connections; unconfirmed records stay in the spool."""
        ...


class RetryLater(Exception):
    """Raised by ``Transport.send``: nothing was confirmed, and the far end asked for at least
    ``delay_s`` before the next attempt (HTTP ``Retry-After``)."""

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


_PERMANENT: Final = (MessageSizeTooLargeError, RecordListTooLargeError, CorruptRecordError)
"""Refusals of the record itself: sending it again would be refused again. (A refusal of the
topic or of our rights to it is for an operator to fix; those records wait.)"""

# What a caller may not override: confirmation by every in-sync replica, and no topic made on
# demand (one made on demand gets the cluster's default retention, 7 days in Kafka: the raw
# topic, with raw ids and IPs, must only ever be made to its spec).
_FIXED_OPTIONS: Final = {"acks": "all", "allow_auto_create_topics": False}
_CODECS: Final = (None, "gzip", "snappy", "lz4", "zstd")


class KafkaTransport:
    """Sends to one topic with kafka-python, each batch confirmed with ``acks=all``.

    No step waits longer than about ``timeout_s`` (bootstrap, metadata, delivery), so a
    broker that is down fails the attempt instead of holding the sender thread. After any
    unconfirmed record the producer is thrown away and built afresh on the next attempt:
    a broker that restarted gets new connections and a new idempotent producer id.
    """

    max_batch_records = 500
    max_batch_bytes = 1_000_000

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        compression_type: str | None,
        timeout_s: float = 10.0,
        **kafka_options: Any,
    ) -> None:
        # The producer is built later, in the sender thread, where a bad option would only
        # fail every attempt: refuse it here, in the caller's hands.
        clash = {k for k, v in _FIXED_OPTIONS.items() if kafka_options.get(k, v) != v}
        unknown = set(kafka_options) - set(KafkaProducer.DEFAULT_CONFIG)
        if clash or unknown:
            raise ValueError(f"the SDK's Kafka producer cannot take {sorted(clash | unknown)}")
        if compression_type not in _CODECS:
            raise ValueError(f"compression_type must be one of {_CODECS}")
        timeout_ms = int(timeout_s * 1000)
        linger_ms = 5
        self.topic = topic
        self._timeout_s = timeout_s
        self._options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "compression_type": compression_type,
            "linger_ms": linger_ms,
            "bootstrap_timeout_ms": timeout_ms,
            "max_block_ms": timeout_ms,
            "request_timeout_ms": timeout_ms,
            "delivery_timeout_ms": timeout_ms + linger_ms,
            "reconnect_backoff_max_ms": 1000,
            **kafka_options,
            **_FIXED_OPTIONS,
        }
        self._producer: KafkaProducer | None = None

    def send(self, records: Sequence[Record]) -> list[Outcome]:
        """See ``Transport.send``; raises KafkaError when no producer can be built."""
        if self._producer is None:
            self._producer = self._new_producer()
        producer = self._producer
        deadline = time.monotonic() + self._timeout_s
        futures: list[Any] = []
        for record in records:
            try:
                futures.append(producer.send(self.topic, value=record.value, key=record.key))
            except _PERMANENT:
                futures.append(Outcome.REJECTED)
            except KafkaError:  # no metadata within max_block_ms: the rest wait
                break
        with contextlib.suppress(KafkaError):
            producer.flush(timeout=max(deadline - time.monotonic(), 0.5))
        result = [_outcome(future) for future in futures]
        result += [Outcome.RETRY] * (len(records) - len(result))
        if Outcome.RETRY in result:
            self._discard()
        return result

    def _new_producer(self) -> KafkaProducer:
        """A producer, bootstrapped; raises KafkaError when the broker cannot be reached.

        kafka-python's constructor bootstraps, and when that fails it raises with its network
        client half-built: an event loop with tasks still pending, its epoll selector and wakeup
        sockets open, all left to the cyclic garbage collector, which may finalize them much
        later in any thread; during an outage, one such loop per attempt. The client is closed
        here instead, in this thread, at once. (The socket of each failed connection is still
        left to the collector: kafka-python keeps it in the exception it stores.)
        """
        built: list[KafkaNetClient] = []

        def network_client(**configs: Any) -> KafkaNetClient:
            built.append(KafkaNetClient(**configs))
            return built[-1]

        try:
            return KafkaProducer(**{"kafka_client": network_client, **self._options})
        except BaseException:
            for client in built:
                with contextlib.suppress(Exception):
                    client.close()
            raise

    def _discard(self) -> None:
        """Throw the producer away; what it still held is in the spool, to be sent again."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=1.0)
        except KafkaError:
            # close() flushes first and raises if that times out, before it stops its I/O
            # thread. Stop that thread without sending (it fails what it held), then close.
            sender = getattr(producer, "_sender", None)
            if sender is not None:
                sender.force_close()
                sender.join(self._timeout_s)
            with contextlib.suppress(KafkaError):
                producer.close(timeout=1.0)

    def close(self) -> None:
        self._discard()


def _outcome(future: Any) -> Outcome:
    """A send's outcome from its kafka-python future (or the outcome already decided)."""
    if isinstance(future, Outcome):
        return future
    if not future.is_done:
        return Outcome.RETRY
    if future.succeeded():
        return Outcome.DELIVERED
    return Outcome.REJECTED if isinstance(future.exception, _PERMANENT) else Outcome.RETRY


_RETRY_AFTER_MAX_S: Final = 600.0
"""A longer Retry-After is read as this: a misconfigured proxy cannot park clients for a day."""
_MAX_RESPONSE_BYTES: Final = 1024 * 1024
"""The collector's answer to 500 events is about 20 KB; a larger one is not the collector's."""
_DISCONNECTED: Final = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
"""What a kept-alive connection that the server has closed meanwhile raises on reuse."""
_OWN_HEADERS: Final = frozenset(
    {"authorization", "content-type", "content-encoding", "content-length", "host"}
)
"""Headers the transport sets itself; extra ``headers`` may not override them."""
_SAY_WHY: Final = {
    401: "refused the app key (401: unknown or revoked)",
    403: "refused the app key for this app (403)",
}


class _Secret:
    """A string that never shows itself: not in a repr, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class HttpTransport:
    """POSTs batches to the collector's ``{endpoint}/v1/events``: one gzipped JSON array of the
    spooled events, ``Authorization: Bearer <key>``; standard library only.

    Outcomes, per record (the collector's answers, producers/README.md):

    - 2xx: a record whose event id is in ``accepted`` is DELIVERED (the collector answers only
      once Kafka has acknowledged it); one whose index is in ``refused`` is REJECTED, and its
      reason code logged. Any other (an answer that does not account for it) is RETRY.
    - 503, 429, 408, other 5xx, and any connection error or timeout: RETRY. A ``Retry-After``
      (seconds or an HTTP date; at most 10 minutes) is raised as ``RetryLater``, which the SDK
      takes as the least wait before the next attempt.
    - 401, 403: RETRY, with one error line until the collector takes events again. A key is
      fixed by an operator or a new release, not by dropping the events; meanwhile the spool's
      byte bound keeps the host application safe (the oldest events go first, counted).
    - 413 (and 400, the collector could not read the request): the batch is split in halves,
      each sent on its own, and the limits of later batches shrink to the half on a 413, so a
      collector configured below the defaults still takes everything; a single record that is
      still refused is REJECTED (no retry can shrink it).
    - Anything else (a redirect, 404, 415: the endpoint is wrong): RETRY, with one error line.

    ``headers`` are sent with every request besides the transport's own (for example a
    proxy's ``X-Forwarded-For`` in tests). Each network step (connect, send, each read) waits
    at most ``timeout_s``; a split batch
    starts no new request after ``timeout_s``. The connection is kept alive between batches.
    The key is never logged, put in an exception message or shown by ``repr``.
    """

    max_batch_records = 500
    max_batch_bytes = 1_000_000
    """Keys are not sent, so the body is at most these bytes, plus a comma per event and two
    brackets: under the collector's default 1 MiB."""

    def __init__(
        self,
        endpoint: str,
        key: str | None,
        *,
        timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if (
            url.scheme not in ("http", "https")
            or not url.hostname
            or url.username is not None
            or url.query
            or url.fragment
        ):
            raise ValueError(
                "endpoint must be an http:// or https:// URL with a host and an optional path,"
                " and no user, query or fragment"
            )
        _ = url.port  # urlsplit checks the port only when it is read: a bad one raises here
        if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key):
            # The key itself is never in the message: the caller's logs would keep it.
            raise ValueError("the key must be printable ASCII without surrounding spaces")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        extra = dict(headers or {})
        if {name.lower() for name in extra} & _OWN_HEADERS:
            raise ValueError(f"headers may not set {sorted(_OWN_HEADERS)}")
        if any(not (f"{n}{v}".isascii() and f"{n}{v}".isprintable()) for n, v in extra.items()):
            raise ValueError("headers must be printable ASCII")
        self._extra_headers = extra
        self.endpoint = urllib.parse.urlunsplit((url.scheme, url.netloc, url.path, "", ""))
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._path = url.path.rstrip("/") + "/v1/events"
        self._key = None if key is None else _Secret(key)
        self._timeout_s = timeout_s
        self._ssl_context = ssl_context
        self._conn: http.client.HTTPConnection | None = None
        self._complained: int | None = None
        """The status last logged as an error; said once until the collector takes events."""

    def __repr__(self) -> str:
        return f"HttpTransport({self.endpoint!r})"

    def send(self, records: Sequence[Record]) -> list[Outcome]:
        """See ``Transport.send``. Raises ``RetryLater`` (the far end asked for a wait) or the
        connection's error (``OSError``, ``http.client.HTTPException``) when nothing in the
        batch was settled; otherwise returns the outcomes, RETRY for the rest.

        The collector takes the events of one app per request (it refuses the others as
        ``app_mismatch``), so the events of each app go in a request of their own, in order.
        """
        outcomes = [Outcome.RETRY] * len(records)
        attempt = _Attempt(time.monotonic() + self._timeout_s)
        ids = [_ids(record) for record in records]
        by_app: dict[object, list[int]] = {}
        for index, (_, app_id) in enumerate(ids):
            by_app.setdefault(app_id, []).append(index)
        for indexes in by_app.values():
            self._deliver(records, indexes, [event_id for event_id, _ in ids], outcomes, attempt)
        if all(o is Outcome.RETRY for o in outcomes):
            if attempt.error is not None:
                raise attempt.error
            if attempt.retry_after_s is not None:
                raise RetryLater(attempt.why, attempt.retry_after_s)
        return outcomes

    def _deliver(
        self,
        records: Sequence[Record],
        indexes: list[int],
        event_ids: list[object],
        outcomes: list[Outcome],
        attempt: _Attempt,
    ) -> None:
        """Send the records at ``indexes`` in one request and settle their outcomes (or split
        them in halves, on 413 or 400)."""
        if attempt.error is not None or attempt.retry_after_s is not None:
            return  # the collector is unreachable or busy: the rest wait for the next attempt
        try:
            status, headers, body = self._post(
                b"[" + b",".join(records[i].value for i in indexes) + b"]"
            )
        except (OSError, http.client.HTTPException) as err:
            attempt.error = err
            return
        if 200 <= status < 300:
            self._settle(indexes, event_ids, body, outcomes)
        elif status in (400, 413) and len(indexes) > 1 and time.monotonic() < attempt.deadline:
            if status == 413:  # the collector's limits are below ours: keep under them
                self.max_batch_records = min(self.max_batch_records, len(indexes) // 2)
                size = sum(len(records[i].key) + len(records[i].value) for i in indexes)
                self.max_batch_bytes = min(self.max_batch_bytes, max(size // 2, 1))
            middle = len(indexes) // 2
            self._deliver(records, indexes[:middle], event_ids, outcomes, attempt)
            self._deliver(records, indexes[middle:], event_ids, outcomes, attempt)
        elif status in (400, 413) and len(indexes) == 1:
            outcomes[indexes[0]] = Outcome.REJECTED
            log.warning("the collector refused an event whole (%d %s)", status, _error(body))
        elif status in (408, 429) or status >= 500:
            attempt.why = f"the collector answered {status}"
            attempt.retry_after_s = _retry_after_s(headers.get("Retry-After")) or 0.0
        elif status not in (400, 413):
            why = _SAY_WHY.get(
                status, f"answered {status} to POST {self._path}: check the endpoint"
            )
            self._complain(status, why)

    def _settle(
        self, indexes: list[int], event_ids: list[object], body: bytes, outcomes: list[Outcome]
    ) -> None:
        """Outcomes from a 2xx answer: accepted ids DELIVERED, refused indexes REJECTED."""
        try:
            answer = json.loads(body)
            accepted = set(answer["accepted"])
            refused = {int(r["index"]): str(r["reason"]) for r in answer["refused"]}
        except (ValueError, TypeError, KeyError) as err:
            log.warning("the collector's answer could not be read (%s): events wait", err)
            return
        self._complained = None
        for position, index in enumerate(indexes):
            if position in refused:
                outcomes[index] = Outcome.REJECTED
            elif event_ids[index] in accepted:
                outcomes[index] = Outcome.DELIVERED
        if refused:
            reasons = sorted(set(refused.values()))
            log.warning("the collector refused %d events (%s)", len(refused), ", ".join(reasons))

    def _complain(self, status: int, why: str) -> None:
        if self._complained != status:
            self._complained = status
            log.error("the collector at %s %s; events wait in the spool", self.endpoint, why)

    def _post(self, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One POST of ``body`` (gzipped here); a kept-alive connection the server has closed
        meanwhile is replaced once, at once (a re-send is harmless: event ids)."""
        headers = {
            **self._extra_headers,
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Accept": "application/json",
            "User-Agent": "tally-python-sdk",
        }
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        payload = gzip.compress(body, compresslevel=6, mtime=0)
        for fresh in (self._conn is None, True):
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=payload, headers=headers)
                response = conn.getresponse()
                answer = response.read(_MAX_RESPONSE_BYTES)
                if response.will_close or not response.isclosed():
                    self.close()  # told to, or an answer too long to have read to its end
                return response.status, response.headers, answer
            except _DISCONNECTED:
                self.close()
                if fresh:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable: the second attempt is on a fresh connection")

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout_s, context=self._ssl_context
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout_s
                )
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Attempt:
    """One ``HttpTransport.send``: its deadline for splitting, and why it stopped early."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.error: OSError | http.client.HTTPException | None = None
        self.retry_after_s: float | None = None
        self.why = ""


def _ids(record: Record) -> tuple[object, object]:
    """The event id and app id of a spooled event (None for one that is not an event: the
    collector refuses it by its index)."""
    try:
        event = json.loads(record.value)
    except ValueError:
        return None, None
    if not isinstance(event, dict):
        return None, None
    return event.get("event_id"), event.get("app_id")


def _error(body: bytes) -> str:
    """The reason code of a refusal's answer, ``{"error": code}``; never more of the body."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(body).get("error"))[:40]
    return "no reason given"


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay seconds, or an HTTP date), at most 10 min."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _RETRY_AFTER_MAX_S)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        when = email.utils.parsedate_to_datetime(value)
        return min(max(when.timestamp() - time.time(), 0.0), _RETRY_AFTER_MAX_S)
    return None
