"""Whether this test run is CI's: there a missing service fails, and properties run in full.

The one definition every fixture and strategy uses, so ``CI=1`` and ``CI=true`` mean the same.
"""

import os
from collections.abc import Mapping

_TRUE = frozenset({"1", "true", "yes", "on"})


def ci_from_environ(environ: Mapping[str, str]) -> bool:
    """CI is on when ``CI`` is set to a true-ish word, in any case, as CI systems set it."""
    return environ.get("CI", "").strip().lower() in _TRUE


IN_CI = ci_from_environ(os.environ)
