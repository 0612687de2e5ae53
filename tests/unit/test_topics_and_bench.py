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


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:40123/v1/events
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    21.94ms    4.12ms  61.02ms   78.13%
    Req/Sec   697.80     60.11   830.00     71.00%
  Latency Distribution
     50%   21.94ms
     75%   24.01ms
     90%   26.55ms
     99%   34.71ms
  6987 requests in 10.01s, 2.95MB read
  Non-2xx or 3xx responses: 3
Requests/sec:    697.84
Transfer/sec:    301.48KB
"""


def test_collector_benchmark_reads_wrk_latency_rate_and_refusals():
    """bench/collector.py takes its figures from wrk's own report: percentiles in any unit,
    the request rate, and the non-2xx answers that would make a figure worthless."""
    sys.path.insert(0, str(ROOT))
    from bench.collector import parse_wrk

    figures = parse_wrk(WRK_OUTPUT.replace("99%   34.71ms", "99%    1.02s"))
    assert figures["requests"] == 6987 and figures["requests_per_s"] == 697.84
    assert (figures["p50_ms"], figures["p90_ms"], figures["p99_ms"]) == (21.94, 26.55, 1020.0)
    assert figures["non_2xx"] == 3
    assert (
        parse_wrk(WRK_OUTPUT.replace("     50%   21.94ms\n", "     50%  812.00us\n"))["p50_ms"]
        == 0.812
    )
