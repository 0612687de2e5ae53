"""The `tally` command."""

import argparse
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.interrupts import (
    Interrupted,
    ignore_interrupts_from_now,
    install_interrupt_handlers,
)
from deploy.kafka import TopicMismatchError
from deploy.settings import Settings, SettingsError, load_settings

log = logging.getLogger("deploy.cli")


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.run import StageFailed, run_pipeline

    try:
        summary = run_pipeline(settings)
    except StageFailed as err:
        print(f"tally: {err}; everything started was stopped", file=sys.stderr)
        return 1
    print()
    print(summary.quality_report)
    print()
    print("Logins per hour, read back from ClickHouse:")
    print(summary.report)
    print()
    first = f"{summary.seconds_to_first_row:.1f} s" if summary.seconds_to_first_row else "never"
    print(
        f"{summary.events_sent} events sent, {summary.rows_written} rows written; "
        f"first row after {first}, whole run {summary.seconds_total:.1f} s"
    )
    print(
        f"ways in: {summary.sent_over_http} client events over HTTP (the collector accepted "
        f"{summary.collector_accepted}), {summary.events_sent - summary.sent_over_http} "
        "server events through the Kafka SDK"
    )
    return 0 if summary.rows_written >= summary.events_sent else 1


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import faust

    from deploy.wiring import CurrentLookups, serve_metrics, stream_config
    from streams.app import create_app
    from streams.metrics import new_stream_metrics

    if not settings.kafka_bootstrap:
        raise SettingsError("TALLY_KAFKA_BOOTSTRAP: the worker needs a Kafka cluster")
    config = stream_config(settings, settings.kafka_bootstrap)
    metrics = new_stream_metrics()
    lookups = CurrentLookups(settings)
    metrics.active_key_age.set_function(lookups.active_key_age_s)
    app = create_app(config, lookups, metrics)
    if settings.worker_metrics_port:
        serve_metrics(
            metrics.registry,
            settings.worker_metrics_host,
            settings.worker_metrics_port,
            "TALLY_WORKER_METRICS_PORT",
        )

    class StreamWorker(faust.Worker):
        async def on_startup_finished(self) -> None:
            await super().on_startup_finished()
            log.info("stream worker ready: %s to %s", config.topics.raw, config.topics.enriched)

    worker = StreamWorker(app, loglevel=settings.log_level.lower(), quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        log.info("stream worker stopped")
    return 0


def _sink(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.sink_service import run_sink_service

    return run_sink_service(settings)


def _collector(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.collector_service import run_collector_service

    return run_collector_service(settings)


def _dashboard(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.dashboard import run_dashboard_service

    if not settings.dashboard_port:
        raise SettingsError("TALLY_DASHBOARD_PORT: 0 serves no dashboard; name a port")
    return run_dashboard_service(settings)


def _apps(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from producers.collector.apps import (
        AppsError,
        list_apps,
        normalize_origin,
        register_app,
        revoke_app,
    )

    path = settings.collector_apps_path
    try:
        if args.action == "add":
            keys = register_app(path, args.name, args.origins)
            if args.json:
                print(orjson.dumps({"app_id": keys.app_id, "write_key": keys.write_key,
                                    "secret_key": keys.secret_key}).decode())  # fmt: skip
                return 0
            origins = ", ".join(dict.fromkeys(normalize_origin(o) for o in args.origins))
            origins = origins or "none (only clients that send no Origin)"
            print(f"registered app {keys.app_id} (origins: {origins}) in {path}")
            print("Its keys are shown this once; only their hashes are kept.")
            print(f"  write key (public: goes in the web page):  {keys.write_key}")
            print(f"  secret key (server-side senders only):     {keys.secret_key}")
        elif args.action == "list":
            apps = list_apps(path)
            if not apps:
                print(f"no apps in {path}")
                return 0
            table = [("APP", "CREATED", "REVOKED", "ORIGINS")] + [
                (a.app_id, a.created, a.revoked or "-", ", ".join(a.origins) or "-") for a in apps
            ]
            widths = [max(len(row[i]) for row in table) for i in range(3)]
            for row in table:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  "
                      + row[3])  # fmt: skip
        elif revoke_app(path, args.name):
            print(f"revoked app {args.name}: its keys get 401 within a second")
        else:
            print(f"app {args.name} was already revoked")
    except AppsError as err:
        print(f"tally: {err}", file=sys.stderr)
        return 1
    return 0


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    import time

    from deploy.daily_keys import DailyKeyError
    from deploy.keys import KeyRingError, destroy_key, make_key_ring, rotate_key

    if settings.hmac_key is not None:
        print("tally: TALLY_HMAC_KEY holds the key; rotate it where it is kept", file=sys.stderr)
        return 1
    path = settings.hmac_key_path
    try:
        if args.action == "list":
            if settings.hmac_key_file is None:
                make_key_ring(path)
            print(_key_listing(settings, time.time()))
        elif args.action == "rotate":
            new = rotate_key(path)
            print(f"new key {new.key.key_id} is active; running workers take it within seconds")
        else:
            destroy_key(path, args.key_id)
            print(f"destroyed key {args.key_id}: its pseudonyms can no longer be linked to anyone")
    except (KeyRingError, DailyKeyError) as err:
        print(f"tally: {err}", file=sys.stderr)
        return 1
    return 0


def _key_listing(settings: Settings, now: float) -> str:
    """The ring's keys, the active one first, then the daily keys of anonymous consent: ids,
    ages and what each is for, never a secret."""
    from datetime import UTC, datetime

    from deploy.daily_keys import destroyed_after_s, read_daily_keys
    from deploy.keys import read_key_ring

    rows: list[tuple[str, str, str]] = []
    for n, ring_key in enumerate(read_key_ring(settings.hmac_key_path)):
        age = "unknown" if ring_key.created_s is None else _age(now - ring_key.created_s)
        note = "active: pseudonymizes full consent" if n == 0 else ""
        rows.append((ring_key.key.key_id, age, note))
    daily = read_daily_keys(settings.daily_keys_path)
    for day in sorted(daily.by_day):
        daily_key = daily.by_day[day]
        age = "unknown" if daily_key.created_s is None else _age(now - daily_key.created_s)
        due = destroyed_after_s(day, settings.allowed_lateness_s)
        when = (
            f"destroyed at {datetime.fromtimestamp(due, UTC):%Y-%m-%d %H:%M} UTC"
            if due > now
            else "past lateness: destroyed at a worker's next check"
        )
        rows.append((daily_key.key.key_id, age, f"anonymous consent on {day}, {when}"))
    width = max(len(key_id) for key_id, _, _ in rows)
    lines = [f"{'KEY':<{width}} AGE"]
    lines += [f"{key_id:<{width}} {age:<8} {note}".rstrip() for key_id, age, note in rows]
    if daily.finished_through:
        lines.append(
            f"days up to {daily.finished_through}: finished, no anonymous key kept or made"
        )
    return "\n".join(lines)


def _age(seconds: float) -> str:
    days, rest = divmod(int(max(seconds, 0)), 86400)
    return f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.up import run_up

    return run_up(settings)


def _status(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from deploy.kafka import running_kafka
    from deploy.status import format_status, gather_status, status_as_json

    local = running_kafka(settings.state_dir / "kafka")
    bootstrap = settings.kafka_bootstrap or (local.bootstrap if local else None)
    status = gather_status(settings, bootstrap)
    if args.json:
        print(orjson.dumps(status_as_json(status), option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_status(status))
    return 0 if status.healthy else 1


def _kafka(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.kafka import ensure_topics, start_kafka, stop_kafka
    from deploy.wiring import kafka_jars_dir, topic_specs

    state = settings.state_dir / "kafka"
    if args.action == "stop":
        print("stopped" if stop_kafka(state) else "not running")
        return 0
    broker = start_kafka(
        state,
        kafka_jars_dir(settings),
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
    )
    ensure_topics(broker.bootstrap, topic_specs(settings))
    print(f"Kafka at {broker.bootstrap} (pid {broker.pid}, log {broker.log_path})")
    return 0


def _topics(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.kafka import ensure_topics
    from deploy.wiring import topic_specs

    if not settings.kafka_bootstrap:
        raise SettingsError("TALLY_KAFKA_BOOTSTRAP: which cluster's topics to create and check")
    specs = topic_specs(settings)
    ensure_topics(settings.kafka_bootstrap, specs)
    for spec in specs:
        print(f"{spec.name}: {spec.partitions} partitions, retention.ms {spec.retention_ms}")
    return 0


def _clickhouse(settings: Settings, args: argparse.Namespace) -> int:
    import shlex

    from deploy.clickhouse import start_clickhouse_server, stop_clickhouse_server

    state = settings.state_dir / "clickhouse-server"
    if args.action == "stop":
        print("stopped" if stop_clickhouse_server(state) else "not running")
        return 0
    server = start_clickhouse_server(state, tcp_port=settings.clickhouse_port)
    # The `tally` user's password, made by the start (deploy/clickhouse.py), mode 0600: its
    # path is printed, never the password, and the output can be eval'd by a shell.
    password_file = state.resolve() / "secrets" / "tally-password"
    exports = {
        "TALLY_CLICKHOUSE_BACKEND": "server",
        "TALLY_CLICKHOUSE_HOST": server.host,
        "TALLY_CLICKHOUSE_PORT": str(server.tcp_port),
        "TALLY_CLICKHOUSE_USER": "tally",
        "TALLY_CLICKHOUSE_PASSWORD_FILE": str(password_file),
    }
    print(f"# ClickHouse server at {server.host}:{server.tcp_port} (log {server.log_path})")
    print("# To reach it, export:")
    print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()))
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.wiring import open_backend
    from sinks.backends import ClickHouseError
    from sinks.migrations import apply_migrations

    try:
        backend = open_backend(settings)
        try:
            applied = apply_migrations(backend, settings.analyst_min_users)
        finally:
            backend.close()
    except ClickHouseError as err:
        print(f"tally migrate: {err}", file=sys.stderr)
        return 1
    print(f"applied migrations: {applied or 'none (up to date)'}")
    print(f"analyst views made afresh: groups under {settings.analyst_min_users} users hidden")
    return 0


def _retention(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from deploy.wiring import open_backend
    from sinks.retention import drop_expired_partitions

    backend = open_backend(settings)
    try:
        dropped = drop_expired_partitions(
            backend,
            datetime.now(UTC).date(),
            settings.retention_event_days,
            settings.retention_rollup_days,
        )
    finally:
        backend.close()
    for partition in dropped:
        print(f"dropped {partition.table} partition {partition.partition}")
    print(
        f"{len(dropped)} partitions dropped (events after {settings.retention_event_days} "
        f"days, rollups after {settings.retention_rollup_days})"
    )
    return 0


def _erase(settings: Settings, args: argparse.Namespace) -> int:
    from deploy.wiring import open_backend, user_pseudonyms
    from sinks.erasure import erase_pseudonyms

    pseudonyms = user_pseudonyms(settings, args.user)
    backend = open_backend(settings)
    try:
        deleted = erase_pseudonyms(backend, pseudonyms)
    finally:
        backend.close()
    for table, count in deleted.items():
        print(f"{table}: {count} rows deleted")
    print(
        f"erased the user under {len(pseudonyms)} live keys; a replay will not restore the "
        "rows (rollups hold no ids and stay)"
    )
    return 0


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    import time

    import orjson

    from deploy.bench import BenchOptions, run_bench

    if args.rate < 0 or args.seconds <= 0 or args.connections < 1:
        raise SettingsError("tally bench: --rate >= 0, --seconds > 0 and --connections >= 1")
    out = args.out or settings.state_dir / "bench" / time.strftime("%Y%m%d-%H%M%S")
    result = run_bench(
        settings, BenchOptions(args.rate, args.seconds, out, connections=args.connections)
    )
    figures = {key: result[key] for key in ("events_per_s", "latency_s",
               "processes_peak_rss_mb", "kafka_pass_through", "ratio_to_kafka_pass_through",
               "goals", "files")}  # fmt: skip
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


def _report(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from deploy.wiring import open_reader
    from sinks.report import (
        format_logins_per_hour,
        format_report,
        logins_per_hour,
        quality_report,
        report_as_csv,
        report_as_json,
    )

    backend = open_reader(settings)
    try:
        report = quality_report(backend, datetime.now(UTC), timedelta(hours=args.hours))
        if args.format == "json":
            print(report_as_json(report))
        elif args.format == "csv":
            print(report_as_csv(report), end="")
        else:
            print(format_report(report))
            print()
            print(format_logins_per_hour(logins_per_hour(backend, report.start, report.end)))
    finally:
        backend.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally", description="Privacy-first service-quality telemetry."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole pipeline on a synthetic workload, then a report")
    run.add_argument("--events", type=int, dest="workload_events")
    run.add_argument("--clients", type=int, dest="workload_clients")
    run.add_argument("--duration", type=float, dest="workload_duration_s", metavar="SECONDS")
    run.add_argument("--seed", type=int, dest="workload_seed")
    run.set_defaults(handler=_run)
    sub.add_parser("worker", help="the Faust stream worker, until stopped").set_defaults(
        handler=_worker
    )
    sub.add_parser("sink", help="the ClickHouse sink, until stopped").set_defaults(handler=_sink)
    sub.add_parser(
        "collector", help="the HTTP collector: events over HTTP into the raw topic, until stopped"
    ).set_defaults(handler=_collector)
    sub.add_parser(
        "dashboard", help="the built-in quality dashboard on loopback, until stopped"
    ).set_defaults(handler=_dashboard)
    apps = sub.add_parser("apps", help="the apps that may send to the collector, and their keys")
    apps_sub = apps.add_subparsers(dest="action", required=True)
    add = apps_sub.add_parser("add", help="register an app and print its keys, once")
    add.add_argument("name", help="the app_id its events carry")
    add.add_argument(
        "--origin",
        action="append",
        default=[],
        dest="origins",
        metavar="ORIGIN",
        help="a web origin (https://host[:port]) its browser clients send from; repeatable",
    )
    add.add_argument("--json", action="store_true", help="the keys as one JSON object")
    apps_sub.add_parser("list", help="names, origins, created, revoked (never keys)")
    revoke = apps_sub.add_parser("revoke", help="revoke an app's keys")
    revoke.add_argument("name")
    apps.set_defaults(handler=_apps)
    keys = sub.add_parser("keys", help="the pseudonymization key ring (ids and ages, never keys)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    keys_sub.add_parser("list", help="key ids and ages, the active one first")
    keys_sub.add_parser("rotate", help="add a new key; new events are pseudonymized with it")
    destroy = keys_sub.add_parser(
        "destroy", help="remove a key for good: its pseudonyms become unlinkable"
    )
    destroy.add_argument("key_id")
    keys.set_defaults(handler=_keys)
    sub.add_parser(
        "up", help="broker, migrations, sink and worker on this machine, supervised, until stopped"
    ).set_defaults(handler=_up)
    status = sub.add_parser("status", help="what runs, consumer lag, rows, recent dead letters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)
    for name, handler in (("kafka", _kafka), ("clickhouse", _clickhouse)):
        service = sub.add_parser(name, help=f"start or stop the local {name} service")
        service.add_argument("action", choices=("start", "stop"))
        service.set_defaults(handler=handler)
    sub.add_parser("migrate", help="apply ClickHouse migrations").set_defaults(handler=_migrate)
    sub.add_parser(
        "retention", help="drop event and rollup partitions past retention"
    ).set_defaults(handler=_retention)
    erase = sub.add_parser("erase", help="delete one user's event-level rows, for good")
    erase.add_argument("--user", required=True, help="the user id as the clients send it")
    erase.set_defaults(handler=_erase)
    sub.add_parser(
        "topics", help="create Tally's topics on the configured cluster and hold them to spec"
    ).set_defaults(handler=_topics)
    bench = sub.add_parser(
        "bench", help="the whole pipeline under load through the collector: JSON and a plot"
    )
    bench.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="events/s to offer (default 0: as fast as the collector answers)",
    )
    bench.add_argument("--seconds", type=float, default=30.0, help="how long to send")
    bench.add_argument("--connections", type=int, default=8, help="HTTP connections")
    bench.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for bench.json and bench.png (default: state_dir/bench/...)",
    )
    bench.set_defaults(handler=_bench)
    report = sub.add_parser("report", help="the service-quality report, through the analyst views")
    report.add_argument("--hours", type=float, default=24.0, help="the window (default 24)")
    report.add_argument("--format", choices=("text", "json", "csv"), default="text")
    report.set_defaults(handler=_report)
    return parser


# Kafka clients log whole protocol messages at DEBUG, record batches with raw ids and IPs
# among them: Tally's DEBUG never reaches them. kafka-python says a line per connection at
# INFO, and warns whenever a step of its own event loop takes over 100 ms, which a busy
# 2-core machine causes and no user can act on.
_KAFKA_CLIENT_LOG_LEVELS = {
    "aiokafka": logging.INFO,
    "kafka": logging.WARNING,
    "kafka.net.selector": logging.ERROR,
}


class ReadAfterCloseFilter(logging.Filter):
    """Drops kafka-python 3.0's ERROR for a read on a transport it had already closed.

    Its transport's read task awaits readability, then reads without checking whether the
    transport was closed meanwhile; ``close()`` has by then dropped and closed the socket,
    so the read fails and is logged with a traceback (seen in a CI run of `tally run`, on a
    bootstrap connection kafka-python closes once it knows the cluster). The connection was
    closed on purpose and its requests were settled by the close: nothing is lost. A read
    error on a transport that is still open stays an ERROR.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        transport = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (
            "Error receiving network data" in str(record.msg)
            and getattr(transport, "_closed", False) is True
        )


def configure_logging(level: str) -> None:
    """Tally's log format at ``level``, with the Kafka clients held back (see above)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, floor in _KAFKA_CLIENT_LOG_LEVELS.items():
        logging.getLogger(name).setLevel(max(floor, logging.getLevelName(level)))
    transport_log = logging.getLogger("kafka.net.transport")
    if not any(isinstance(f, ReadAfterCloseFilter) for f in transport_log.filters):
        transport_log.addFilter(ReadAfterCloseFilter())


# Long-running services stop on a signal by finishing their work in hand, not by an
# exception: Faust handles the worker's signals, deploy/sink_service.py the sink's and
# deploy/collector_service.py the collector's.
_SERVICES = frozenset({"worker", "sink", "collector"})

_OVERRIDES = ("workload_events", "workload_clients", "workload_duration_s", "workload_seed")


def main(argv: Sequence[str] | None = None) -> int:
    # `kill -USR1 PID` prints every thread's stack to stderr: how to see where a stop hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = _parser().parse_args(argv)
    if args.command == "worker":
        sys.argv = [sys.argv[0], "worker"]  # faust.Worker parses argv itself
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in _OVERRIDES}
    try:
        settings = load_settings(os.environ, overrides)
    except SettingsError as err:
        print(f"tally: invalid configuration: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command not in _SERVICES:
        install_interrupt_handlers()
    try:
        return int(args.handler(settings, args))
    except SettingsError as err:
        print(f"tally: invalid configuration: {err}", file=sys.stderr)
        return 2
    except TopicMismatchError as err:
        print(f"tally: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print("tally: interrupted; everything started was stopped", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("tally: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        ignore_interrupts_from_now()


if __name__ == "__main__":
    sys.exit(main())
