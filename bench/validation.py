"""Validation cost per event (decode + validate), beside plain orjson.loads in the same run.

Prints one JSON object. Run: .venv/bin/python bench/validation.py [--events N]
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import orjson

from producers.sdk import prepare_event
from producers.workload import generate_workload
from schemas.validation import decode_event

END_MS = 1_764_300_000_000


def _per_event_us(fn: Callable[[bytes], object], payloads: list[bytes], repeats: int) -> float:
    """Median over repeats of the mean time per payload, in microseconds."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for raw in payloads:
            fn(raw)
        runs.append((time.perf_counter() - start) / len(payloads) * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    events = generate_workload(
        seed=1, clients=500, events=args.events, end_ms=END_MS, span_ms=6 * 3_600_000
    )
    payloads = [prepare_event(e, END_MS) for e in events]
    baseline = _per_event_us(orjson.loads, payloads, args.repeats)
    validate = _per_event_us(lambda raw: decode_event(raw, received_ms=END_MS), payloads,
                             args.repeats)  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "decode_and_validate",
                "events": len(payloads),
                "mean_event_bytes": round(sum(map(len, payloads)) / len(payloads)),
                "orjson_loads_us_per_event": round(baseline, 2),
                "decode_event_us_per_event": round(validate, 2),
                "ratio_to_orjson_loads": round(validate / baseline, 1),
                "events_per_s_one_core": round(1e6 / validate),
            }
        )
    )


if __name__ == "__main__":
    main()
