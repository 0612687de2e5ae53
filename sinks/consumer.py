"""The sink loop: consume enriched records, batch by size and time, write, then commit.

Offsets are committed only after ClickHouse confirmed the insert. A failed insert is retried
with backoff and the offsets stay put, so a crash at any point replays, never loses; the
tables dedupe replays by event id. A record that cannot be a row goes to the dead-letter
topic with a reason code (never silently dropped) and costs nothing else.
"""

import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError, GroupIdNotFoundError, KafkaError, for_code

from schemas.batch import split_enriched_message
from schemas.dead_letter import dead_letter
from schemas.reasons import ReasonCode
from schemas.summaries import OUTPUT_MODELS
from schemas.topics import TopicNames
from sinks.metrics import SinkMetrics, new_sink_metrics
from sinks.writer import (
    SOURCE_AT,
    ClickHouseWriter,
    RecordOutOfContract,
    Row,
    SourceOffsets,
    WriteResult,
    to_row,
    with_source,
)

log = logging.getLogger(__name__)

SUMMARY_TYPE = next(iter(OUTPUT_MODELS))

_CLOSE_TIMEOUT_S = 5


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


_COORDINATOR_WAIT_S = 30.0
"""How long a new sink waits for its group's coordinator before joining anyway."""
_COORDINATOR_POLL_S = 0.1
_BROKER_ERROR = re.compile(r"^\[Error (-?\d+)\]")


def _await_group_coordinator(bootstrap: str, group_id: str, timeout_s: float) -> bool:
    """Wait until the broker coordinating ``group_id`` answers for it; return whether it did.

    On a broker that has just started, the first group to ask creates the offsets topic, and
    for a second or two its coordinator refuses (COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR,
    COORDINATOR_LOAD_IN_PROGRESS): a consumer joining meanwhile logs a WARNING per refusal.
    Asking to describe the group meets the same refusals, silently. On any other answer (the
    group, no such group yet, no right to describe it), an unreachable cluster or the
    deadline, this returns and the consumer's own handling takes over. A fresh client per
    attempt re-finds the coordinator, as a consumer does after NOT_COORDINATOR.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap,
                bootstrap_timeout_ms=left_ms,
                request_timeout_ms=max(1000, min(left_ms, 10_000)),
            )
        except KafkaError as err:
            log.debug("group coordinator not checked, cluster unreachable: %s", err)
            return False
        try:
            error = admin.describe_groups([group_id])[group_id].get("error")
        except KafkaError as err:  # FindCoordinator refused, a request timed out, ...
            if not err.retriable:
                log.debug("group coordinator not checked: %s", err)
                return False
            error = None
        else:
            code = _BROKER_ERROR.match(error) if error else None
            refusal = for_code(int(code.group(1))) if code else None
            if refusal is None or refusal is GroupIdNotFoundError or not refusal.retriable:
                log.debug(
                    "coordinator of group %s answered after %.1f s: %s",
                    group_id, time.monotonic() - started, error or "ok",
                )  # fmt: skip
                return True
        finally:
            admin.close()
        # polling the coordinator against the deadline, not synchronizing
        time.sleep(min(_COORDINATOR_POLL_S, max(0.0, deadline - time.monotonic())))
    log.info("the coordinator of group %s did not answer in %.0f s; joining", group_id, timeout_s)
    return False


def _fetch_subscribed_metadata(consumer: KafkaConsumer, timeout_s: float) -> None:
    """Fetch the metadata of the consumer's subscribed topics before its first poll.

    A new consumer's metadata names no topic yet, and kafka-python holds the refresh for its
    subscription back (``retry_backoff_ms``) while it joins: with a coordinator that answers
    at once, the leader assigns before it knows the topic's partitions (a WARNING, "No
    partition metadata"), and the group rebalances when they arrive. A fresh bootstrap asks
    for the subscribed topics' metadata now.
    """
    try:
        consumer.bootstrap(timeout_ms=int(timeout_s * 1000), refresh=True)
    except KafkaError as err:  # the first poll will retry; nothing is lost
        log.debug("topic metadata not fetched before joining: %s", err)


def _last_offsets(messages: list[Any]) -> SourceOffsets:
    last: SourceOffsets = {}
    for message in messages:
        key = (message.topic, message.partition)
        last[key] = max(last.get(key, -1), message.offset)
    return last


class _ForgetStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """Reads the stored offsets again after a rebalance: another sink may have written the
    partitions meanwhile."""

    def __init__(self, sink: "EnrichedSink") -> None:
        self._sink = sink

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._sink._stored_offsets = None

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._sink._stored_offsets = None


class EnrichedSink:
    """Moves the enriched topic into ClickHouse. Not thread-safe: one thread runs it."""

    def __init__(
        self, config: SinkConfig, writer: ClickHouseWriter, metrics: SinkMetrics | None = None
    ) -> None:
        self.config = config
        self.writer = writer
        self.metrics = metrics or new_sink_metrics()
        self.rows_written = 0
        """Rows inserted: each event once (a replayed one is not inserted again)."""
        self.messages_done = 0
        """Messages written, skipped as already stored, or dead-lettered, and committed."""
        self.records_done = 0
        """The records (events, summaries) in them: an enriched message holds several."""
        self.dead_letters = 0
        self.replays_skipped = 0
        """Records not written again because their offset was already stored."""
        self.insert_failures = 0
        self.max_messages_held = 0
        """The most messages held at once: one batch, however long ClickHouse is away."""
        self.first_write_at: float | None = None
        self._stored_offsets: dict[int, int] | None = None
        """Stored offsets per partition, read again after each rebalance (None: unread)."""
        self.after_insert: Callable[[], None] | None = None
        """Called between a batch's insert and its commit: where a test places a crash."""
        # Joining before the group's coordinator is up, or before this consumer knows the
        # topic's partitions, costs WARNING lines and a rebalance: both are awaited first.
        _await_group_coordinator(config.bootstrap, config.group_id, _COORDINATOR_WAIT_S)
        self._consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap,
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.batch_size,
            allow_auto_create_topics=False,  # topics are made to their spec, never on demand
        )
        self._consumer.subscribe([config.topics.enriched], listener=_ForgetStoredOffsets(self))
        _fetch_subscribed_metadata(self._consumer, _COORDINATOR_WAIT_S)
        self._producer = KafkaProducer(
            bootstrap_servers=config.bootstrap,
            acks="all",
            compression_type=config.compression_type,
            allow_auto_create_topics=False,
        )

    def close(self) -> None:
        """Leave the group and close, in bounded time: kafka-python's consumer would wait up
        to its request timeout (305 s) for a coordinator that is still forming, and its
        producer forever for a flush. What is not committed is replayed and deduplicated."""
        self._consumer.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_S * 1000)
        self._producer.close(timeout=_CLOSE_TIMEOUT_S)

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
        self.metrics.dead_letters.labels(reason.value).inc()

    @property
    def event_rows_written(self) -> int:
        """Rows of client events inserted: ``rows_written`` without the session summaries
        the stream step adds."""
        return self.rows_written - self.writer.written_by_type[SUMMARY_TYPE]

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
        commit. Returns rows written (0 if stopped before the insert succeeded).

        While ClickHouse is down this holds the one batch and does not poll, so nothing more
        is fetched: memory stays bounded, the offsets stay uncommitted, and the broker keeps
        the records. Records at or below the partition's stored offset (a replay after a
        crash between insert and commit) are skipped without a query.
        """
        self.max_messages_held = max(self.max_messages_held, len(messages))
        duplicates, erased = self.writer.duplicates_skipped, self.writer.erased_skipped
        backoff = 0.2
        rows_of: tuple[dict[str, list[Row]], int, int] | None = None
        while True:
            try:
                if rows_of is None:  # once: it dead-letters what cannot be a row
                    rows_of = self._rows_of(messages)
                grouped, done_here, skipped = rows_of
                with self.metrics.insert_seconds.time():
                    result = self.writer.write(grouped, _last_offsets(messages))
                break
            except Exception as err:  # transient, or a bug: keep offsets, retry
                log.warning("ClickHouse insert failed, retrying in %.1fs: %s", backoff, err)
                self.insert_failures += 1
                self.metrics.insert_failures.inc()
                if stop.wait(backoff):
                    return 0
                backoff = min(backoff * 2, self.config.max_backoff_s)
        if self.after_insert is not None:
            self.after_insert()
        if result.rejected:
            by_source = {(m.topic, m.partition, m.offset): m for m in messages}
            for event_type, row in result.rejected:
                source = tuple(row[at] for at in SOURCE_AT[event_type])
                message = by_source[source]
                self._dead_letter(message, ReasonCode.STORAGE_REJECTED, event_type)
        if self.dead_letters:
            self._producer.flush()
        try:
            self._consumer.commit()
        except CommitFailedError:
            # The group rebalanced under us: whoever owns the partitions now replays this
            # batch, and the stored offsets and event ids keep it from counting twice.
            log.warning("offsets not committed after a rebalance; the batch will be replayed")
        self.messages_done += len(messages)
        self.records_done += done_here
        self.replays_skipped += skipped
        self._count(result, done_here, skipped, duplicates, erased)
        written = result.written
        log.debug("wrote %d rows from %d messages", written, len(messages))
        if written and self.first_write_at is None:
            self.first_write_at = time.time()
        self.rows_written += written
        return written

    def _count(
        self, result: WriteResult, records: int, replayed: int, duplicates: int, erased: int
    ) -> None:
        metrics = self.metrics
        metrics.records.inc(records)
        metrics.batch_records.observe(records)
        metrics.count_written(result.inserted)
        metrics.rows_skipped.labels("replayed").inc(replayed)
        metrics.rows_skipped.labels("duplicate").inc(self.writer.duplicates_skipped - duplicates)
        metrics.rows_skipped.labels("erased").inc(self.writer.erased_skipped - erased)
        metrics.last_write.set(time.time())
        for partition in self._consumer.assignment():
            end = self._consumer.highwater(partition)
            if end is not None:
                lag = max(0, end - self._consumer.position(partition))
                metrics.consumer_lag.labels(str(partition.partition)).set(lag)

    def _rows_of(self, messages: list[Any]) -> tuple[dict[str, list[Row]], int, int]:
        """Rows by event type (dead-lettering what cannot be a row), records in the batch,
        and records skipped as already stored."""
        if self._stored_offsets is None:
            self._stored_offsets = self.writer.stored_offsets(self.config.topics.enriched)
        stored = self._stored_offsets
        grouped: dict[str, list[Row]] = defaultdict(list)
        done_here = skipped = 0
        for message in messages:
            try:
                records = split_enriched_message(message.value)
            except (orjson.JSONDecodeError, TypeError):
                records = [None]
            done_here += len(records)
            if message.offset <= stored.get(message.partition, -1):
                skipped += len(records)
                continue
            for record in records:
                if not isinstance(record, dict):
                    self._dead_letter(message, ReasonCode.MALFORMED_JSON)
                    continue
                try:
                    event_type, row = to_row(record)
                except RecordOutOfContract:
                    self._dead_letter(message, ReasonCode.INVALID_FIELD, record.get("event_type"))
                    continue
                grouped[event_type].append(
                    with_source(row, message.topic, message.partition, message.offset)
                )
        return grouped, done_here, skipped

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is written before returning."""
        while not stop.is_set():
            messages = self.poll_batch()
            if messages:
                self.write_batch(messages, stop)
