"""How the SDK's sender thread delivers spooled events: the ``Transport`` seam, and Kafka.

The SDK owns everything the transports share (consent, validation, the spool, ordering,
retries with backoff, counting); a transport only sends one batch and says, per record,
whether it is confirmed. Kafka (services inside the data centre) is here; HTTP to the
collector (desktop apps) implements the same protocol.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

from kafka import KafkaProducer
from kafka.errors import (
    CorruptRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

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
        RETRY. Never sees a record twice at once; may see it again after RETRY.
        """
        ...

    def close(self) -> None:
        """Release connections; unconfirmed records stay in the spool."""
        ...


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
            self._producer = KafkaProducer(**self._options)
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
