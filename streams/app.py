"""The Faust app and its one agent. The only module that creates a Faust app.

Delivery: ``take_events`` acks a batch only after the loop body returns, and Faust flushes
the producer before it commits offsets (faust/transport/consumer.py, ``_commit_offsets``),
so an offset of the raw topic is committed only once every enriched or dead-letter message
it gave is on the broker. A raw batch gives one enriched message holding all its valid
events (``schemas.batch.join_enriched_records``) and one dead letter per refused event: the
per-message cost of Faust and Kafka is paid once per batch, not once per event. A crash
replays at most the uncommitted batch (at-least-once); the sink's writes are idempotent by
event id.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import faust
from faust.transport.consumer import ThreadDelegateConsumer
from faust.types import TP

from schemas.reasons import ReasonCode
from schemas.topics import TopicNames
from streams.dedupe import RecentEventIds, TableWrite
from streams.enrich import Lookups
from streams.metrics import StreamMetrics, new_stream_metrics
from streams.open_sessions import OpenSessions, summary_outcome
from streams.quality import QualityThresholds
from streams.refusals import RefusalWatch
from streams.sessions import SessionRules
from streams.steps import Origin, Outcome, outcomes_of_message, outgoing_messages

log = logging.getLogger(__name__)


MAX_HELD_RECORDS: Final = 2000
"""Records a batch holds before sending them (joined) while it goes on: a bound on memory,
since a batch of 1,000 raw messages may hold 50,000 events (measured: 2,000 keeps the
worker under 400 MB at full speed, 50,000 took it to 1 GB)."""

DEFAULT_SESSION_RULES: Final = SessionRules(
    silence_timeout_s=120.0,
    allowed_lateness_s=3600.0,
    thresholds=QualityThresholds(400.0, 30.0, 5.0, 300.0, 20.0, 1.0),
)


@dataclass(frozen=True)
class StreamConfig:
    """What the stream worker needs; built by the composition root from the settings."""

    bootstrap: str
    topics: TopicNames
    app_id: str = "tally-streams"
    batch_size: int = 1000
    batch_within_s: float = 0.2
    session_timeout_s: float = 10.0
    state_dir: str | None = None
    compression_type: str | None = "zstd"
    """The codec of the batches the worker produces; None: uncompressed."""
    refusal_alarm_share: float = 0.5
    refusal_alarm_window_s: float = 60.0
    refusal_alarm_min_events: int = 200
    """The dead-letter limit (streams/refusals.py)."""
    refusal_pause_s: float = 0.0
    """How long the raw partitions are paused when the limit trips; 0: never."""
    partitions: int = 1
    """Of the raw topic; the tables' changelogs have as many (one table partition per raw
    partition: a worker owns both)."""
    dedupe_window_s: float = 86_400.0
    dedupe_max_ids: int = 1_000_000
    table_check_interval_s: float = 5.0
    """How often forgotten ids (and silent sessions) are looked for."""
    session_rules: SessionRules = DEFAULT_SESSION_RULES


def seek_uncommitted_partitions_to_their_start(app: faust.App, topic: str) -> None:
    """Make Faust's seek to the committed offsets also seek the topic's partitions that have
    none (or offset 0) to their start.

    Faust fetches from the stream partitions before it seeks them back to the committed
    offsets when table recovery ends (faust-streaming/faust#216), and skips what it fetched
    meanwhile; aiokafka's ``seek_to_committed`` leaves a partition without a committed offset
    (or at offset 0) where that fetch left it. A worker starting before its group's first
    commit (a first start, or a restart after a crash before one) then never read the
    skipped messages (tests/integration/test_worker_start.py)."""
    consumer = cast(ThreadDelegateConsumer, app.consumer)
    seek_to_committed = consumer.seek_to_committed

    async def seek_to_committed_or_start() -> Mapping[TP, int]:
        committed = await seek_to_committed()
        uncommitted = [tp for tp, offset in committed.items() if tp.topic == topic and not offset]
        if uncommitted:
            starts = await consumer.earliest_offsets(*uncommitted)
            await consumer.seek_wait(dict(starts))
            log.info("no committed offset: %s read from their start",
                     ", ".join(f"{tp.topic}[{tp.partition}]" for tp in uncommitted))  # fmt: skip
        return committed

    consumer.seek_to_committed = seek_to_committed_or_start  # type: ignore[method-assign]


def stop_delivering_before_the_seek(app: faust.App) -> None:
    """Stop the consumer's flow before Faust seeks the stream partitions to their committed
    offsets when a table recovery ends; Faust resumes it once it has dropped what was fetched
    before.

    Faust resumes the stream partitions, then seeks, then clears the streams' queues
    (``flow_control.resume``), then resumes the flow (faust/tables/recovery.py,
    ``on_recovery_completed``). A message fetched and delivered after the seek but before
    that clear marked its offset read and was then dropped from the queue: when the same
    partition is fetched again from the seek, every offset below the highest dropped one is
    skipped as already read. With the flow stopped nothing is delivered in between, and what
    a fetch returns while it is stopped makes Faust seek back to the committed offsets again
    (``Consumer.getmany``). Seen as one lost raw message in a worker start while events
    flowed (streams/README.md); tests/integration/test_worker_restarts_under_flow.py."""
    consumer = cast(ThreadDelegateConsumer, app.consumer)
    perform_seek = consumer.perform_seek

    async def perform_seek_with_flow_stopped() -> None:
        consumer.stop_flow()
        await perform_seek()

    consumer.perform_seek = perform_seek_with_flow_stopped  # type: ignore[method-assign]


def create_app(
    config: StreamConfig,
    current_lookups: Callable[[], Lookups],
    metrics: StreamMetrics | None = None,
) -> faust.App:
    """The Faust app with the validate-and-enrich agent on the raw topic, which reads single
    events and batches alike. ``current_lookups`` is asked once a batch of messages, so a
    rotated key takes effect without a restart; ``metrics`` are counted as batches go."""
    metrics = metrics or new_stream_metrics()
    app = faust.App(
        config.app_id,
        broker=f"kafka://{config.bootstrap}",
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        datadir=config.state_dir,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=min(3.0, config.session_timeout_s / 3),
        broker_rebalance_timeout=config.session_timeout_s,
        topic_allow_declare=False,
        topic_disable_leader=True,
        producer_acks=-1,
        producer_compression_type=config.compression_type,
    )
    raw = app.topic(config.topics.raw, key_serializer="raw", value_serializer="raw")
    seek_uncommitted_partitions_to_their_start(app, config.topics.raw)
    stop_delivering_before_the_seek(app)
    enriched = app.topic(config.topics.enriched, key_serializer="raw", value_serializer="raw")
    dead = app.topic(config.topics.dead, key_serializer="raw", value_serializer="raw")
    destinations = {"enriched": enriched, "dead": dead}

    def changelogged_table(name: str, changelog: str) -> Any:
        """A table of raw bytes, partitioned like the raw topic, with a compacted changelog
        that ``tally topics`` declares."""
        return app.Table(
            name,
            partitions=config.partitions,
            changelog_topic=app.topic(
                changelog,
                partitions=config.partitions,
                key_serializer="raw",
                value_serializer="raw",
                compacting=True,
            ),
        )

    recent = RecentEventIds(int(config.dedupe_window_s * 1000), config.dedupe_max_ids)
    recent_table = changelogged_table("recent-event-ids", config.topics.recent_event_ids_changelog)
    sessions = OpenSessions(config.session_rules)
    sessions_table = changelogged_table("sessions", config.topics.sessions_changelog)
    recoveries = 0
    """Table recoveries completed: one at the start, then one after every rebalance."""
    indexed_after: int | None = None
    """The recovery ``recent`` and ``sessions`` were last rebuilt after. Once a recovery
    completes they are rebuilt from the recovered tables before the next batch or timer, so
    a worker that has no traffic still drops the sessions of partitions it gave up."""
    state_lock = asyncio.Lock()
    """Held while a batch or a timer changes the tables, so neither sees half of the other."""

    def owned_partitions() -> set[int]:
        return {
            tp.partition for tp in app.assignor.assigned_actives() if tp.topic == config.topics.raw
        }

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def count_recovery(sender: Any, *args: Any, **kwargs: Any) -> None:
        """Sent once the active tables hold their changelogs, before the streams resume."""
        nonlocal recoveries
        recoveries += 1

    def rebuild_after_recovery(now_ms: int) -> None:
        """Rebuild ``recent`` and ``sessions`` for the partitions owned now, once a recovery."""
        nonlocal indexed_after
        if indexed_after == recoveries:
            return
        owned = owned_partitions()
        recent.rebuild(recent_table.data.items(), owned)
        sessions.rebuild(sessions_table.data.items(), owned, now_ms)
        indexed_after = recoveries
        metrics.keep_lag_of(owned)
        log.info("tables recovered for partitions %s: %d recent event ids, %d sessions",
                 sorted(owned), len(recent), len(sessions))  # fmt: skip

    async def send_table_writes(table: Any, writes: list[TableWrite]) -> None:
        """Each write into the table's changelog, acknowledged by the broker.

        Not into ``table.data``: while it runs, the worker's state is ``recent`` and
        ``sessions``, and a second copy of every session as bytes took 156 MB at 20,000
        sessions (tracemalloc). ``table.data`` is read only after a recovery, which
        replays these writes into it: the memory store has no persisted offset, so a
        worker recovers from the changelog's start, and a rebalance from where its last
        recovery stopped (faust/tables/recovery.py, ``_build_offsets``)."""
        pending = []
        for write in writes:
            pending.append(
                await table.changelog_topic.send(
                    key=write.key, value=write.value, partition=write.partition
                )
            )
        await asyncio.gather(*pending)

    refusals = RefusalWatch(
        share=config.refusal_alarm_share,
        window_s=config.refusal_alarm_window_s,
        min_events=config.refusal_alarm_min_events,
    )

    async def send_joined(outcomes: list[Outcome]) -> list[Any]:
        """Send the outcomes' records joined (``outgoing_messages``); their futures."""
        futures = []
        for outgoing in outgoing_messages(outcomes):
            topic = destinations[outgoing.destination]
            futures.append(await topic.send(key=outgoing.key, value=outgoing.value))
        return futures

    def raw_highwater(partition: int) -> int | None:
        try:
            end: int | None = app.consumer.highwater(TP(config.topics.raw, partition))
        except Exception:  # no fetch yet, or a rebalance took the partition: no figure
            return None
        return end

    @app.agent(raw, name="validate_and_enrich")
    async def validate_and_enrich_agent(stream: Any) -> None:
        async for batch in stream.take_events(config.batch_size, within=config.batch_within_s):
            # Faust resumes the stream partitions, and may deliver messages, before it seeks
            # them back to the committed offsets when table recovery ends
            # (faust-streaming/faust#216): nothing is acknowledged before that seek, so no
            # offset is committed past messages the seek is about to deliver again.
            await app.tables.recovery.completed.wait()  # type: ignore[attr-defined]
            started = time.perf_counter()
            async with state_lock:
                now_ms = int(time.time() * 1000)
                rebuild_after_recovery(now_ms)
                leaving: list[Outcome] = []
                pending: list[Any] = []
                counted: list[ReasonCode | None] = []
                table_writes: list[TableWrite] = []
                summarized = 0
                lookups = current_lookups()
                positions: dict[int, int] = {}
                for event in batch:
                    message = event.message
                    positions[message.partition] = message.offset
                    origin = Origin(
                        message.topic,
                        message.partition,
                        message.offset,
                        int(message.timestamp * 1000),
                    )
                    recent.begin_message(message.partition, message.offset)
                    outcomes = outcomes_of_message(message.value, origin, lookups, recent)
                    outcomes, summaries = sessions.apply(outcomes, origin, now_ms)
                    counted.extend(o.reason if o.destination == "dead" else None for o in outcomes)
                    leaving.extend(outcomes)
                    leaving.extend(summary_outcome(summary) for summary in summaries)
                    summarized += len(summaries)
                    table_writes.extend(recent.remember(message.partition, message.offset, now_ms))
                    if len(leaving) >= MAX_HELD_RECORDS:
                        pending.extend(await send_joined(leaving))
                        leaving = []
                # Records leave joined, in order, in as few messages as the size bound allows.
                # Only once they are on the broker may the tables say the batch's events were
                # seen: a crash in between replays them, and nothing is lost.
                pending.extend(await send_joined(leaving))
                await asyncio.gather(*pending)
                await send_table_writes(recent_table, table_writes)
                await send_table_writes(sessions_table, sessions.take_writes())
                metrics.open_sessions.set(len(sessions))
                metrics.recent_event_ids.set(len(recent))
            metrics.batch_seconds.observe(time.perf_counter() - started)
            metrics.count_batch(len(batch), counted, summarized)
            metrics.record_positions(positions, raw_highwater)
            alarm = refusals.record(counted)
            metrics.dead_letter_limit_tripped.set(refusals.tripped)
            if alarm is not None:
                metrics.dead_letter_limit_trips.inc()
                log.error("dead-letter limit: %s", alarm.describe())
                if config.refusal_pause_s > 0:
                    # Reading nothing meanwhile: what comes waits in Kafka, not in the
                    # dead-letter topic (Faust stops fetching once its buffers are full).
                    log.error("dead-letter limit: reading paused for %.0f s",
                              config.refusal_pause_s)  # fmt: skip
                    await asyncio.sleep(config.refusal_pause_s)
                    log.warning("dead-letter limit: reading resumed")

    @app.timer(config.table_check_interval_s)  # type: ignore[untyped-decorator]
    async def close_silent_sessions_and_forget_old_ids() -> None:
        current_lookups()  # an idle worker destroys a past day's anonymous key on time too
        async with state_lock:
            if app.rebalancing or recoveries == 0:
                return  # the tables are being recovered: the sessions held may not be ours
            now_ms = int(time.time() * 1000)
            rebuild_after_recovery(now_ms)
            summaries = sessions.expire(now_ms)
            if summaries:
                outgoing = outgoing_messages([summary_outcome(s) for s in summaries])
                await asyncio.gather(
                    *[await enriched.send(key=o.key, value=o.value) for o in outgoing]
                )
                log.debug("%d silent sessions closed", len(summaries))
                metrics.session_summaries.inc(len(summaries))
            await send_table_writes(sessions_table, sessions.take_writes())
            await send_table_writes(recent_table, recent.expire(now_ms))

    return app
