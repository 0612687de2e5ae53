"""Pytest plugin: one real Kafka broker per test session, for tests marked ``kafka``.

Loaded from tests/conftest.py through ``pytest_plugins``. The broker keeps its state in
``<repo>/.tally/test/kafka-state`` on ports taken free when it starts, away from a development
broker and from another checkout's; a broker already running from that folder is reused, and
the last test session using a broker that tests started stops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka import KafkaBroker, KafkaStartError, running_kafka, start_kafka, stop_kafka
from deploy.services.ports import free_ports
from tests.services import service_unavailable, shared_between_sessions

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_STATE_DIR = REPO_ROOT / ".tally" / "test" / "kafka-state"
KAFKA_JARS_DIR = REPO_ROOT / ".tally" / "kafka-jars"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the broker ``kafka``, so ``-m "not kafka"`` deselects it."""
    for item in items:
        if {"kafka_bootstrap", "kafka_broker"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


def _start_on_free_ports() -> KafkaBroker:
    port, controller_port = free_ports(2)
    try:
        return start_kafka(
            KAFKA_STATE_DIR, KAFKA_JARS_DIR, port=port, controller_port=controller_port
        )
    except KafkaStartError as exc:
        service_unavailable(f"Kafka broker did not start: {exc}")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """The session's broker (shared with concurrent sessions on this checkout)."""
    with shared_between_sessions(
        KAFKA_STATE_DIR,
        running=lambda: running_kafka(KAFKA_STATE_DIR),
        start=_start_on_free_ports,
        stop=lambda: stop_kafka(KAFKA_STATE_DIR),
    ) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """Bootstrap address of the session's broker."""
    return kafka_broker.bootstrap
