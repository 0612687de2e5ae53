"""The Faust app and its one agent. The only module that creates a Faust app.

Delivery: ``take_events`` acks a batch only after the loop body returns, and Faust flushes
the producer before it commits offsets (faust/transport/consumer.py, ``_commit_offsets``),
so an offset of the raw topic is committed only once every enriched or dead-letter message
it gave (one per event of a batch) is on the broker. A crash replays at most the uncommitted
batch (at-least-once); the sink's writes are idempotent by event id.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust

from schemas.reasons import ReasonCode
from schemas.topics import TopicNames
from streams.dedupe import RecentEventIds
from streams.enrich import Lookups
from streams.refusals import RefusalWatch
from streams.steps import Origin, outcomes_of_message

log = logging.getLogger(__name__)


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


def create_app(config: StreamConfig, current_lookups: Callable[[], Lookups]) -> faust.App:
    """The Faust app with the validate-and-enrich agent on the raw topic, which reads single
    events and batches alike. ``current_lookups`` is asked once a batch of messages, so a
    rotated key takes effect without a restart."""
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
    enriched = app.topic(config.topics.enriched, key_serializer="raw", value_serializer="raw")
    dead = app.topic(config.topics.dead, key_serializer="raw", value_serializer="raw")
    destinations = {"enriched": enriched, "dead": dead}
    recent = RecentEventIds()
    refusals = RefusalWatch(
        share=config.refusal_alarm_share,
        window_s=config.refusal_alarm_window_s,
        min_events=config.refusal_alarm_min_events,
    )

    @app.agent(raw, name="validate_and_enrich")
    async def validate_and_enrich_agent(stream: Any) -> None:
        async for batch in stream.take_events(config.batch_size, within=config.batch_within_s):
            pending = []
            reasons: list[ReasonCode | None] = []
            lookups = current_lookups()
            for event in batch:
                message = event.message
                origin = Origin(
                    message.topic,
                    message.partition,
                    message.offset,
                    int(message.timestamp * 1000),
                )
                for outcome in outcomes_of_message(message.value, origin, lookups, recent):
                    topic = destinations[outcome.destination]
                    pending.append(await topic.send(key=outcome.key, value=outcome.value))
                    reasons.append(outcome.reason if outcome.destination == "dead" else None)
            await asyncio.gather(*pending)
            alarm = refusals.record(reasons)
            if alarm is not None:
                log.error("dead-letter limit: %s", alarm.describe())

    return app
