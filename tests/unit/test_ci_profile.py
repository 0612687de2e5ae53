"""CI is recognised one way, everywhere: a missing service fails and properties run in full."""

import re
from pathlib import Path

import pytest

from tests.profile import ci_from_environ

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("value", "in_ci"),
    [("true", True), ("1", True), ("TRUE", True), (" yes ", True), ("on", True),
     ("", False), ("0", False), ("false", False), ("no", False)],
)  # fmt: skip
def test_ci_words(value: str, in_ci: bool):
    """CI=1 and CI=true both mean CI, in any case; 0, false and unset do not."""
    assert ci_from_environ({"CI": value}) is in_ci
    assert ci_from_environ({}) is False


def test_only_the_profile_reads_the_ci_variable():
    """No fixture or strategy reads CI itself, so none can disagree with tests/profile.py."""
    readers = [
        path.relative_to(TESTS).as_posix()
        for path in TESTS.rglob("*.py")
        if re.search(r"""environ(\.get)?\(?\[?["']CI["']""", path.read_text())
    ]
    assert readers == ["profile.py"]
