from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.commands import kill_leftovers


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state folder of the test's own; whatever was started for it is killed afterwards."""
    state = tmp_path / "state"
    yield state
    kill_leftovers(state)
