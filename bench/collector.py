"""The HTTP collector under Debian's `wrk`, beside an aiohttp hello-world in the same run.

Each server runs alone on CPU 0 (`taskset`), wrk and the broker on CPU 1, on the same host
and port, with the same body and key: batches of 50 events (events/s, p50/p99 latency) and
single-event requests (requests/s). The hello-world reads the body and answers a fixed JSON
document with the collector's server settings, so the ratio is what the collector's own
work costs: keys, limits, validation, stamping, the batch envelope and Kafka's
acknowledgement (acks=all).

Every accepted event is real: the figures count only 2xx answers, and the collector's own
``/metrics`` must agree with wrk's count. Starts its own broker on loopback (state in
.tally/bench) unless TALLY_KAFKA_BOOTSTRAP is set.
Prints one JSON object. Run: .venv/bin/python bench/collector.py [--seconds N]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

from deploy.kafka import ensure_topics, start_kafka, stop_kafka
from deploy.services.ports import free_ports
from deploy.settings import load_settings, settings_environ
from deploy.wiring import kafka_jars_dir, topic_specs
from producers.collector.apps import register_app
from schemas.examples import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
APP = "bench.app"
SERVER_CPU = "0"
LOAD_CPU = "1"

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
local f = io.open("%(body)s", "rb")
wrk.body = f:read("*all")
f:close()
"""


def events_body(count: int) -> bytes:
    """``count`` valid events of the mix a client sends, with a current clock."""
    now = time.time_ns() // 1_000_000
    kinds = ("quality_sample", "session_start", "session_end", "client_info", "logout")
    events = []
    for n in range(count):
        event = dict(EXAMPLES[kinds[n % len(kinds)]])
        for stamped in ("collector_time_ms", "ip"):
            event.pop(stamped, None)
        events.append(
            {**event, "app_id": APP, "event_id": str(uuid.uuid4()), "client_time_ms": now}
        )
    return orjson.dumps(events)


def wait_ready(url: str, server: subprocess.Popen[bytes], deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not ready within {deadline_s:.0f} s")
        time.sleep(0.2)  # polling readiness against the deadline


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and non-2xx answers from `wrk --latency`."""
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = {
        pct: float(value) * units[unit]
        for pct, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    }
    requests = re.search(r"^\s*(\d+) requests in", output, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)$", output, re.M)
    if not (rate and requests and {"50", "99"} <= latency.keys()):
        raise SystemExit(f"cannot read wrk's output:\n{output}")
    return {
        "requests": int(requests.group(1)),
        "requests_per_s": float(rate.group(1)),
        "p50_ms": latency["50"],
        "p90_ms": latency.get("90"),
        "p99_ms": latency["99"],
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else None,
    }


def run_wrk(url: str, key: str, body: Path, seconds: int, connections: int) -> dict[str, Any]:
    script = body.with_suffix(".lua")
    script.write_text(WRK_SCRIPT % {"key": key, "body": body})
    command = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
               "--latency", "-s", str(script), url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return parse_wrk(done.stdout)


def accepted_by_metrics(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r"^tally_collector_events_accepted_total\s+([\d.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def measure(
    start: list[str], env: dict[str, str], base: str, key: str, bodies: dict[str, Path],
    seconds: int, connections: int, check_metrics: bool,
) -> dict[str, Any]:  # fmt: skip
    """Start one server on CPU 0, drive it with wrk for each body, stop it."""
    server = subprocess.Popen(["taskset", "-c", SERVER_CPU, *start], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_ready(f"{base}/readyz", server)
        run_wrk(f"{base}/v1/events", key, bodies["batch"], 2, 8)  # warm-up: JIT-free, but caches
        figures: dict[str, Any] = {}
        for name in ("batch", "single"):
            before = accepted_by_metrics(base) if check_metrics else 0.0
            figures[name] = run_wrk(f"{base}/v1/events", key, bodies[name], seconds, connections)
            if check_metrics:
                events = len(orjson.loads(bodies[name].read_bytes()))
                counted = accepted_by_metrics(base) - before
                expected = (figures[name]["requests"] - figures[name]["non_2xx"]) * events
                figures[name]["events_accepted_by_metrics"] = counted
                # wrk counts answers; a request cut by wrk's stop may be accepted unanswered.
                if counted < expected:
                    raise SystemExit(f"collector accepted {counted} events, wrk saw {expected}")
        return figures
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=60)
        if server.returncode not in (0, -15):
            print(errors.decode(errors="replace")[-2000:], file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16,
                        help="wrk's open connections (the clients in flight)")  # fmt: skip
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: bash deploy/install-system-packages.sh --tests")
    state = ROOT / ".tally" / "bench"
    bootstrap = os.environ.get("TALLY_KAFKA_BOOTSTRAP")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_ports(1)[0]
        settings = load_settings(
            {
                "TALLY_STATE_DIR": str(work),
                "TALLY_TOPIC_NAMESPACE": f"bench.{uuid.uuid4().hex[:8]}.",
                "TALLY_COLLECTOR_PORT": str(port),
                "TALLY_COLLECTOR_RATE_PER_KEY": "1000000",
                "TALLY_COLLECTOR_RATE_BURST": "1000000",
            }
        )
        if not bootstrap:
            kafka_port, controller_port = free_ports(2)
            broker = start_kafka(state / "kafka", kafka_jars_dir(settings),
                                 port=kafka_port, controller_port=controller_port)  # fmt: skip
            bootstrap = broker.bootstrap
            # The broker shares wrk's CPU, so the server's CPU is its own.
            subprocess.run(["taskset", "-a", "-cp", LOAD_CPU, str(broker.pid)],
                           check=True, capture_output=True)  # fmt: skip
        try:
            ensure_topics(bootstrap, topic_specs(settings))
            keys = register_app(settings.collector_apps_path, APP, ["https://bench.example"])
            bodies = {"batch": work / "batch.json", "single": work / "single.json"}
            bodies["batch"].write_bytes(events_body(50))
            bodies["single"].write_bytes(events_body(1))
            env = {**os.environ, **settings_environ(settings), "TALLY_KAFKA_BOOTSTRAP": bootstrap}
            base = f"http://127.0.0.1:{port}"
            collector = measure([sys.executable, "-m", "deploy.cli", "collector"], env, base,
                                keys.write_key, bodies, args.seconds, args.connections,
                                True)  # fmt: skip
            hello = measure([sys.executable, str(ROOT / "bench" / "hello_aiohttp.py"),
                             "127.0.0.1", str(port)], env, base, keys.write_key, bodies,
                            args.seconds, args.connections, False)  # fmt: skip
        finally:
            if not os.environ.get("TALLY_KAFKA_BOOTSTRAP"):
                stop_kafka(state / "kafka")
    batch_events_per_s = collector["batch"]["requests_per_s"] * 50
    result = {
        "cpus": {"server": SERVER_CPU, "wrk_and_broker": LOAD_CPU},
        "seconds_per_run": args.seconds,
        "connections": args.connections,
        "collector": {
            "batch50_events_per_s": round(batch_events_per_s),
            "batch50_p50_ms": collector["batch"]["p50_ms"],
            "batch50_p99_ms": collector["batch"]["p99_ms"],
            "single_requests_per_s": round(collector["single"]["requests_per_s"]),
            "single_p99_ms": collector["single"]["p99_ms"],
            "non_2xx": collector["batch"]["non_2xx"] + collector["single"]["non_2xx"],
        },
        "hello_world": {
            "batch50_requests_per_s": round(hello["batch"]["requests_per_s"]),
            "batch50_p99_ms": hello["batch"]["p99_ms"],
            "single_requests_per_s": round(hello["single"]["requests_per_s"]),
            "single_p99_ms": hello["single"]["p99_ms"],
        },
        "ratio_to_hello_world": {
            "batch50": round(
                collector["batch"]["requests_per_s"] / hello["batch"]["requests_per_s"], 3
            ),
            "single": round(
                collector["single"]["requests_per_s"] / hello["single"]["requests_per_s"], 3
            ),
        },
        "goals": {
            "batch50_events_per_s>=50000": batch_events_per_s >= 50_000,
            "batch50_p99_ms<50": collector["batch"]["p99_ms"] < 50,
            "single_requests_per_s>=5000": collector["single"]["requests_per_s"] >= 5_000,
        },
        "raw": {"collector": collector, "hello_world": hello},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
