"""Kafka topics: the only place where producers, streams and sinks meet."""

from dataclasses import dataclass

HOUR_MS = 3_600_000

RAW = "tally.events.raw"
ENRICHED = "tally.events.enriched"
DEAD = "tally.events.dead"
RECENT_EVENT_IDS_CHANGELOG = "tally.streams.recent-event-ids.changelog"
SESSIONS_CHANGELOG = "tally.streams.sessions.changelog"
"""The stream step's tables (compacted): ids seen lately and the open chat sessions."""

RAW_RETENTION_MS = 24 * HOUR_MS
"""The raw topic holds raw ids and IPs: keep it short (privacy statement, "Security")."""
ENRICHED_RETENTION_MS = 7 * 24 * HOUR_MS
DEAD_RETENTION_MS = 7 * 24 * HOUR_MS


@dataclass(frozen=True)
class TopicNames:
    """Topic names under an optional namespace, so tests and tenants never share a topic."""

    namespace: str = ""

    @property
    def raw(self) -> str:
        return self.namespace + RAW

    @property
    def enriched(self) -> str:
        return self.namespace + ENRICHED

    @property
    def dead(self) -> str:
        return self.namespace + DEAD

    @property
    def recent_event_ids_changelog(self) -> str:
        return self.namespace + RECENT_EVENT_IDS_CHANGELOG

    @property
    def sessions_changelog(self) -> str:
        return self.namespace + SESSIONS_CHANGELOG
