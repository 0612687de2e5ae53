"""The stream step's throughput on one core: the Faust agent fed envelopes of 50 events, beside
the same agent fed one event per message and a plain aiokafka consume-judge-produce loop
doing the same work (``streams.steps``, dedupe, sessions), in the same run on a real broker.

Each variant gets topics of its own (a fresh namespace), pre-filled before its consumer
starts (zstd, as the collector produces), so what is timed is consume, validate, enrich,
produce (acks=all) and commit alone. The consumer runs pinned to one CPU (``--cpu``); the
broker, when started here, and this script run on the other. The rate is taken by reading
the enriched topic as it fills (from the other CPU), counting the events in its messages:
from the first enriched message to the last expected event. Then the enriched topic is read
back and its records counted by type.

Per variant: events, seconds, events/s, events per CPU-second of the consumer, the share of
its CPU it used (near 1.0: CPU-bound; well under: waiting on the broker or starved by another
process on its CPU) and its peak resident memory (VmHWM). The uvloop variant sets
``FAUST_LOOP=uvloop``, which ``import faust`` applies; it is skipped when uvloop is not
installed. ``--py-spy DIR`` attaches py-spy to each consumer over its measured stretch (raw
stacks in DIR, figures a little lower).

Starts its own broker on loopback (free ports, state in .tally/bench/kafka-agent) unless
TALLY_KAFKA_BOOTSTRAP is set. Progress goes to stderr; one JSON object to stdout.
Run: .venv/bin/python bench/agent.py [--events N] [--single-events N] [--variants a,b]
"""

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka import ensure_topics, start_kafka, stop_kafka
from deploy.services.ports import free_ports
from deploy.services.process import spawn_child, stop_child
from deploy.settings import Settings, load_settings, settings_environ
from deploy.wiring import CurrentLookups, kafka_jars_dir, stream_config, topic_names, topic_specs
from producers.sdk import partition_key, prepare_event
from producers.workload import generate_workload
from schemas.batch import encode_batch, split_enriched_message
from schemas.events import Envelope
from schemas.reasons import ReasonCode
from streams.dedupe import RecentEventIds, TableWrite
from streams.open_sessions import OpenSessions, summary_outcome
from streams.refusals import RefusalWatch
from streams.steps import Origin, outcomes_of_message, outgoing_messages

ROOT = Path(__file__).resolve().parents[1]
BROKER_STATE = ROOT / ".tally" / "bench" / "kafka-agent"
VARIANTS = (
    "faust_batch50",
    "faust_single",
    "aiokafka_loop",
    "aiokafka_loop_stateless",
    "faust_batch50_uvloop",
)
POLL_S = 0.02
FIRST_OUTPUT_TIMEOUT_S = 120.0
"""From the consumer's start to its first enriched message: imports, group join."""
STALL_S = 10.0
"""No new output for this long once started, with dead letters seen: the run is over."""
PREFILL_BATCH_BYTES = 256 * 1024


@dataclass(frozen=True)
class Input:
    """What a variant's raw topic is filled with: (key, value) messages and their events."""

    messages: list[tuple[bytes, bytes]]
    events: int


def log(text: str) -> None:
    print(f"[agent bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


# --- input ------------------------------------------------------------------------------


def client_of(event: Envelope) -> tuple[Any, ...]:
    """What tells the workload's clients apart (each sends from one address, as one app)."""
    return (event.app_id, event.ip, event.user_agent, event.user_id, event.software_version)


def batched_input(events: list[Envelope], batch_size: int, now_ms: int) -> Input:
    """Envelopes as the collector makes them: one client's events (app, address) in order, at
    most ``batch_size`` each; a client's last envelope may hold fewer."""
    pending: dict[tuple[Any, ...], list[Envelope]] = defaultdict(list)
    messages: list[tuple[bytes, bytes]] = []

    def flush(client: tuple[Any, ...], group: list[Envelope]) -> None:
        key = hashlib.blake2b(repr(client).encode(), digest_size=8).hexdigest().encode()
        value = encode_batch(group, app_id=group[0].app_id, collector_time_ms=now_ms,
                             ip=group[0].ip)  # fmt: skip
        messages.append((key, value))

    for event in events:
        client = client_of(event)
        group = pending[client]
        group.append(event)
        if len(group) == batch_size:
            flush(client, group)
            pending[client] = []
    for client, group in pending.items():
        if group:
            flush(client, group)
    return Input(messages, len(events))


def single_input(events: list[Envelope], now_ms: int) -> Input:
    """One event a message, keyed as the SDK keys it."""
    return Input([(partition_key(e), prepare_event(e, now_ms)) for e in events], len(events))


async def prefill(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]],
                  compression: str | None) -> None:  # fmt: skip
    """Produce the messages (acks=all) in large batches, a key's messages on one partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                compression_type=compression,
                                max_batch_size=PREFILL_BATCH_BYTES)  # fmt: skip
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, value in messages:
            by_partition[partitions[zlib.crc32(key) % len(partitions)]].append((key, value))
        sent = []
        for partition, items in by_partition.items():
            batch = producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    sent.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            if batch.record_count():
                sent.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.wait_for(asyncio.gather(*sent), 300)
    finally:
        await producer.stop()


# --- the plain aiokafka loop (runs in a child process) -----------------------------------


def loop_group(settings: Settings) -> str:
    return f"{settings.topic_namespace}bench-aiokafka-loop"


async def aiokafka_loop(stateful: bool) -> None:
    """Consume, judge, produce, await the acks, commit: the agent's work without Faust, with
    the same lookups, refusal watch and batch size. ``stateful``: also the agent's state, as
    streams/app.py keeps it (event ids and sessions, their changelog writes sent after the
    batch's output); else ``outcomes_of_message`` alone, with an in-memory dedupe."""
    settings = load_settings(os.environ)
    assert settings.kafka_bootstrap, "TALLY_KAFKA_BOOTSTRAP"
    config = stream_config(settings, settings.kafka_bootstrap)
    current_lookups = CurrentLookups(settings)
    recent = RecentEventIds(int(config.dedupe_window_s * 1000), config.dedupe_max_ids)
    sessions = OpenSessions(config.session_rules)
    refusals = RefusalWatch(share=config.refusal_alarm_share,
                            window_s=config.refusal_alarm_window_s,
                            min_events=config.refusal_alarm_min_events)  # fmt: skip
    names = config.topics
    destinations = {"enriched": names.enriched, "dead": names.dead}
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    consumer = AIOKafkaConsumer(
        names.raw,
        bootstrap_servers=config.bootstrap,
        group_id=loop_group(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap, acks="all",
                                compression_type=config.compression_type)  # fmt: skip

    async def send_writes(topic: str, writes: list[TableWrite]) -> None:
        await asyncio.gather(*[
            await producer.send(topic, w.value, key=w.key, partition=w.partition) for w in writes
        ])  # fmt: skip

    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=200, max_records=config.batch_size)
            if not fetched:
                continue
            lookups = current_lookups()
            now_ms = int(time.time() * 1000)
            pending = []
            table_writes: list[TableWrite] = []
            reasons: list[ReasonCode | None] = []
            for messages in fetched.values():
                for message in messages:
                    origin = Origin(message.topic, message.partition, message.offset,
                                    message.timestamp)  # fmt: skip
                    if stateful:
                        recent.begin_message(message.partition, message.offset)
                    outcomes = outcomes_of_message(message.value, origin, lookups, recent)
                    if stateful:
                        outcomes, summaries = sessions.apply(outcomes, origin, now_ms)
                        outcomes.extend(summary_outcome(summary) for summary in summaries)
                    for out in outgoing_messages(outcomes):
                        topic = destinations[out.destination]
                        pending.append(await producer.send(topic, out.value, key=out.key))
                    if stateful:
                        table_writes.extend(
                            recent.remember(message.partition, message.offset, now_ms)
                        )
                    reasons.extend(o.reason if o.destination == "dead" else None for o in outcomes)
            await asyncio.gather(*pending)
            if stateful:
                await send_writes(names.recent_event_ids_changelog, table_writes)
                await send_writes(names.sessions_changelog, sessions.take_writes())
            alarm = refusals.record(reasons)
            if alarm is not None:
                log(f"dead-letter limit: {alarm.describe()}")
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


# --- measuring a consumer ----------------------------------------------------------------


def proc_status_mb(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM) in MB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def proc_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of the process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def consumer_process(argv: list[str], cpu: str, env: dict[str, str],
                     log_path: Path) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """The consumer pinned to ``cpu`` (taskset execs it: same pid), stopped on exit
    (SIGTERM to its group, SIGKILL after 15 s)."""
    child = spawn_child(["taskset", "-c", cpu, *argv], log_path=log_path, env=env, cwd=ROOT)
    try:
        yield child
    finally:
        code = stop_child(child, timeout_s=15.0)
        if code not in (0, -signal.SIGTERM):
            log(f"consumer exited with {code}; log tail:\n{tail(log_path)}")


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, cpu: str) -> Iterator[None]:
    """py-spy sampling ``pid`` (non-blocking, on ``cpu``) until the block ends; nothing
    when ``out`` is None."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        ["taskset", "-c", cpu, str(Path(sys.executable).with_name("py-spy")), "record",
         "--pid", str(pid), "--rate", "250", "--nonblocking", "--format", "raw",
         "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)


async def end_offsets(consumer: AIOKafkaConsumer, parts: list[TopicPartition]) -> int:
    found = await consumer.end_offsets(parts)
    return int(sum(found.values()))


def events_in(value: bytes) -> int:
    """Client events in one enriched message (a JSON array of records), summaries aside;
    counted on the bytes, cheap enough to follow the worker live from the other CPU."""
    return value.count(b'"event_id":') - value.count(b'"event_type":"session_summary"')


async def measure(bootstrap: str, settings: Settings, expected_events: int,
                  child: subprocess.Popen[bytes], log_path: Path, timeout_s: float,
                  spy_out: Path | None, other_cpu: str) -> dict[str, Any]:  # fmt: skip
    """Read the enriched topic as it fills, counting the events in its messages (a message
    holds a batch of raw messages' records), until every event has come."""
    names = topic_names(settings)
    enriched = [TopicPartition(names.enriched, p) for p in range(settings.raw_partitions)]
    dead = [TopicPartition(names.dead, 0)]
    watcher = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await watcher.start()
    await reader.start()
    reader.assign(enriched)
    await reader.seek_to_beginning(*enriched)
    started = time.perf_counter()
    first: tuple[float, int, float] | None = None
    done = 0
    last_change = (started, 0)
    peak_rss = 0.0
    spying = contextlib.ExitStack()
    try:
        while True:
            if child.poll() is not None:
                raise SystemExit(f"consumer exited with {child.returncode}:\n{tail(log_path)}")
            polled = await reader.getmany(timeout_ms=int(POLL_S * 1000), max_records=10_000)
            now = time.perf_counter()
            done += sum(events_in(m.value) for ms in polled.values() for m in ms)
            letters = await end_offsets(watcher, dead)
            cpu = proc_cpu_s(child.pid)
            peak_rss = max(peak_rss, proc_status_mb(child.pid, "VmRSS"))
            if done + letters != last_change[1]:
                last_change = (now, done + letters)
            if first is None and done + letters > 0:
                first = (now, done, cpu)
                log(f"first output after {now - started:.1f} s")
                spying.enter_context(py_spy(child.pid, spy_out, other_cpu))
            if first is not None and (
                done + letters >= expected_events or (letters and now - last_change[0] > STALL_S)
            ):
                end = now if done + letters >= expected_events else last_change[0]
                break
            if first is None and now - started > FIRST_OUTPUT_TIMEOUT_S:
                raise SystemExit(f"no output within {FIRST_OUTPUT_TIMEOUT_S:.0f} s:\n"
                                 f"{tail(log_path)}")  # fmt: skip
            if now - started > timeout_s:
                raise SystemExit(f"{done} of {expected_events} events within {timeout_s} s")
        spying.close()
        assert first is not None
        return {
            "start": first[0],
            "end": end,
            "events_at_start": first[1],
            "events_done": done,
            "dead_letters": letters,
            "cpu_s": proc_cpu_s(child.pid) - first[2],
            "peak_rss_mb": max(peak_rss, proc_status_mb(child.pid, "VmHWM")),
            "rss_mb_at_end": proc_status_mb(child.pid, "VmRSS"),
            "rss_anon_mb_at_end": proc_status_mb(child.pid, "RssAnon"),
            "rss_file_mb_at_end": proc_status_mb(child.pid, "RssFile"),
        }
    finally:
        spying.close()
        await reader.stop()
        await watcher.stop()


async def count_records(bootstrap: str, topic: str, partitions: int) -> Counter[str]:
    """The records in the enriched topic by event type, its messages split."""
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        types: Counter[str] = Counter()
        deadline = time.monotonic() + 300
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise SystemExit(f"could not read {topic} back within 300 s")
            fetched = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for messages in fetched.values():
                for message in messages:
                    records = split_enriched_message(message.value or b"[]")
                    types.update(str(r.get("event_type")) for r in records)
        return types
    finally:
        await consumer.stop()


async def delete_topics(bootstrap: str, settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([spec.name for spec in topic_specs(settings)])
    finally:
        await admin.close()


def run_variant(variant: str, bootstrap: str, settings: Settings, data: Input,
                args: argparse.Namespace, other_cpu: str) -> dict[str, Any]:  # fmt: skip
    ensure_topics(bootstrap, topic_specs(settings))
    names = topic_names(settings)
    log(f"{variant}: pre-filling {names.raw} with {len(data.messages)} messages "
        f"({data.events} events)")  # fmt: skip
    asyncio.run(prefill(bootstrap, names.raw, data.messages, settings.kafka_compression_type))
    env = {**os.environ, **settings_environ(settings), "TALLY_KAFKA_BOOTSTRAP": bootstrap}
    env.pop("FAUST_LOOP", None)
    if variant.endswith("_uvloop"):
        env["FAUST_LOOP"] = "uvloop"  # `import faust` sets mode's loop from it (faust/__init__)
    if variant.startswith("aiokafka_loop"):
        argv = [sys.executable, str(Path(__file__).resolve()), f"--consumer-child={variant}"]
    else:
        argv = [sys.executable, "-m", "deploy.cli", "worker"]
    log_path = settings.state_dir / "logs" / f"{variant}.log"
    spy_out = Path(args.py_spy) / f"{variant}.txt" if args.py_spy else None
    timeout_s = min(args.timeout, 120 + data.events / 200)
    log(f"{variant}: consumer starting on CPU {args.cpu}")
    with consumer_process(argv, args.cpu, env, log_path) as child:
        figures = asyncio.run(measure(bootstrap, settings, data.events, child, log_path,
                                      timeout_s, spy_out, other_cpu))  # fmt: skip
    types = asyncio.run(count_records(bootstrap, names.enriched, settings.raw_partitions))
    summaries = types.pop("session_summary", 0)
    records = sum(types.values())
    with contextlib.suppress(Exception):
        asyncio.run(delete_topics(bootstrap, settings))
    per_message = data.events / len(data.messages)
    events = figures["events_done"] - figures["events_at_start"]
    seconds = figures["end"] - figures["start"]
    result = {
        "events": data.events,
        "messages": len(data.messages),
        "events_per_message": round(per_message, 1),
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds) if seconds > 0 else None,
        "events_per_cpu_s": round(events / figures["cpu_s"]) if figures["cpu_s"] > 0 else None,
        "worker_cpu_share": round(figures["cpu_s"] / seconds, 2) if seconds > 0 else None,
        "worker_peak_rss_mb": round(figures["peak_rss_mb"], 1),
        "worker_rss_mb_at_end": round(figures["rss_mb_at_end"], 1),
        "worker_rss_anon_file_mb_at_end": [
            round(figures["rss_anon_mb_at_end"], 1),
            round(figures["rss_file_mb_at_end"], 1),
        ],
        "enriched_events": records,
        "session_summaries": summaries,
        "dead_letters": figures["dead_letters"],
        "complete": records + figures["dead_letters"] >= data.events,
    }
    log(f"{variant}: {result}")
    return result


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def summary(results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    def rate(name: str) -> float | None:
        value = results.get(name, {}).get("events_per_s")
        return float(value) if value else None

    batched, single, loop = rate("faust_batch50"), rate("faust_single"), rate("aiokafka_loop")
    ratios = {
        "batch50_vs_single": ratio(batched, single),
        "batch50_vs_aiokafka_loop": ratio(loop, batched),
        "uvloop_vs_batch50": ratio(rate("faust_batch50_uvloop"), batched),
    }
    rss = results.get("faust_batch50", {}).get("worker_peak_rss_mb")
    goals = {
        "events_per_s_per_core>=40000": None if batched is None else batched >= 40_000,
        "x10_single": None if ratios["batch50_vs_single"] is None
        else ratios["batch50_vs_single"] >= 10,
        "within_1.5x_of_loop": None if ratios["batch50_vs_aiokafka_loop"] is None
        else ratios["batch50_vs_aiokafka_loop"] <= 1.5,
        "rss<400MB": None if rss is None else rss < 400,
    }  # fmt: skip
    return ratios, goals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000,
                        help="events of the batched variants")  # fmt: skip
    parser.add_argument("--single-events", type=int, default=20_000,
                        help="events of faust_single (one a message: slow)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--span-minutes", type=int, default=30,
                        help="the workload's client times spread over this")  # fmt: skip
    parser.add_argument("--partitions", type=int, default=2, help="of the raw topic")
    parser.add_argument("--cpu", default="0", help="the CPU the consumer is pinned to")
    parser.add_argument("--timeout", type=float, default=900.0, help="per variant, seconds")
    parser.add_argument("--py-spy", metavar="DIR", help="profile each consumer into DIR")
    parser.add_argument("--consumer-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer_child:
        asyncio.run(aiokafka_loop(stateful=args.consumer_child == "aiokafka_loop"))
        return
    # SIGTERM unwinds like Ctrl-C: the consumer and the broker started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    cpus = sorted(os.sched_getaffinity(0))
    others = [c for c in cpus if str(c) != args.cpu]
    other_cpu = str(others[0]) if others else args.cpu
    os.sched_setaffinity(0, {int(other_cpu)})  # this script keeps off the measured CPU
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    own_broker = "TALLY_KAFKA_BOOTSTRAP" not in os.environ
    state = Path(tempfile.mkdtemp(prefix="tally-bench-agent-"))
    run_id = uuid.uuid4().hex[:8]
    base = {
        **{k: v for k, v in os.environ.items() if k.startswith("TALLY_")},
        "TALLY_STATE_DIR": str(state),
        "TALLY_KAFKA_JARS_DIR": str(ROOT / ".tally" / "kafka-jars"),
        "TALLY_RAW_PARTITIONS": str(args.partitions),
    }

    def settings_for(variant: str) -> Settings:
        return load_settings({**base, "TALLY_TOPIC_NAMESPACE": f"bench.agent.{run_id}.{variant}."})

    load_settings(base).hmac_keys()  # one key ring for every consumer

    now = int(time.time() * 1000)
    total = max(args.events, args.single_events)
    log(f"generating {total} events")
    # Live traffic: client times within the last half hour, inside the allowed lateness (an
    # older event of a closed session is refused as too_late, one dead letter each).
    workload = generate_workload(seed=9, clients=max(20, total // 500), events=total,
                                 end_ms=now, span_ms=args.span_minutes * 60_000)  # fmt: skip
    inputs: dict[str, Input] = {}
    if any(v != "faust_single" for v in variants):
        inputs["batched"] = batched_input(workload[: args.events], args.batch_size, now)
    if "faust_single" in variants:
        inputs["single"] = single_input(workload[: args.single_events], now)

    results: dict[str, dict[str, Any]] = {}
    broker_pid = None
    if own_broker:
        port, controller_port = free_ports(2)
        broker = start_kafka(BROKER_STATE, kafka_jars_dir(load_settings(base)), port=port,
                             controller_port=controller_port)  # fmt: skip
        bootstrap, broker_pid = broker.bootstrap, broker.pid
        subprocess.run(["taskset", "-a", "-cp", other_cpu, str(broker_pid)],
                       check=True, capture_output=True)  # fmt: skip
    else:
        bootstrap = os.environ["TALLY_KAFKA_BOOTSTRAP"]
    try:
        for variant in variants:
            if variant.endswith("_uvloop") and not uvloop_available():
                results[variant] = {"skipped": "uvloop is not installed in this environment"}
                log(f"{variant}: skipped, uvloop is not installed")
                continue
            data = inputs["single" if variant == "faust_single" else "batched"]
            results[variant] = run_variant(variant, bootstrap, settings_for(variant), data,
                                           args, other_cpu)  # fmt: skip
    finally:
        if own_broker:
            stop_kafka(BROKER_STATE)
    ratios, goals = summary(results)
    print(json.dumps({
        "benchmark": "stream_agent",
        "consumer_cpu": args.cpu,
        "broker_and_bench_cpu": other_cpu if own_broker else None,
        "batch_size": args.batch_size,
        "raw_partitions": args.partitions,
        "compression": load_settings(base).kafka_compression_type,
        "uvloop": "available" if uvloop_available() else "not available (not installed)",
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "variants": results,
        "ratios": ratios,
        "goals": goals,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
