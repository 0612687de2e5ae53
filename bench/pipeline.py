"""End-to-end throughput: raw topic -> Faust agent -> enriched topic -> sink -> ClickHouse,
beside a raw Kafka pass-through (produce, then consume, with the same client) in the same run.

Starts its own broker on loopback (ports 39092/39093, state in .tally/bench) unless
TALLY_KAFKA_BOOTSTRAP is set, and uses embedded ClickHouse in a temporary folder.
Prints one JSON object. Run: .venv/bin/python bench/pipeline.py [--events N]
"""

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from deploy.kafka import TopicSpec, ensure_topics, start_kafka, stop_kafka
from deploy.run import stream_worker
from deploy.settings import load_settings
from deploy.wiring import kafka_jars_dir, open_backend, sink_config, topic_names, topic_specs
from producers.sdk import prepare_event
from producers.workload import generate_workload
from sinks.consumer import EnrichedSink
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter

ROOT = Path(__file__).resolve().parents[1]


def produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for payload in payloads:
        producer.send(topic, payload)
    producer.flush(timeout=120)
    producer.close()


def pass_through_seconds(bootstrap: str, payloads: list[bytes]) -> float:
    """Produce the payloads and consume them all back: the floor for any Kafka pipeline."""
    topic = f"bench.passthrough.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [TopicSpec(topic, 4, None)])
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=f"bench-{uuid.uuid4().hex[:8]}")  # fmt: skip
    consumer.poll(timeout_ms=2000)
    start = time.perf_counter()
    produce(bootstrap, topic, payloads)
    seen = 0
    while seen < len(payloads):
        seen += sum(len(batch) for batch in consumer.poll(timeout_ms=500).values())
    elapsed = time.perf_counter() - start
    consumer.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    own_broker = "TALLY_KAFKA_BOOTSTRAP" not in os.environ
    state = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    environ = {
        **{k: v for k, v in os.environ.items() if k.startswith("TALLY_")},
        "TALLY_STATE_DIR": str(state),
        "TALLY_KAFKA_JARS_DIR": str(ROOT / ".tally" / "kafka-jars"),
        "TALLY_TOPIC_NAMESPACE": f"b{uuid.uuid4().hex[:8]}.",
    }
    settings = load_settings(environ)
    broker_state = ROOT / ".tally" / "bench" / "kafka"
    if own_broker:
        bootstrap = start_kafka(broker_state, kafka_jars_dir(settings), port=39092,
                                controller_port=39093).bootstrap  # fmt: skip
    else:
        bootstrap = environ["TALLY_KAFKA_BOOTSTRAP"]
    try:
        now = int(time.time() * 1000)
        events = generate_workload(seed=5, clients=2000, events=args.events, end_ms=now,
                                   span_ms=30 * 60_000)  # within the allowed lateness  # fmt: skip
        payloads = [prepare_event(e, now) for e in events]
        baseline = pass_through_seconds(bootstrap, payloads)

        ensure_topics(bootstrap, topic_specs(settings))
        backend = open_backend(settings)
        apply_migrations(backend)
        sink = EnrichedSink(sink_config(settings, bootstrap), ClickHouseWriter(backend))
        stop = threading.Event()
        thread = threading.Thread(target=sink.run, args=(stop,))
        with stream_worker(settings, bootstrap):
            thread.start()
            produce(bootstrap, topic_names(settings).raw, payloads[:1])  # warm-up: group joined
            while sink.rows_written < 1:
                stop.wait(0.1)
            start = time.perf_counter()
            produce(bootstrap, topic_names(settings).raw, payloads[1:])
            while sink.rows_written < len(payloads):
                stop.wait(0.05)
            pipeline = time.perf_counter() - start
            stop.set()
            thread.join()
            sink.close()
        backend.close()
    finally:
        if own_broker:
            stop_kafka(broker_state)
    n = len(payloads)
    print(json.dumps({
        "benchmark": "pipeline_end_to_end",
        "events": n,
        "kafka_pass_through_s": round(baseline, 2),
        "kafka_pass_through_events_per_s": round(n / baseline),
        "pipeline_s": round(pipeline, 2),
        "pipeline_events_per_s": round((n - 1) / pipeline),
        "pipeline_over_pass_through": round(pipeline / baseline, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
