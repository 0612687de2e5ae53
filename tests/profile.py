"""Whether this test run is CI's: there a missing service fails, and properties run in full."""

import os

IN_CI = os.environ.get("CI") == "true"
