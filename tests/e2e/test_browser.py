"""The whole pipeline from a browser: `tally up` (with its collector), an app registered with
`tally apps add`, the demo call in Chromium sending through the browser SDK with the app's
write key, and ClickHouse holding the call's session and quality events, enriched (browser
and OS filled in), pseudonymized, with no IP address anywhere."""

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from deploy.services.ports import free_ports
from deploy.settings import Settings, load_settings
from deploy.wiring import open_reader
from schemas.enriched import enriched_fields, table_name
from sinks.backends import ClickHouseError
from tests.e2e.commands import start_tally_up, stop_and_wait, tally_environ
from tests.integration.test_browser_sdk import IPV4, IPV6, PAGE_TIMEOUT_MS, chromium

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

DEADLINE_S = 120.0
STOP_DEADLINE_S = 60.0
APP_ID = "demo.web"
PSEUDONYM = re.compile(r"^[0-9a-f]{64}$")


def poll(condition: Callable[[], Any], what: str, up: subprocess.Popen[bytes]) -> Any:
    """The first truthy value of ``condition``, polled until the deadline while `tally up`
    runs."""
    deadline = time.monotonic() + DEADLINE_S
    while not (found := condition()):
        assert up.poll() is None, f"tally up exited with {up.returncode} waiting until {what}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)
    return found


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def rows(settings: Settings, event_type: str) -> list[dict[str, Any]]:
    """The demo app's rows of one type, as column -> value; [] while the sink does not
    answer."""
    columns = enriched_fields(event_type)
    try:
        backend = open_reader(settings)
    except ClickHouseError:
        return []
    try:
        found = backend.query(
            f"SELECT {', '.join(columns)} FROM {table_name(event_type)} "
            f"WHERE app_id = '{APP_ID}' ORDER BY event_time"
        )
    except ClickHouseError:
        return []
    finally:
        backend.close()
    return [dict(zip(columns, row, strict=True)) for row in found]


def test_a_browser_call_reaches_clickhouse_enriched_and_pseudonymized(state_dir: Path) -> None:
    """A call in Chromium against `tally up`'s collector, with a write key from `tally apps
    add`: ClickHouse gets its session_start, several quality samples and a normal
    session_end under one session pseudonym, with browser and OS filled in, the user and
    session ids pseudonymized (never raw), no ip column and no IP address in any value;
    SIGINT then stops `tally up` with status 0."""
    port = free_ports(1)[0]
    environ = tally_environ(
        state_dir, TALLY_SINK_BATCH_INTERVAL_S="0.3", TALLY_COLLECTOR_PORT=str(port)
    )
    settings = load_settings(environ)
    origin = f"http://127.0.0.1:{port}"
    up, output = start_tally_up(state_dir, environ)
    user_id = f"u-e2e-{uuid.uuid4().hex[:10]}"
    try:
        poll(lambda: "tally up: running" in output.read_text(), "it runs", up)
        added = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "apps", "add", APP_ID, "--origin", origin,
             "--json"], env=environ, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert added.returncode == 0, added.stdout + added.stderr
        keys = orjson.loads(added.stdout)
        assert keys["app_id"] == APP_ID
        poll(lambda: answers(f"{origin}/readyz"), "the collector is ready", up)
        query = urllib.parse.urlencode(
            {"key": keys["write_key"], "app": APP_ID, "interval": "1000", "flush": "500",
             "user": user_id}
        )  # fmt: skip

        with chromium() as browser:
            context = browser.new_context(bypass_csp=True)  # wait_for_function needs eval
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = context.new_page()
            page.goto(f"{origin}/demo?{query}")
            page.wait_for_function("() => document.body.dataset.state === 'connected'")
            session_id = page.evaluate("() => window.demo.sessionId")
            # client_info, login, session_start and three samples accepted; a refused key
            # would count every event as rejected instead.
            page.wait_for_function(
                "() => window.demo.tally.sentEvents >= 6 || window.demo.tally.rejectedEvents"
            )
            assert page.evaluate("() => window.demo.tally.rejectedEvents") == 0
            assert page.evaluate("() => window.demo.endCall()") is True

        ended = poll(lambda: rows(settings, "session_end"), "the session_end is stored", up)
        starts = rows(settings, "session_start")
        samples = rows(settings, "quality_sample")
    finally:
        stop_and_wait(up, signal.SIGINT, STOP_DEADLINE_S)
    log = output.read_text()
    assert up.returncode == 0, log[-3000:]

    assert [r["end_reason"] for r in ended] == ["normal"]
    assert len(starts) == 1 and len(samples) >= 3
    (session,) = {r["session_pseudonym"] for r in (*starts, *samples, *ended)}
    assert PSEUDONYM.match(session)
    (user,) = {r["user_pseudonym"] for r in (*starts, *samples, *ended)}
    assert PSEUDONYM.match(user)
    for sample in samples:
        assert sample["schema_version"] == 2 and sample["codec"] in ("vp8", "vp9", "h264", "av1")
        assert 0 <= sample["rtt_ms"] < 1000 and sample["resolution_class"] == "480p"
    assert "ip" not in enriched_fields("quality_sample")
    for row in (*starts, *samples, *ended):
        assert row["browser_family"] and row["os_family"] == "Linux", row
        assert row["consent"] == "full" and row["referrer_domain"] == ""
        for text in (value for value in row.values() if isinstance(value, str)):
            assert session_id not in text and user_id not in text, row
            assert not IPV4.search(text) and not IPV6.search(text), row
