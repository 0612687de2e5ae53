"""Pipeline health from the stages' /metrics pages: rates between scrapes (a restarted stage's
counters starting again at 0 count as no events, not negative ones), refusals of both stages
summed by reason, and a stage that does not answer leaving gaps rather than zeros."""

from deploy.dashboard.pipeline import PipelineWatch, scrape_from

COLLECTOR = """# TYPE tally_collector_events_accepted counter
tally_collector_events_accepted_total {accepted}
# TYPE tally_collector_events_refused counter
tally_collector_events_refused_total{{reason="too_large"}} 2
"""
WORKER = """# TYPE tally_stream_events_refused counter
tally_stream_events_refused_total{{reason="too_large"}} {refused}
tally_stream_events_refused_total{{reason="duplicate"}} 1
# TYPE tally_stream_consumer_lag gauge
tally_stream_consumer_lag{{partition="0"}} 5
tally_stream_consumer_lag{{partition="1"}} 7
"""


def test_rates_lags_and_refusals_between_scrapes():
    watch = PipelineWatch({})
    pages = [(100, 3, 0.0), (300, 5, 10.0), (50, 5, 20.0)]  # the collector restarted
    for accepted, refused, at in pages:
        texts: dict[str, str | None] = {
            "collector": COLLECTOR.format(accepted=accepted),
            "worker": WORKER.format(refused=refused),
            "sink": None,
        }
        watch.history.append(scrape_from(texts, at))
    series = watch.series()
    assert series["time"] == [10.0, 20.0]
    assert series["columns"]["events_in_per_s"] == [20.0, 0.0]
    assert series["columns"]["stream_lag"] == [12.0, 12.0]
    assert series["columns"]["sink_lag"] == [None, None]
    assert series["columns"]["refused_too_large_per_s"] == [0.2, 0.0]
    assert series["columns"]["refused_duplicate_per_s"] == [0.0, 0.0]


def test_a_partition_taken_by_a_rebalance_stops_reporting_lag():
    from prometheus_client import generate_latest

    from streams.metrics import new_stream_metrics

    metrics = new_stream_metrics()
    metrics.record_positions({0: 10, 1: 20}, lambda partition: 100)
    metrics.keep_lag_of({1})
    page = generate_latest(metrics.registry).decode()
    assert 'tally_stream_consumer_lag{partition="1"} 79.0' in page
    assert 'partition="0"' not in page
