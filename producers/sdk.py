"""The Python SDK: what a desktop client links to emit events to Tally over Kafka.

It enforces the user's consent before anything leaves the client (privacy statement,
"Control your Personal Information"), stamps the send time, and refuses what the schema
would refuse, so an application bug fails loudly on the client, not silently downstream.
"""

import time
from typing import Any

from kafka import KafkaProducer

from schemas.consent import Consent
from schemas.events import Envelope
from schemas.reasons import ReasonCode
from schemas.topics import TopicNames
from schemas.validation import InvalidEvent, decode_event, encode_event


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


class TallyProducer:
    """Sends events to the raw topic with kafka-python. ``flush`` blocks until all are acked.

    ``compression_type`` is the batches' codec: gzip, snappy, lz4, zstd, or None for none.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: TopicNames,
        *,
        consent: Consent | None = None,
        compression_type: str | None = "zstd",
        **kafka_options: Any,
    ) -> None:
        self.topic = topics.raw
        self.consent = consent
        """The user's current choice; None leaves each event's own level in force."""
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            compression_type=compression_type,
            # A topic made on demand gets the cluster's default retention (7 days in Kafka):
            # the raw topic, with raw ids and IPs, must only ever be made to its spec.
            allow_auto_create_topics=False,
            **kafka_options,
        )

    def emit(self, event: Envelope) -> None:
        """Queue one event; raises ``InvalidEvent`` if it breaks the schema or the consent."""
        raw = prepare_event(event, int(time.time() * 1000), self.consent)
        key = (event.session_id or event.user_id or event.event_id).encode()
        self._producer.send(self.topic, value=raw, key=key)

    def set_consent(self, consent: Consent) -> None:
        """The user changed their choice; events made under a wider one are refused."""
        self.consent = consent

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()
