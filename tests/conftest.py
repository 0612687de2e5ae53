import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from deploy import interrupts
from tests.profile import IN_CI

pytest_plugins = ["tests.kafka_fixtures", "tests.clickhouse_fixtures"]

# CI runs every property test at its full count (over 10,000 cases in all); a developer's
# quick run takes a tenth of each.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("ci" if IN_CI else "dev")


@pytest.fixture
def handlers() -> Iterator[None]:
    """SIGINT and SIGTERM routed through deploy.interrupts, as in a command; restored after."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts._state = interrupts._State()
    interrupts.install_interrupt_handlers()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    interrupts._state = interrupts._State()
