"""`tally bench`'s figure: throughput, each stage's backlog and event-to-queryable latency
over the run, drawn headless (matplotlib's Agg backend) into a PNG."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _rates(at: list[float], totals: list[float | None]) -> tuple[list[float], list[float]]:
    times, rates = [], []
    for n in range(1, len(at)):
        before, after = totals[n - 1], totals[n]
        if before is None or after is None or at[n] <= at[n - 1]:
            continue
        times.append(at[n])
        rates.append(max(after - before, 0.0) / (at[n] - at[n - 1]))
    return times, rates


def plot_bench(result: dict[str, Any], path: Path) -> None:
    line = result["timeline"]
    figure, (flow, lag, latency) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    options = result["options"]
    offered = f"{options['rate']:.0f} events/s offered" if options["rate"] else "flat out"
    figure.suptitle(
        f"tally bench: {offered}, {result['events_per_s']['end_to_end']:,} events/s end to end, "
        f"{options['backend']} ClickHouse"
    )
    accepted = result["accepted_per_second"]
    flow.step(range(1, len(accepted) + 1), accepted, label="accepted by the collector")
    for name, label in (("enriched", "enriched by the worker"),
                        ("rows_written", "rows written by the sink")):  # fmt: skip
        times, rates = _rates(line["at"], line[name])
        flow.plot(times, rates, label=label)
    flow.set_ylabel("events/s")
    flow.legend(loc="upper right")
    for name, label in (("collector_pending", "collector: awaiting Kafka"),
                        ("worker_lag", "worker: raw records unread"),
                        ("sink_lag", "sink: enriched records unread")):  # fmt: skip
        values = [v if v is not None else float("nan") for v in line[name]]
        lag.plot(line["at"], values, label=label)
    lag.set_ylabel("records behind")
    lag.legend(loc="upper right")
    if result["probes"]:
        sent, seconds = zip(*result["probes"], strict=True)
        latency.scatter(sent, seconds, s=4, label="probe: send to queryable")
        for share in ("p50", "p95", "p99"):
            value = result["latency_s"][share]
            if value is not None:
                latency.axhline(value, linestyle="--", linewidth=0.8)
                latency.annotate(f"{share} {value:.2f} s", (0, value), fontsize=8,
                                 textcoords="offset points", xytext=(2, 2))  # fmt: skip
    latency.set_ylabel("seconds")
    latency.set_xlabel("seconds since the start")
    latency.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
