"""The built-in dashboard as an SRE opens it: `tally up` on embedded ClickHouse after a
workload, the page in headless Chromium with every chart drawn from data, a filter applied,
auto-refresh running, no request to any host but the dashboard's own, and a screenshot
(docs/dashboard.png is one of these)."""

import signal
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from deploy.dashboard.pipeline import samples
from deploy.services.ports import free_ports
from deploy.settings import load_settings
from deploy.wiring import open_reader, topic_names
from producers.sdk import TallyProducer
from producers.workload import generate_workload
from sinks.backends import ClickHouseError
from tests.e2e.commands import start_tally_up, stop_and_wait, tally_environ
from tests.e2e.test_tally_up import poll, stored
from tests.integration.test_browser_sdk import PAGE_TIMEOUT_MS, chromium

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

STOP_DEADLINE_S = 60.0
SPAN_MS = 5 * 3600 * 1000
"""Five hours of client time, so the charts have several hourly points."""


def scraped(url: str) -> list[tuple[str, float]]:
    """A /metrics page's samples as ``name{labels}`` and value."""
    with urllib.request.urlopen(url, timeout=10) as page:
        return [
            (name + (str(sorted(labels.items())) if labels else ""), value)
            for name, labels, value in samples(page.read().decode())
        ]


def rollups_filled(environ: dict[str, str]) -> bool:
    try:
        backend = open_reader(load_settings(environ))
    except ClickHouseError:
        return False
    try:
        counts = [
            backend.query(f"SELECT count() FROM analyst_{name}_hourly")[0][0]
            for name in ("logins", "sessions", "clients")
        ]
        return all(counts)
    except ClickHouseError:
        return False
    finally:
        backend.close()


def test_the_dashboard_draws_every_chart_from_this_run(state_dir: Path) -> None:
    worker_port, sink_port = free_ports(2)
    environ = tally_environ(
        state_dir, TALLY_SINK_BATCH_INTERVAL_S="0.3", TALLY_WORKER_METRICS_PORT=str(worker_port),
        TALLY_SINK_METRICS_PORT=str(sink_port), TALLY_ALLOWED_LATENESS_S="43200",
        TALLY_ANALYST_MIN_USERS="5",
    )  # fmt: skip
    settings = load_settings(environ)
    origin = f"http://127.0.0.1:{settings.dashboard_port}"
    up, output = start_tally_up(state_dir, environ)
    screenshot = state_dir.parent / "dashboard.png"
    try:
        poll(lambda: "tally up: running" in output.read_text(), "it runs", up)
        events = generate_workload(
            seed=11, clients=400, events=4000, end_ms=int(time.time() * 1000), span_ms=SPAN_MS
        )
        producer = TallyProducer(f"127.0.0.1:{settings.kafka_port}", topic_names(settings))
        for event in events:
            producer.emit(event)
        producer.flush(timeout_s=60)
        producer.close()
        poll(lambda: (stored(settings) or (0, 0))[0] >= len(events) * 0.9, "rows stored", up)
        poll(lambda: rollups_filled(environ), "every rollup has rows", up)

        def pipeline_scraped() -> bool:
            with urllib.request.urlopen(f"{origin}/api/pipeline", timeout=10) as page:
                return len(orjson.loads(page.read())["time"]) >= 2

        poll(pipeline_scraped, "the dashboard scraped the stages twice", up)

        with chromium() as browser:
            context = browser.new_context(
                bypass_csp=True, viewport={"width": 1440, "height": 900}
            )  # wait_for_function needs eval
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = context.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            failures: list[str] = []
            page.on("pageerror", lambda error: failures.append(str(error)))
            page.goto(f"{origin}/#range=24h")
            page.wait_for_function("() => document.body.dataset.state === 'ready'")
            panels = page.evaluate(
                """() => [...document.querySelectorAll('.panel')].map((p) => ({
                     title: p.querySelector('h3').textContent, state: p.dataset.state,
                     points: Number(p.dataset.points),
                     canvases: p.querySelectorAll('canvas').length,
                   }))"""
            )
            assert len(panels) == 15, panels
            for panel in panels:
                assert panel["state"] == "ok" and panel["points"] > 0, panel
            charts = [p for p in panels if p["canvases"]]
            assert len(charts) >= 10, "the time series are drawn as canvas charts"
            page.screenshot(path=str(screenshot), full_page=True)

            # a filter: the page refreshes, narrowed panels say nothing is wrong
            refreshes = page.evaluate("() => Number(document.body.dataset.refreshes)")
            os_name = page.evaluate(
                "() => [...document.querySelectorAll('#filter-os_family option')]"
                ".map((o) => o.value).find((v) => v)"
            )
            assert os_name, "no OS offered as a filter"
            page.select_option("#filter-os_family", os_name)
            page.wait_for_function(
                f"() => Number(document.body.dataset.refreshes) > {refreshes} "
                "&& document.body.dataset.state === 'ready'"
            )
            assert f"os_family={os_name}" in page.url
            states = page.evaluate(
                "() => [...document.querySelectorAll('.panel')].map((p) => p.dataset.state)"
            )
            assert "error" not in states and states.count("ok") >= 5, states

            # auto-refresh: a new round without a click
            page.select_option("#refresh", "10")
            refreshes = page.evaluate("() => Number(document.body.dataset.refreshes)")
            page.wait_for_function(
                f"() => Number(document.body.dataset.refreshes) > {refreshes}", timeout=25_000
            )
            assert not failures, failures
        foreign = [url for url in requested if not url.startswith(origin + "/")]
        assert not foreign, f"the page asked another host: {foreign}"
        assert any("/static/vendor/uplot/" in url for url in requested)
        assert screenshot.stat().st_size > 50_000

        with urllib.request.urlopen(f"{origin}/metrics", timeout=10) as page_metrics:
            text = page_metrics.read().decode()
        assert 'tally_service_restarts_total{service="sink"} 0.0' in text
        worker = dict(scraped(f"http://127.0.0.1:{worker_port}/metrics"))
        assert 0 <= worker["tally_stream_active_key_age_seconds"] < 600, "a key made for the run"
        lags = [v for k, v in worker.items() if k.startswith("tally_stream_consumer_lag[")]
        assert lags and all(lag >= 0 for lag in lags), "no partition's lag exposed"
    finally:
        stop_and_wait(up, signal.SIGINT, STOP_DEADLINE_S)
    assert up.returncode == 0, output.read_text()[-3000:]
