"""Pytest plugin: one real Kafka broker per test session, for tests marked ``kafka``.

Loaded from tests/conftest.py through ``pytest_plugins``. The broker keeps its state in
``<repo>/.tally/test/kafka-state`` on ports 19092/19093, away from a development broker on the
default ports; a broker left running by an earlier session is reused and left running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka import KafkaBroker, KafkaStartError, running_kafka, start_kafka, stop_kafka

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_STATE_DIR = REPO_ROOT / ".tally" / "test" / "kafka-state"
KAFKA_JARS_DIR = REPO_ROOT / ".tally" / "kafka-jars"
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093

# In CI a missing service must fail the run; locally a machine without Java may skip.
_IN_CI = os.environ.get("CI", "").strip().lower() == "true"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the broker ``kafka``, so ``-m "not kafka"`` deselects it."""
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


def _start_session_broker() -> KafkaBroker | str:
    """The session's broker, or why it could not start."""
    try:
        return start_kafka(
            KAFKA_STATE_DIR,
            KAFKA_JARS_DIR,
            port=KAFKA_PORT,
            controller_port=KAFKA_CONTROLLER_PORT,
        )
    except KafkaStartError as exc:
        return f"Kafka broker did not start: {exc}"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the session's broker, stopped at the end if this session started it."""
    started_here = running_kafka(KAFKA_STATE_DIR) is None
    broker = _start_session_broker()
    if isinstance(broker, str):
        if _IN_CI:
            pytest.fail(broker, pytrace=False)
        pytest.skip(broker)
    yield broker.bootstrap
    if started_here:
        stop_kafka(KAFKA_STATE_DIR)
