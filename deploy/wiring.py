"""The composition root: turns settings into the parts each stage takes, and nothing else."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from deploy.daily_keys import DailyKeyError, DailyKeyStore
from deploy.kafka import TopicSpec
from deploy.keys import KeyRingError, file_signature, read_key_ring
from deploy.settings import Settings, SettingsError
from schemas import topics
from schemas.topics import TopicNames
from streams.app import StreamConfig
from streams.enrich import GeoLookup, Lookups
from streams.pseudonymize import Pseudonymizer
from streams.quality import QualityThresholds
from streams.sessions import SessionRules

if TYPE_CHECKING:  # each stage's process imports only its own stage (worker memory)
    from producers.collector.app import CollectorConfig
    from producers.collector.apps import AppRegistry
    from producers.collector.kafka import KafkaBatchProducer
    from sinks.backends import ClickHouseBackend
    from sinks.consumer import SinkConfig

log = logging.getLogger(__name__)

KEY_RING_CHECK_INTERVAL_S: Final = 5.0
"""How often a worker looks whether its key ring file changed."""


def topic_names(settings: Settings) -> TopicNames:
    return TopicNames(settings.topic_namespace)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics Tally declares, with partitions and retention (schemas.topics)."""
    names = topic_names(settings)
    raw_retention = int(settings.raw_retention_hours * topics.HOUR_MS)
    return [
        TopicSpec(names.raw, settings.raw_partitions, raw_retention),
        TopicSpec(names.enriched, settings.raw_partitions, topics.ENRICHED_RETENTION_MS),
        TopicSpec(names.dead, 1, topics.DEAD_RETENTION_MS),
        TopicSpec(names.recent_event_ids_changelog, settings.raw_partitions, None, compacted=True),
        TopicSpec(names.sessions_changelog, settings.raw_partitions, None, compacted=True),
    ]


def kafka_jars_dir(settings: Settings) -> Path:
    return settings.kafka_jars_dir or settings.state_dir / "kafka-jars"


def open_backend(settings: Settings) -> ClickHouseBackend:
    """The configured ClickHouse: embedded under the state folder, or a server."""
    from sinks.backends import EmbeddedClickHouse, ServerClickHouse

    if settings.clickhouse_backend == "server":
        return ServerClickHouse(
            settings.clickhouse_host,
            settings.clickhouse_port,
            user=settings.clickhouse_user,
            password=settings.clickhouse_secret().reveal(),
            database=settings.clickhouse_database,
        )
    return EmbeddedClickHouse(settings.state_dir / "clickhouse", settings.clickhouse_database)


def user_pseudonyms(settings: Settings, user_id: str) -> list[str]:
    """The pseudonyms of a user id under every live key of the ring (``full`` consent). Daily
    keys of ``anonymous`` consent are not used: their pseudonyms are unlinkable by design."""
    from schemas.consent import Consent

    return [
        Pseudonymizer(key).pseudonymize_id(user_id, Consent.FULL, "")
        for key in settings.hmac_keys()
    ]


def serve_metrics(registry: Any, host: str, port: int, setting: str) -> None:
    """Serve a registry's ``/metrics`` (Prometheus) on a thread of its own; a port that cannot
    be bound stops the service with one line naming the setting."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, host, registry)
    except OSError as err:
        raise SettingsError(
            f"{setting}: cannot serve metrics on {host}:{port}: {err.strerror}"
        ) from None
    log.info("metrics on http://%s:%d/metrics", host, port)


def query_service_file(settings: Settings) -> Path:
    """Where a sink that owns embedded ClickHouse says how to query through it (mode 0600)."""
    return settings.state_dir / "run" / "query-service.json"


def open_reader(settings: Settings) -> ClickHouseBackend:
    """ClickHouse to read from: the server; or embedded, through the sink process that owns
    it while `tally up` or `tally sink` runs, else opened here.

    Raises EmbeddedInUseError when a process owns embedded ClickHouse but does not answer
    (a sink starting or restarting): try again shortly.
    """
    if settings.clickhouse_backend == "embedded":
        remote = _through_the_sink(settings)
        if remote is not None:
            return remote
    return open_backend(settings)


def open_shared_reader(settings: Settings) -> ClickHouseBackend:
    """Like ``open_reader``, but never opens embedded ClickHouse itself (that would lock the
    sink out of its folder): raises EmbeddedInUseError until the sink's query service
    answers."""
    from sinks.backends import EmbeddedInUseError

    if settings.clickhouse_backend != "embedded":
        return open_backend(settings)
    remote = _through_the_sink(settings)
    if remote is None:
        raise EmbeddedInUseError(None, "the sink's query service is not answering yet")
    return remote


def _through_the_sink(settings: Settings) -> ClickHouseBackend | None:
    """The sink's query service over embedded ClickHouse, if it runs and answers."""
    from sinks.query_service import RemoteClickHouse

    with contextlib.suppress(OSError, orjson.JSONDecodeError, KeyError):
        found = orjson.loads(query_service_file(settings).read_bytes())
        remote = RemoteClickHouse(found["url"], found["token"], settings.clickhouse_database)
        if remote.answers():
            return remote
    return None


def open_writer(settings: Settings, *, wait_s: float = 30.0) -> ClickHouseBackend:
    """ClickHouse for a long-running writer: like ``open_backend``, but on embedded it waits
    up to ``wait_s`` for a reader that has the folder open (`tally report`) to let go."""
    from sinks.backends import EmbeddedClickHouse

    if settings.clickhouse_backend == "embedded":
        return EmbeddedClickHouse(
            settings.state_dir / "clickhouse", settings.clickhouse_database, wait_s=wait_s
        )
    return open_backend(settings)


class CurrentLookups:
    """The stream step's lookups, with the key ring read again when its file changes (looked
    at at most every ``check_interval_s``), so `tally keys rotate` and `tally keys destroy`
    reach a running worker without a restart. A ring that turns unreadable keeps the last
    one in use, with a warning; the worker never stops for it.

    ``anonymous`` consent takes its keys from the daily key store (deploy/daily_keys.py),
    whose days past lateness are destroyed on start and at each of these checks: by
    whichever worker comes first, the others then take up the new file."""

    def __init__(
        self,
        settings: Settings,
        *,
        check_interval_s: float = KEY_RING_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._geo = GeoLookup(settings.geoip_path)
        self._interval = check_interval_s
        self._clock = clock
        self._watched = settings.hmac_key is None
        self._signature = file_signature(settings.hmac_key_path) if self._watched else None
        self._active = settings.hmac_keys()[0]
        self._active_created_s = self._ring_created_s() if self._watched else None
        self._wall_clock = wall_clock
        try:
            self._daily = DailyKeyStore(
                settings.daily_keys_path, settings.allowed_lateness_s, clock=wall_clock
            )
        except DailyKeyError as err:
            raise SettingsError(f"TALLY_DAILY_KEYS_FILE: {err}") from None
        self._daily_problem = ""
        self._destroy_finished_days()
        self._lookups = self._build()
        self._next_check = clock() + check_interval_s

    def _build(self) -> Lookups:
        pseudonymizer = Pseudonymizer(self._active, self._daily.key_for)
        self._built_generation = self._daily.generation
        return Lookups(
            pseudonymize_id=pseudonymizer.pseudonymize_id,
            key_id=self._active.key_id,
            locate=self._geo.locate,
            anonymous_key_id=pseudonymizer.anonymous_key_id,
        )

    def __call__(self) -> Lookups:
        if self._clock() < self._next_check:
            return self._lookups
        self._next_check = self._clock() + self._interval
        self._destroy_finished_days()
        if self._watched:
            self._reload_ring()
        if self._daily.generation != self._built_generation:
            self._lookups = self._build()
        return self._lookups

    def _reload_ring(self) -> None:
        path = self._settings.hmac_key_path
        signature = file_signature(path)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            active = read_key_ring(path)[0].key
        except KeyRingError as err:
            log.warning("key ring not reloaded, keeping key %s: %s", self._active.key_id, err)
            return
        if active.key_id != self._active.key_id:
            log.info("key ring reloaded: new events are pseudonymized with %s", active.key_id)
        self._active = active
        self._active_created_s = self._ring_created_s()
        self._lookups = self._build()

    def _ring_created_s(self) -> float | None:
        try:
            created = read_key_ring(self._settings.hmac_key_path)[0].created_s
        except KeyRingError:
            return None
        return None if created is None else float(created)

    def active_key_age_s(self) -> float:
        """How old the active key is (NaN when its ring line has no creation time): an alert
        can ask for a rotation."""
        if self._active_created_s is None:
            return float("nan")
        return self._wall_clock() - self._active_created_s

    def _destroy_finished_days(self) -> None:
        """Destroy the anonymous keys of days past lateness; a failure is logged once (until
        it changes) and tried again at the next check."""
        try:
            destroyed = self._daily.destroy_expired()
        except (OSError, DailyKeyError) as err:
            problem = str(err)
            if problem != self._daily_problem:
                log.error("daily keys not checked for days to destroy: %s", problem)
            self._daily_problem = problem
            return
        self._daily_problem = ""
        if destroyed:
            log.info(
                "destroyed the anonymous keys of %s: those days' pseudonyms can no longer be"
                " linked to anyone",
                ", ".join(destroyed),
            )


def stream_config(settings: Settings, bootstrap: str) -> StreamConfig:
    return StreamConfig(
        bootstrap=bootstrap,
        topics=topic_names(settings),
        app_id=f"{settings.topic_namespace}tally-streams",
        batch_size=settings.stream_batch_size,
        partitions=settings.raw_partitions,
        dedupe_window_s=settings.dedupe_window_s,
        dedupe_max_ids=settings.dedupe_max_ids,
        session_rules=SessionRules(
            silence_timeout_s=settings.session_silence_timeout_s,
            allowed_lateness_s=settings.allowed_lateness_s,
            thresholds=QualityThresholds(
                poor_rtt_ms=settings.quality_poor_rtt_ms,
                poor_jitter_ms=settings.quality_poor_jitter_ms,
                poor_loss_pct=settings.quality_poor_loss_pct,
                fair_rtt_ms=settings.quality_fair_rtt_ms,
                fair_jitter_ms=settings.quality_fair_jitter_ms,
                fair_loss_pct=settings.quality_fair_loss_pct,
            ),
        ),
        refusal_alarm_share=settings.dead_letter_alarm_share,
        refusal_alarm_window_s=settings.dead_letter_alarm_window_s,
        refusal_alarm_min_events=settings.dead_letter_alarm_min_events,
        refusal_pause_s=settings.dead_letter_alarm_pause_s,
        session_timeout_s=settings.session_timeout_s,
        state_dir=str(settings.state_dir / "faust"),
        compression_type=settings.kafka_compression_type,
    )


def sink_config(settings: Settings, bootstrap: str) -> SinkConfig:
    from sinks.consumer import SinkConfig

    return SinkConfig(
        bootstrap=bootstrap,
        topics=topic_names(settings),
        group_id=f"{settings.topic_namespace}tally-sink-{settings.clickhouse_backend}",
        batch_size=settings.sink_batch_size,
        batch_interval_s=settings.sink_batch_interval_s,
        compression_type=settings.kafka_compression_type,
    )


def collector_config(settings: Settings) -> CollectorConfig:
    from producers.collector.app import CollectorConfig
    from producers.collector.limits import RateLimit

    return CollectorConfig(
        host=settings.collector_host,
        port=settings.collector_port,
        max_body_bytes=settings.collector_max_body_bytes,
        max_events=settings.collector_max_events,
        trusted_proxies=settings.collector_trusted_networks,
        write_key_rate=RateLimit(settings.collector_rate_per_key, settings.collector_rate_burst),
        secret_key_rate=RateLimit(
            settings.collector_secret_rate_per_key, settings.collector_secret_rate_burst
        ),
        max_pending_events=settings.collector_max_pending_events,
    )


def collector_apps(settings: Settings) -> AppRegistry:
    """The apps registry as the running collector reads it (re-read when it changes);
    SettingsError naming the file when it is not a registry."""
    from producers.collector.apps import AppRegistry, AppsError

    try:
        return AppRegistry(settings.collector_apps_path)
    except AppsError as err:
        raise SettingsError(f"TALLY_COLLECTOR_APPS_FILE: {err}") from None


def collector_producer(settings: Settings, bootstrap: str) -> KafkaBatchProducer:
    """The collector's producer onto the raw topic, with the configured codec."""
    from producers.collector.kafka import KafkaBatchProducer

    return KafkaBatchProducer(
        bootstrap,
        topic_names(settings).raw,
        compression_type=settings.kafka_compression_type,
        timeout_s=settings.collector_produce_timeout_s,
    )
