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
    raw, enriched, dead, *_ = topic_specs(load_settings({}))
    assert (raw.name, raw.retention_ms) == ("tally.events.raw", 24 * HOUR_MS)
    assert enriched.name == "tally.events.enriched" and dead.name == "tally.events.dead"
    assert not raw.compacted and not enriched.compacted and not dead.compacted


def test_the_stream_tables_changelogs_are_compacted_and_partitioned_like_raw():
    """A table partition is recovered by the worker that owns the raw partition of the same
    number, and a compacted changelog keeps each key's newest state, not a time window."""
    settings = load_settings({"TALLY_RAW_PARTITIONS": "3"})
    raw, *_, ids, sessions = topic_specs(settings)
    assert (ids.name, sessions.name) == (
        "tally.streams.recent-event-ids.changelog",
        "tally.streams.sessions.changelog",
    )
    for changelog in (ids, sessions):
        assert changelog.compacted and changelog.retention_ms is None
        assert changelog.partitions == raw.partitions == 3


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


def test_agent_benchmark_feeds_whole_envelopes_of_one_client_each():
    """bench/agent.py fills the raw topic with envelopes as the collector makes them: one
    client's events (one app, one address), at most the batch size, each event once, and
    every envelope accepted whole by the stream step's decoder."""
    sys.path.insert(0, str(ROOT))
    from bench.agent import batched_input
    from producers.workload import generate_workload
    from schemas.batch import decode_message
    from schemas.validation import InvalidEvent

    now = 1_764_300_000_000
    events = generate_workload(seed=3, clients=6, events=400, end_ms=now, span_ms=600_000)
    data = batched_input(events, 50, now)
    decoded = [decode_message(value, received_ms=now) for _, value in data.messages]
    judged = [e for message in decoded for e in message.events]
    assert data.events == 400 and all(m.batched and len(m.events) <= 50 for m in decoded)
    assert not [e for e in judged if isinstance(e, InvalidEvent)]
    assert sorted(e.event_id for e in judged) == sorted(e.event_id for e in events)
    assert all(len({(e.app_id, e.ip) for e in m.events}) == 1 for m in decoded)


def test_agent_benchmark_judges_its_goals_from_the_rates():
    """The goals: 40,000 events/s through the batched agent, 10x the one-event agent,
    within 1.5x of the plain aiokafka loop, under 400 MB."""
    sys.path.insert(0, str(ROOT))
    from bench.agent import summary

    results = {
        "faust_batch50": {"events_per_s": 45_000, "worker_peak_rss_mb": 350.0},
        "faust_single": {"events_per_s": 4_000},
        "aiokafka_loop": {"events_per_s": 60_000},
    }
    ratios, goals = summary(results)
    assert ratios["batch50_vs_single"] == 11.25 and ratios["batch50_vs_aiokafka_loop"] == 1.33
    assert all(goals.values())
    results["aiokafka_loop"]["events_per_s"] = 70_000
    assert summary(results)[1]["within_1.5x_of_loop"] is False
