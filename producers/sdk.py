"""The Python SDK: what a desktop client or a server-side emitter links to send events to Tally.

It enforces the user's consent before anything leaves the client (privacy statement,
"Control your Personal Information"), stamps the send time, and refuses what the schema
would refuse, so an application bug fails loudly on the client, not silently downstream.

Everything else is the SDK's to absorb, never the host application's: ``emit`` appends the
event to a spool (``producers/spool.py``; on disk when given a path, so events outlive an
outage and a restart) and returns; one sender thread sends the spool in order through a
transport (``producers/transports.py``) and removes an event only once it is confirmed,
retrying with backoff. Delivery is at least once; the event id makes a re-send harmless
(the stream step and the ClickHouse writer each drop an id they have seen).
"""

import logging
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from producers.spool import Record, Spool, Spooled
from producers.transports import HttpTransport, KafkaTransport, Outcome, RetryLater, Transport
from schemas.consent import Consent
from schemas.events import MAX_EVENT_BYTES, Envelope
from schemas.reasons import ReasonCode
from schemas.topics import TopicNames
from schemas.validation import InvalidEvent, decode_event, encode_event

log = logging.getLogger(__name__)

DEFAULT_SPOOL_BYTES: Final = 32 * 1024 * 1024
"""A spool's default bound: kafka-python's own send buffer, about 8,000 events."""
_MIN_SPOOL_BYTES: Final = 4 * MAX_EVENT_BYTES
_MEMORY_CLOSE_DRAIN_S: Final = 5.0
_IDLE_RECHECK_S: Final = 1.0


def apply_consent(event: Envelope) -> Envelope:
    """The event as the user's consent lets it leave the client.

    With ``none`` the user id and referrer stay on the client. A session id, where the type
    requires one, is a random per-call id; it still leaves, and the stream step drops it.
    """
    if Consent(event.consent) is Consent.NONE:
        return event.model_copy(update={"user_id": None, "referrer": None})
    return event


_PERMISSIVENESS = {Consent.NONE: 0, Consent.ANONYMOUS: 1, Consent.FULL: 2}


def prepare_event(event: Envelope, now_ms: int, consent_now: Consent | None = None) -> bytes:
    """Consent applied, send time stamped, validated exactly as the stream step will.

    ``consent_now`` is the user's choice at send time: an event made under a wider consent
    that the user has since narrowed is refused as ``consent_withdrawn``, never sent.
    """
    if consent_now is not None and (
        _PERMISSIVENESS[Consent(event.consent)] > _PERMISSIVENESS[consent_now]
    ):
        raise InvalidEvent(ReasonCode.CONSENT_WITHDRAWN, "consent")
    event = apply_consent(event).model_copy(update={"collector_time_ms": now_ms})
    raw = encode_event(event)
    decode_event(raw, received_ms=now_ms)
    return raw


def partition_key(event: Envelope) -> bytes:
    """The key of an event's record: its session, else its user, else itself; taken after
    consent, so a user id that stays on the client never leaves as a key either."""
    event = apply_consent(event)
    return (event.session_id or event.user_id or event.event_id).encode()


class TallyClient:
    """Validates and spools events; a sender thread delivers them through ``transport``.

    ``spool_path`` is the file that keeps events across outages and restarts (one process
    at a time: another opener gets ``SpoolInUse``); opening it again sends what was left.
    Without one, events wait in memory and are lost if the process exits first.
    ``spool_max_bytes`` bounds the spool; when full, the oldest events are dropped and
    counted in ``dropped_events``. Failed sends are retried after ``retry_backoff_s``,
    doubling to ``retry_backoff_max_s``, each jittered so that many clients do not return
    together after an outage; never sooner than the transport asked (``RetryLater``).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        consent: Consent | None = None,
        spool_path: Path | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 30.0,
    ) -> None:
        if spool_max_bytes < _MIN_SPOOL_BYTES:
            raise ValueError(f"spool_max_bytes must be at least {_MIN_SPOOL_BYTES}")
        self.consent = consent
        """The user's current choice; None leaves each event's own level in force."""
        self._transport = transport
        self._spool = Spool(spool_path, spool_max_bytes)
        self._backoff = (retry_backoff_s, retry_backoff_max_s)
        self._unspooled = 0
        self._rejected = 0
        self._said_full = False
        self._closed = False
        # Guards the sender's wake-ups: new events, a flush's "try now", and the stop.
        self._cv = threading.Condition()
        self._new_events = False
        self._try_now = False
        self._stopping = False
        self._sender = threading.Thread(target=self._send_loop, name="tally-sdk-sender")
        self._sender.daemon = True  # a host that never calls close() can still exit
        self._sender.start()

    # The host application's side: nothing here waits on the network or raises on its trouble.

    def emit(self, event: Envelope) -> None:
        """Spool one event for sending and return at once.

        Raises ``InvalidEvent`` if it breaks the schema or the consent, and nothing else:
        an event that cannot be spooled (the SDK is closed, the disk fails) is counted in
        ``dropped_events`` instead.
        """
        raw = prepare_event(event, int(time.time() * 1000), self.consent)
        record = Record(partition_key(event), raw)
        if self._closed:
            self._count_unspooled()
            return
        dropped = self._spool.dropped
        try:
            self._spool.append(record)
        except sqlite3.Error:  # the disk failed, or a racing close() closed the spool
            self._count_unspooled()
            log.warning("an event could not be spooled and is dropped", exc_info=True)
            return
        if self._spool.dropped > dropped and not self._said_full:
            self._said_full = True
            log.warning("the spool is full: the oldest events are dropped (dropped_events)")
        with self._cv:
            self._new_events = True
            self._cv.notify_all()

    def _count_unspooled(self) -> None:
        with self._cv:  # emitting threads race here
            self._unspooled += 1

    def set_consent(self, consent: Consent) -> None:
        """The user changed their choice; events made under a wider one are refused."""
        self.consent = consent

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every event emitted before this call has left the spool (confirmed,
        or dropped and counted), or ``timeout_s`` passes (None: no limit); return which.

        A sender waiting out a backoff tries again at once.
        """
        if self._closed:
            return self._spool.count == 0
        target = self._spool.newest_seq
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            self._try_now = True
            self._cv.notify_all()
            while not self._left_spool(target):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(timeout=_IDLE_RECHECK_S if remaining is None else remaining)
        return True

    def _left_spool(self, seq: int) -> bool:
        oldest = self._spool.oldest_seq()
        return oldest is None or oldest > seq

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the sender after waiting up to ``timeout_s`` for the spool to drain.

        By default it does not wait with a spool file (what is left is sent by the next
        opener), and waits up to 5 s with the in-memory spool, whose events are otherwise
        lost. Returns within that wait plus one send attempt.
        """
        if self._closed:
            return
        in_memory = self._spool.path is None
        drain_s = (_MEMORY_CLOSE_DRAIN_S if in_memory else 0.0) if timeout_s is None else timeout_s
        if drain_s > 0:
            self.flush(drain_s)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._sender.join()
        self._closed = True
        if in_memory and self._spool.count:
            log.warning("%d events were never confirmed and are lost", self._spool.count)
        try:
            self._transport.close()
        finally:
            self._spool.close()

    def __enter__(self) -> "TallyClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def pending_events(self) -> int:
        """Events spooled and not yet confirmed."""
        return self._spool.count

    @property
    def dropped_events(self) -> int:
        """Events dropped unsent since this client opened: the oldest ones, when the spool
        was full, and any that could not be spooled at all."""
        return self._spool.dropped + self._unspooled

    @property
    def rejected_events(self) -> int:
        """Events the transport refused for good (``Outcome.REJECTED``), dropped unsent."""
        return self._rejected

    # The sender thread.

    def _send_loop(self) -> None:
        """Send the oldest spooled events until asked to stop; never dies of an error."""
        failures = 0
        while not self._stopping:
            try:
                batch = self._spool.peek(
                    self._transport.max_batch_records, self._transport.max_batch_bytes
                )
            except sqlite3.Error:
                log.exception("the spool could not be read")
                failures += 1
                self._wait(lambda: self._try_now, self._backoff_delay(failures))
                continue
            if not batch:
                failures = 0
                self._wait(lambda: self._new_events, _IDLE_RECHECK_S)
                continue
            outcomes, at_least_s = self._send(batch, failures)
            if Outcome.RETRY in outcomes:
                failures += 1
                delay = max(self._backoff_delay(failures), at_least_s)
                self._wait(lambda: self._try_now, delay)
            else:
                failures = 0

    def _send(self, batch: list[Spooled], failures: int) -> tuple[list[Outcome], float]:
        """One attempt at a batch: what was confirmed or refused for good leaves the spool.
        Returns the outcomes, and the least wait before the next attempt the far end asked."""
        try:
            outcomes = list(self._transport.send([spooled.record for spooled in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} records")
        except Exception as err:
            if not failures:
                log.warning("events wait in the spool: sending failed (%s)", _one_line(err))
            at_least_s = err.delay_s if isinstance(err, RetryLater) else 0.0
            return [Outcome.RETRY] * len(batch), at_least_s
        if Outcome.RETRY in outcomes and not failures:
            log.warning("events wait in the spool: sending was not confirmed")
        elif Outcome.RETRY not in outcomes and failures:
            log.info("sending again after %d failed attempts", failures)
        rejected = outcomes.count(Outcome.REJECTED)
        if rejected:
            self._rejected += rejected
            log.warning("%d events were refused by the transport and are dropped", rejected)
        done = [s.seq for s, o in zip(batch, outcomes, strict=True) if o is not Outcome.RETRY]
        try:
            self._spool.remove_delivered(done)
        except sqlite3.Error:  # they are sent again: at least once
            log.exception("the spool could not forget confirmed events")
        with self._cv:
            self._cv.notify_all()  # a flush may be waiting on these
        return outcomes, 0.0

    def _wait(self, wake: Callable[[], bool], timeout_s: float) -> None:
        """Sleep until ``wake()`` is true, the stop is asked, or ``timeout_s`` passes."""
        with self._cv:
            self._cv.wait_for(lambda: self._stopping or wake(), timeout=timeout_s)
            self._new_events = self._try_now = False

    def _backoff_delay(self, failures: int) -> float:
        """Exponential, with jitter in its upper half (never 0, never in step with others)."""
        base, cap = self._backoff
        delay: float = min(cap, base * 2 ** min(failures - 1, 30))
        return delay / 2 + random.uniform(0, delay / 2)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


class TallyProducer(TallyClient):
    """The SDK over Kafka, for services inside the data centre: sends to the raw topic with
    ``acks=all``.

    ``compression_type`` is the batches' codec: gzip, snappy, lz4, zstd, or None for none.
    ``send_timeout_s`` bounds each step of a send attempt, so a broker that is down costs
    the sender thread a failed attempt, never a hang. Other keyword arguments go to
    ``TallyClient`` (``spool_path`` and the rest) or, if not its own, to kafka-python's
    ``KafkaProducer``.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: TopicNames,
        *,
        consent: Consent | None = None,
        compression_type: str | None = "zstd",
        spool_path: Path | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 30.0,
        send_timeout_s: float = 10.0,
        **kafka_options: Any,
    ) -> None:
        self.topic = topics.raw
        transport = KafkaTransport(
            bootstrap,
            topics.raw,
            compression_type=compression_type,
            timeout_s=send_timeout_s,
            **kafka_options,
        )
        super().__init__(
            transport,
            consent=consent,
            spool_path=spool_path,
            spool_max_bytes=spool_max_bytes,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
        )


class TallyHttpClient(TallyClient):
    """The SDK over HTTP to the collector, for desktop apps: each batch is a POST to
    ``{endpoint}/v1/events`` with ``Authorization: Bearer <key>``, confirmed by its 2xx.

    ``key`` is the app's key (None: the collector asks for none). It is a secret for a
    server-side sender: it is never logged, put in an exception message or shown by ``repr``.
    ``send_timeout_s`` bounds each network step of a send attempt; ``headers`` go with every
    request (never the transport's own: Authorization, Content-*). What the collector's
    answers mean for each event is ``HttpTransport``'s docstring. Other keyword arguments are
    ``TallyClient``'s (``spool_path`` and the rest).
    """

    def __init__(
        self,
        endpoint: str,
        key: str | None,
        *,
        consent: Consent | None = None,
        spool_path: Path | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 30.0,
        send_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        transport = HttpTransport(
            endpoint, key, timeout_s=send_timeout_s, ssl_context=ssl_context, headers=headers
        )
        self.endpoint = transport.endpoint
        super().__init__(
            transport,
            consent=consent,
            spool_path=spool_path,
            spool_max_bytes=spool_max_bytes,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
        )

    def __repr__(self) -> str:
        return f"TallyHttpClient({self.endpoint!r})"
