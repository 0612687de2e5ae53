"""`tally bench` in its short form, as CI runs it: it completes, and what it reports is a
measurement of this run (events accepted and stored, every probe found in ClickHouse, each
process's peak memory, the Kafka baseline) in a JSON file and a PNG plot."""

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.e2e.commands import tally_environ

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def test_a_short_bench_completes_and_reports(state_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "bench", "--rate", "1000", "--seconds", "4",
         "--out", str(out)],
        env=tally_environ(state_dir), capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    printed = orjson.loads(done.stdout)
    result = orjson.loads((out / "bench.json").read_bytes())
    assert printed["events_per_s"] == result["events_per_s"]
    events = result["events"]
    assert 3000 <= events["accepted"] <= events["sent"] <= 4100
    assert events["rows_stored"] >= events["accepted"] * 0.95  # summaries add, duplicates none
    latency = result["latency_s"]
    assert latency["probes"] >= 20 and latency["found"] == latency["probes"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] < 30
    peaks = result["processes_peak_rss_mb"]
    assert {"tally_up", "sink", "worker", "collector", "load_generator"} <= peaks.keys()
    assert all(value and value > 10 for value in peaks.values()), peaks
    assert result["kafka_pass_through"]["consumed"] == result["kafka_pass_through"]["events"]
    assert result["ratio_to_kafka_pass_through"] > 0
    assert len(result["timeline"]["at"]) >= 4 and max(result["accepted_per_second"]) > 0
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
