"""Rows/s of the sink's writer into each ClickHouse backend, against a bare insert of the same
rows in the same run.

`.venv/bin/python bench/sink_writer.py [--rows 200000] [--batch 5000] [--backends embedded server]`

Per backend, on a fresh database: ``bare_insert`` inserts ready rows (one insert per batch,
the backend's fastest path: Arrow for chdb, columnar native protocol for the server);
``writer`` takes enriched records and does what the sink does per batch (records to rows
with their Kafka source, the erasure check, the stored-id check per table, the insert, the
offsets record), into a second database with the rollups' materialized views attached, as
in production. Prints JSON: rows/s for each and their ratio (goal: at least 300,000 rows/s
into the server and 500,000 into chdb, within 1.5x of the bare insert).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# The enriched records are the sink tests' (tests/ is not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.clickhouse import start_clickhouse_server, stop_clickhouse_server
from deploy.services.ports import free_ports
from schemas.enriched import table_name
from sinks.backends import ClickHouseBackend, EmbeddedClickHouse, ServerClickHouse
from sinks.migrations import apply_migrations
from sinks.writer import ROW_COLUMNS, ClickHouseWriter, Row, to_row, with_source
from tests.sink_records import login

GOALS = {"server": 300_000, "embedded": 500_000}


def records(count: int) -> list[dict[str, Any]]:
    start = int(time.time()) - 3600
    return [login(start + n % 3600, f"user{n % 5000}", failed=n % 7 == 0) for n in range(count)]


def timed_bare(backend: ClickHouseBackend, batches: list[list[Row]]) -> float:
    started = time.perf_counter()
    for rows in batches:
        backend.insert(table_name("login"), ROW_COLUMNS["login"], rows)
    return time.perf_counter() - started


def timed_writer(backend: ClickHouseBackend, batches: list[list[dict[str, Any]]]) -> float:
    writer = ClickHouseWriter(backend)
    offset = 0
    started = time.perf_counter()
    for batch in batches:
        grouped: dict[str, list[Row]] = defaultdict(list)
        for record in batch:
            event_type, row = to_row(record)
            grouped[event_type].append(with_source(row, "enriched", 0, offset))
            offset += 1
        writer.write(grouped, {("enriched", 0): offset - 1})
    return time.perf_counter() - started


def measure(open_backend: Any, count: int, batch: int) -> dict[str, Any]:
    made = records(count)
    record_batches = [made[i : i + batch] for i in range(0, count, batch)]
    row_batches = [
        [with_source(to_row(r)[1], "enriched", 0, n) for n, r in enumerate(b)]
        for b in record_batches
    ]
    with open_backend("bench_bare") as backend:
        apply_migrations(backend)
        bare_s = timed_bare(backend, row_batches)
    with open_backend("bench_writer") as backend:
        apply_migrations(backend)
        writer_s = timed_writer(backend, record_batches)
        [(stored,)] = backend.query(f"SELECT count() FROM {table_name('login')}")
    assert stored == count, f"the writer stored {stored} of {count} rows"
    return {
        "bare_insert_rows_per_s": round(count / bare_s),
        "writer_rows_per_s": round(count / writer_s),
        "bare_over_writer": round(writer_s / bare_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--backends", nargs="+", default=["embedded", "server"])
    args = parser.parse_args()
    results: dict[str, Any] = {"rows": args.rows, "batch": args.batch}
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-sink-"))
    try:
        if "embedded" in args.backends:
            results["embedded"] = measure(
                lambda db: EmbeddedClickHouse(workdir / "chdb", db), args.rows, args.batch
            )
        if "server" in args.backends:
            tcp_port, http_port = free_ports(2)
            server = start_clickhouse_server(
                workdir / "server", tcp_port=tcp_port, http_port=http_port
            )
            try:
                results["server"] = measure(
                    lambda db: ServerClickHouse(server.host, server.tcp_port, database=db),
                    args.rows,
                    args.batch,
                )
            finally:
                stop_clickhouse_server(workdir / "server")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["goals"] = {
        name: {
            "rows_per_s": results[name]["writer_rows_per_s"] >= GOALS[name],
            "within_1_5x_of_bare": results[name]["bare_over_writer"] <= 1.5,
        }
        for name in GOALS
        if name in results
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
