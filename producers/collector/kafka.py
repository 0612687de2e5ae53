"""The collector's Kafka side: produce a request's batches and wait until the broker has
acknowledged every one (acks=all), or say that Kafka cannot be reached.

aiokafka's producer is asyncio, so the server keeps answering while it waits. It is started
on first use and again after a failed start, so a collector started before its cluster comes
up becomes ready without a restart. A producer that failed to deliver is thrown away and the
next request starts a new one: records that timed out stay queued in the old producer's
accumulator and keep it failing long after the broker is back (seen: 503s for over a
minute after a broker restart, with a 2 s produce timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer


class ProducerUnavailable(Exception):
    """Kafka did not acknowledge in time, or cannot be reached. The message names no event."""


class BatchProducer(Protocol):
    """What the collector app needs of a producer (tests may pass any such object)."""

    async def send(self, key: bytes, values: Sequence[bytes]) -> None:
        """Produce ``values`` in order under ``key``; return once all are acknowledged,
        raise ``ProducerUnavailable`` otherwise."""

    async def ready(self) -> bool:
        """Whether Kafka answers for the topic now."""

    async def close(self) -> None:
        """Flush what is in flight and release connections."""


class KafkaBatchProducer:
    """``BatchProducer`` over aiokafka: acks=all, idempotent (a retry inside the client
    never writes a batch twice), never creating a topic."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        compression_type: str | None,
        timeout_s: float = 10.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._compression_type = compression_type
        self._timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is not None:
                return self._producer
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                acks="all",
                enable_idempotence=True,
                compression_type=self._compression_type,
                request_timeout_ms=int(self._timeout_s * 1000),
                client_id="tally-collector",
            )
            try:
                await asyncio.wait_for(producer.start(), self._timeout_s)
            except Exception as err:
                await producer.stop()
                raise ProducerUnavailable(f"cannot reach Kafka: {type(err).__name__}") from None
            self._producer = producer
            return producer

    async def send(self, key: bytes, values: Sequence[bytes]) -> None:
        producer = await self._started()
        try:
            async with asyncio.timeout(self._timeout_s):
                pending = [await producer.send(self._topic, value, key=key) for value in values]
                await asyncio.gather(*pending)
        except Exception as err:  # aiokafka's errors name no record value
            failure = type(err).__name__
        else:
            return
        self._discard(producer)
        raise ProducerUnavailable(f"not acknowledged: {failure}")

    def _discard(self, producer: AIOKafkaProducer) -> None:
        """Stop using ``producer``; it is stopped in the background (its unsent records fail,
        and their requests were, or will be, answered 503)."""
        if self._producer is not producer:
            return  # another request already replaced it
        self._producer = None
        task = asyncio.get_running_loop().create_task(self._stop_quietly(producer))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_quietly(self, producer: AIOKafkaProducer) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), self._timeout_s)

    async def ready(self) -> bool:
        try:
            producer = await self._started()
            async with asyncio.timeout(self._timeout_s):
                partitions = await producer.partitions_for(self._topic)
        except Exception:
            return False
        return bool(partitions)

    async def close(self) -> None:
        async with self._lock:
            if self._producer is not None:
                producer, self._producer = self._producer, None
                await producer.stop()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
