"""The sink loop: consume enriched records, batch by size and time, write, then commit.

Offsets are committed only after ClickHouse confirmed the insert. A failed insert is retried
with backoff and the offsets stay put, so a crash at any point replays, never loses; the
tables dedupe replays by event id. A record that cannot be a row goes to the dead-letter
topic with a reason code (never silently dropped) and costs nothing else.
"""

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError

from schemas.dead_letter import dead_letter
from schemas.reasons import ReasonCode
from schemas.topics import TopicNames
from sinks.writer import ClickHouseWriter, RecordOutOfContract, to_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SinkConfig:
    bootstrap: str
    topics: TopicNames
    group_id: str = "tally-sink"
    batch_size: int = 5000
    batch_interval_s: float = 1.0
    max_backoff_s: float = 30.0
    compression_type: str | None = "zstd"
    """The codec of the dead-letter batches; None: uncompressed."""


class EnrichedSink:
    """Moves the enriched topic into ClickHouse. Not thread-safe: one thread runs it."""

    def __init__(self, config: SinkConfig, writer: ClickHouseWriter) -> None:
        self.config = config
        self.writer = writer
        self.rows_written = 0
        self.dead_letters = 0
        self.first_write_at: float | None = None
        self._consumer = KafkaConsumer(
            config.topics.enriched,
            bootstrap_servers=config.bootstrap,
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.batch_size,
        )
        self._producer = KafkaProducer(
            bootstrap_servers=config.bootstrap,
            acks="all",
            compression_type=config.compression_type,
        )

    def close(self) -> None:
        self._consumer.close(autocommit=False)
        self._producer.close()

    def _dead_letter(self, message: Any, reason: ReasonCode, event_type: Any = None) -> None:
        letter = dead_letter(
            reason,
            field=None,
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            received_ms=message.timestamp,
            event_type=event_type,
        )
        self._producer.send(self.config.topics.dead, letter)
        self.dead_letters += 1

    def poll_batch(self) -> list[Any]:
        """Collect up to one batch of messages, waiting at most the batch interval."""
        deadline = time.monotonic() + self.config.batch_interval_s
        messages: list[Any] = []
        while len(messages) < self.config.batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = self._consumer.poll(
                timeout_ms=int(left * 1000), max_records=self.config.batch_size - len(messages)
            )
            for partition_messages in polled.values():
                messages.extend(partition_messages)
        return messages

    def write_batch(self, messages: list[Any], stop: threading.Event) -> int:
        """Insert a batch, retrying with backoff until it succeeds or ``stop`` is set, then
        commit. Returns rows written (0 if stopped before the insert succeeded)."""
        grouped: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for message in messages:
            try:
                record = orjson.loads(message.value)
            except (orjson.JSONDecodeError, TypeError):
                record = None
            if not isinstance(record, dict):
                self._dead_letter(message, ReasonCode.MALFORMED_JSON)
                continue
            try:
                event_type, row = to_row(record)
            except RecordOutOfContract:
                self._dead_letter(message, ReasonCode.INVALID_FIELD, record.get("event_type"))
                continue
            grouped[event_type].append(row)
        backoff = 0.2
        while True:
            try:
                written = self.writer.write(grouped)
                break
            except Exception as err:  # ClickHouse down or refusing: keep the offsets, retry
                log.warning("ClickHouse insert failed, retrying in %.1fs: %s", backoff, err)
                if stop.wait(backoff):
                    return 0
                backoff = min(backoff * 2, self.config.max_backoff_s)
        if self.dead_letters:
            self._producer.flush()
        try:
            self._consumer.commit()
        except CommitFailedError:
            # The group rebalanced under us: whoever owns the partitions now replays this
            # batch, and the tables keep one row per event id, so this is no loss.
            log.warning("offsets not committed after a rebalance; the batch will be replayed")
        log.debug("wrote %d rows from %d messages", written, len(messages))
        if written and self.first_write_at is None:
            self.first_write_at = time.time()
        self.rows_written += written
        return written

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is written before returning."""
        while not stop.is_set():
            messages = self.poll_batch()
            if messages:
                self.write_batch(messages, stop)
