"""Topic declarations and the benchmark scripts (which must keep running, though not tests)."""

import json
import subprocess
import sys
from pathlib import Path

from deploy.settings import load_settings
from deploy.wiring import topic_specs
from schemas.topics import HOUR_MS

ROOT = Path(__file__).resolve().parents[2]


def test_raw_topic_keeps_raw_ids_for_a_day_at_most():
    """The raw topic, which holds raw ids and IPs, is declared with 24 h retention."""
    raw, enriched, dead = topic_specs(load_settings({}))
    assert (raw.name, raw.retention_ms) == ("tally.events.raw", 24 * HOUR_MS)
    assert enriched.name == "tally.events.enriched" and dead.name == "tally.events.dead"


def test_validation_benchmark_prints_its_figures():
    """bench/validation.py prints one JSON object with the cost beside its baseline."""
    out = subprocess.run(
        [sys.executable, "bench/validation.py", "--events", "300", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    figures = json.loads(out.stdout)
    assert figures["decode_event_us_per_event"] > 0 < figures["orjson_loads_us_per_event"]
