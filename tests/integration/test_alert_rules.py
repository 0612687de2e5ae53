"""The alerting rules (deploy/prometheus/alerts.yml): valid, unit-tested with promtool on
series for each alert, and naming only metrics Tally's processes expose."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producers.collector.metrics import new_metrics
from sinks.metrics import new_sink_metrics
from streams.metrics import new_stream_metrics
from tests.services import service_unavailable

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS = ("TallySinkLagHigh", "TallySinkStalled", "TallyStreamRefusalRateHigh",
          "TallyCollectorRefusalRateHigh", "TallyLoginFailureSpike", "TallySessionDropSpike",
          "TallyPoorCallQuality")  # fmt: skip


def metric_names_in_rules() -> set[str]:
    return set(re.findall(r"\btally_[a-z_]+\b", RULES.read_text())) - {"tally_self"}


def exposed_names(exposition: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        service_unavailable("promtool is not installed (Debian's prometheus package)")
    assert found is not None
    return found


def test_promtool_checks_the_rules():
    checked = subprocess.run([_promtool(), "check", "rules", str(RULES)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_promtool_unit_tests_every_alert():
    tests = ROOT / "tests" / "prometheus" / "alerts_test.yml"
    tested = {line.split(":", 1)[1].strip() for line in tests.read_text().splitlines()
              if line.strip().startswith("alertname:")}  # fmt: skip
    assert tested == set(ALERTS)
    ran = subprocess.run([_promtool(), "test", "rules", str(tests)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_is_in_the_rules(alert: str):
    assert f"alert: {alert}\n" in RULES.read_text()


def test_every_metric_the_rules_name_is_registered_by_a_stage():
    """The three stages' registries, as they start (the lag gauge's partitions appear with
    the first batch; tests/e2e/test_tally_up.py scrapes the running services)."""
    registries = [new_metrics(pending=lambda: 0).registry, new_stream_metrics().registry,
                  new_sink_metrics().registry]  # fmt: skip
    names = set().union(*(exposed_names(generate_latest(r).decode()) for r in registries))
    assert metric_names_in_rules() - names <= {"tally_sink_consumer_lag"}
