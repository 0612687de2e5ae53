"""`tally up`: everything Tally needs on one machine, until stopped.

The Kafka broker (unless ``TALLY_KAFKA_BOOTSTRAP`` names a cluster), the migrations, then the
sink and the stream worker as supervised child processes (deploy/services/supervisor.py).
SIGINT or SIGTERM stops them in order: the collector first (it answers the requests in
hand), then the worker (it finishes and commits what it
took), then the sink (it writes and commits its batch), then the broker. On embedded
ClickHouse the sink process owns the data folder and answers `tally status` and
`tally report` (sinks/query_service.py).
"""

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from deploy.interrupts import Interrupted, raise_if_interrupted
from deploy.kafka import ensure_topics
from deploy.run import kafka_for
from deploy.services.process import log_tail, spawn_child, stop_child
from deploy.services.supervisor import (
    DEFAULT_RESTART_POLICY,
    ChildSpec,
    CrashLoop,
    RestartPolicy,
    Supervisor,
)
from deploy.settings import Settings, settings_environ
from deploy.wiring import topic_specs

log = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.2


def up_state_file(settings: Settings) -> Path:
    """What `tally up` runs now, for `tally status` (rewritten on every start and death)."""
    return settings.state_dir / "run" / "up.json"


def service_specs(settings: Settings, bootstrap: str) -> list[ChildSpec]:
    """The supervised services in start order (stopped in the reverse order)."""
    env = {**os.environ, **settings_environ(settings), "TALLY_KAFKA_BOOTSTRAP": bootstrap}
    logs = settings.state_dir / "logs"
    names = ["sink", "worker", "collector"]
    if settings.dashboard_port:
        names.append("dashboard")
    return [
        ChildSpec(name, [sys.executable, "-m", "deploy.cli", name], logs / f"{name}.log", env)
        for name in names
    ]


def apply_migrations_in_child(settings: Settings) -> bool:
    """`tally migrate` in a process of its own: embedded ClickHouse would otherwise stay
    loaded in `tally up` (265 MB) for as long as it runs. False, with one line, on failure."""
    log_path = settings.state_dir / "logs" / "migrate.log"
    child = spawn_child(
        [sys.executable, "-m", "deploy.cli", "migrate"], log_path=log_path,
        env={**os.environ, **settings_environ(settings)},
    )  # fmt: skip
    try:
        status = child.wait()
    finally:
        stop_child(child)  # an interrupt while it runs
    if status != 0:
        print(f"tally up: migrations failed; see {log_path}{log_tail(log_path, 1)}",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def run_up(settings: Settings, policy: RestartPolicy = DEFAULT_RESTART_POLICY) -> int:
    """Run until SIGINT or SIGTERM (exit 0 once everything stopped) or until a service keeps
    dying (exit 1 with one line naming it and its log)."""
    try:
        if not apply_migrations_in_child(settings):
            return 1
        with contextlib.ExitStack() as stack:
            bootstrap = stack.enter_context(kafka_for(settings))
            ensure_topics(bootstrap, topic_specs(settings))
            supervisor = stack.enter_context(
                Supervisor(service_specs(settings, bootstrap), policy, up_state_file(settings))
            )
            log.info(
                "tally up: running on Kafka %s and %s ClickHouse; stop with Ctrl-C or SIGTERM",
                bootstrap,
                settings.clickhouse_backend,
            )
            while True:
                raise_if_interrupted()
                supervisor.watch()
                time.sleep(_WATCH_INTERVAL_S)  # the supervisor polls its children
    except Interrupted:
        log.info("tally up: stopped")
        return 0
    except CrashLoop as err:
        print(f"tally up: {err}; everything started was stopped", file=sys.stderr)
        return 1
