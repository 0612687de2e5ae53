"""ensure_topics holds topics that already exist to their spec, as the broker reports them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from deploy.kafka import TopicMismatchError, TopicSpec, ensure_topics

pytestmark = pytest.mark.kafka

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
SPEC_RETENTION_MS = DAY_MS
BROKER_DEFAULT_RETENTION_MS = 7 * DAY_MS


def _unique_name(kind: str) -> str:
    return f"tally.test.{kind}.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        yield client
    finally:
        client.close()


def _create_by_hand(
    admin: KafkaAdminClient, name: str, partitions: int = 1, **configs: str
) -> None:
    """Create a topic as an operator or another tool would, bypassing ensure_topics."""
    request = {
        "num_partitions": partitions,
        "replication_factor": 1,
        "configs": {key.replace("_", "."): value for key, value in configs.items()},
    }
    admin.create_topics({name: request})
    admin.wait_for_topics([name], timeout_ms=30_000)


def _described(admin: KafkaAdminClient, name: str) -> dict[str, Any]:
    """The topic's effective configs and partition count, as the broker describes them now."""
    configs = admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name)], config_filter="all"
    )["topic"][name]
    (topic,) = admin.describe_topics([name])
    return {
        "retention.ms": int(configs["retention.ms"]["value"]),
        "retention.source": configs["retention.ms"]["config_source"],
        "cleanup.policy": configs["cleanup.policy"]["value"],
        "max.message.bytes": configs["max.message.bytes"]["value"],
        "segment.ms": int(configs["segment.ms"]["value"]),
        "partitions": len(topic["partitions"]),
    }


def test_longer_retention_is_lowered_to_the_spec(
    kafka_bootstrap: str, admin: KafkaAdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Topics keeping records for the broker default (7 d), 30 d or forever end at the spec,
    with segments of a 24th of it, so an expired record does not wait a week for deletion."""
    caplog.set_level(logging.INFO, logger="deploy.topics")
    default, month, forever = (_unique_name(kind) for kind in ("default", "month", "forever"))
    _create_by_hand(admin, default)
    _create_by_hand(admin, month, retention_ms=str(30 * DAY_MS), max_message_bytes="2000000")
    _create_by_hand(admin, forever, retention_ms="-1")
    before = _described(admin, default)
    assert before["retention.ms"] == BROKER_DEFAULT_RETENTION_MS
    assert before["retention.source"] == "DEFAULT_CONFIG"

    ensure_topics(
        kafka_bootstrap, [TopicSpec(t, 1, SPEC_RETENTION_MS) for t in (default, month, forever)]
    )

    for name in (default, month, forever):
        after = _described(admin, name)
        assert after["retention.ms"] == SPEC_RETENTION_MS
        assert after["retention.source"] == "DYNAMIC_TOPIC_CONFIG"
        assert after["cleanup.policy"] == "delete"
        assert after["segment.ms"] == HOUR_MS
    assert _described(admin, month)["max.message.bytes"] == "2000000"  # the alter was incremental
    assert (
        f"topic {default}: lowered retention.ms=604800000 (7 d, the broker default)" in caplog.text
    )
    assert f"topic {month}: lowered retention.ms=2592000000 (30 d, set on the topic)" in caplog.text
    assert f"topic {forever}: lowered retention.ms=-1 (forever, set on the topic)" in caplog.text
    assert "to 86400000 (24 h, its spec)" in caplog.text


def test_shorter_retention_and_more_partitions_are_kept(
    kafka_bootstrap: str, admin: KafkaAdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic keeping records for less than its spec, on more partitions, keeps both; only
    its week-long segments are shortened, which otherwise keep records past the spec."""
    caplog.set_level(logging.INFO, logger="deploy.topics")
    name = _unique_name("shorter")
    _create_by_hand(admin, name, partitions=3, retention_ms=str(HOUR_MS))

    ensure_topics(kafka_bootstrap, [TopicSpec(name, 2, SPEC_RETENTION_MS)])

    after = _described(admin, name)
    assert after["retention.ms"] == HOUR_MS
    assert after["partitions"] == 3
    assert after["segment.ms"] == HOUR_MS
    assert f"topic {name}: lowered retention.ms" not in caplog.text
    assert f"topic {name}: lowered segment.ms from 7 d to 1 h" in caplog.text
    assert f"topic {name} has 3 partitions, more than the 2 of its spec" in caplog.text


def test_spec_without_limit_leaves_retention_alone(
    kafka_bootstrap: str, admin: KafkaAdminClient
) -> None:
    """A spec keeping the broker default (None) or forever (-1) lowers no topic's retention."""
    default, forever = _unique_name("default"), _unique_name("forever")
    _create_by_hand(admin, default, retention_ms=str(30 * DAY_MS))
    _create_by_hand(admin, forever, retention_ms="-1")

    ensure_topics(kafka_bootstrap, [TopicSpec(default, 1, None), TopicSpec(forever, 1, -1)])

    assert _described(admin, default)["retention.ms"] == 30 * DAY_MS
    assert _described(admin, forever)["retention.ms"] == -1


def test_a_table_changelog_is_created_compacted_and_left_so(
    kafka_bootstrap: str, admin: KafkaAdminClient
) -> None:
    """A changelog keeps each key's newest state (compaction), not a time window: it is
    created so, and checking it again changes nothing."""
    name = _unique_name("changelog")
    spec = TopicSpec(name, 2, None, compacted=True)
    ensure_topics(kafka_bootstrap, [spec])
    ensure_topics(kafka_bootstrap, [spec])
    described = _described(admin, name)
    assert (described["cleanup.policy"], described["partitions"]) == ("compact", 2)


def test_fewer_partitions_refuse_in_one_line(kafka_bootstrap: str, admin: KafkaAdminClient) -> None:
    """Too few partitions raise one line naming the topic; its retention is lowered first."""
    name = _unique_name("narrow")
    _create_by_hand(admin, name, partitions=1)

    with pytest.raises(TopicMismatchError) as raised:
        ensure_topics(kafka_bootstrap, [TopicSpec(name, 3, SPEC_RETENTION_MS)])

    message = str(raised.value)
    assert "\n" not in message
    assert f"topic {name} has 1 partition, fewer than the 3 its spec asks for" in message
    assert f"--alter --topic {name} --partitions 3" in message
    after = _described(admin, name)
    assert after["partitions"] == 1
    assert after["retention.ms"] == SPEC_RETENTION_MS


def test_compacted_topic_is_set_to_delete_by_time(
    kafka_bootstrap: str, admin: KafkaAdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A compact-only topic is set to delete; a compact,delete one keeps its policy."""
    caplog.set_level(logging.INFO, logger="deploy.topics")
    compacted, both = _unique_name("compacted"), _unique_name("compact-delete")
    _create_by_hand(admin, compacted, cleanup_policy="compact")
    _create_by_hand(admin, both, cleanup_policy="compact,delete", retention_ms=str(30 * DAY_MS))

    ensure_topics(
        kafka_bootstrap,
        [TopicSpec(compacted, 1, SPEC_RETENTION_MS), TopicSpec(both, 1, SPEC_RETENTION_MS)],
    )

    after = _described(admin, compacted)
    assert after["cleanup.policy"] == "delete"
    assert after["retention.ms"] == SPEC_RETENTION_MS
    assert f"topic {compacted}: set cleanup.policy from 'compact' to 'delete'" in caplog.text
    after = _described(admin, both)
    assert after["cleanup.policy"] == "compact,delete"
    assert after["retention.ms"] == SPEC_RETENTION_MS


def test_refused_correction_refuses_to_start(
    kafka_bootstrap: str, admin: KafkaAdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An alter the cluster refuses raises one line naming the topic; the topic is unchanged."""
    name = _unique_name("refused")
    _create_by_hand(admin, name)

    def refuse(self: KafkaAdminClient, resources: list[ConfigResource], **_: object) -> object:
        return {
            "topic": {
                resource.name: "[Error 29] TopicAuthorizationFailedError: not authorized"
                for resource in resources
            }
        }

    monkeypatch.setattr(KafkaAdminClient, "alter_configs", refuse)
    with pytest.raises(TopicMismatchError) as raised:
        ensure_topics(kafka_bootstrap, [TopicSpec(name, 1, SPEC_RETENTION_MS)])
    monkeypatch.undo()

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        f"topic {name} has retention.ms=604800000 (7 d, the broker default), longer than the "
        "24 h its spec allows, and the cluster refused to correct it "
        "([Error 29] TopicAuthorizationFailedError: not authorized); set retention.ms=86400000"
    )
    assert _described(admin, name)["retention.ms"] == BROKER_DEFAULT_RETENTION_MS


def test_tally_topics_creates_the_topics_to_spec_on_an_existing_cluster(
    kafka_bootstrap: str, admin: KafkaAdminClient
) -> None:
    """`tally topics` on a configured cluster makes raw, enriched and dead to their spec (raw:
    24 h) and says so; run again, it changes nothing and succeeds."""
    namespace = f"cli{uuid.uuid4().hex[:8]}."
    env = {**os.environ, "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "TALLY_TOPIC_NAMESPACE": namespace}  # fmt: skip
    for _ in range(2):
        run = subprocess.run([sys.executable, "-m", "deploy.cli", "topics"], env=env,
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert f"{namespace}tally.events.raw: 4 partitions, retention.ms 86400000" in run.stdout
    raw = _described(admin, f"{namespace}tally.events.raw")
    assert (raw["retention.ms"], raw["partitions"], raw["segment.ms"]) == (DAY_MS, 4, HOUR_MS)
