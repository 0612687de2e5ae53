"""The service-quality report `tally report` and `tally run` print, read only through the
analyst views, so small-count suppression applies to every figure in it."""

import csv
import io
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from sinks.analyst_views import OTHER, analyst_view
from sinks.backends import ClickHouseBackend

_LEVELS = "0.5, 0.95, 0.99"
WORST_MIN_SESSIONS = 20
"""A version or country needs this many sessions in the window to be ranked by poor calls."""


@dataclass(frozen=True)
class LoginHour:
    hour: datetime
    logins: int
    failures: int
    users: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.logins if self.logins else 0.0


def _window(start: datetime, end: datetime) -> str:
    first, after = int(start.timestamp()), int(end.timestamp())
    return f"hour >= toDateTime({first}) AND hour < toDateTime({after})"


def logins_per_hour(
    backend: ClickHouseBackend, start: datetime | None = None, end: datetime | None = None
) -> list[LoginHour]:
    """Logins, failed logins and distinct pseudonymous users per hour, every hour from the
    first to the last that has logins (within the window, if given)."""
    where = f"WHERE {_window(start, end)}" if start and end else ""
    rows = backend.query(
        "SELECT hour, toUInt64(sum(logins)), toUInt64(sum(failures)), toUInt64(sum(users)) "
        f"FROM {analyst_view('logins')} {where} GROUP BY hour ORDER BY hour"
    )
    found = {hour: LoginHour(hour, *counts) for hour, *counts in rows}
    if not found:
        return []
    hours, last = [], max(found)
    hour = min(found)
    while hour <= last:  # an hour without logins is a row of zeros, not a gap
        hours.append(found.get(hour, LoginHour(hour, 0, 0, 0)))
        hour += timedelta(hours=1)
    return hours


def format_logins_per_hour(hours: list[LoginHour]) -> str:
    """A plain text table, one line per hour."""
    lines = [f"{'hour (UTC)':<17} {'logins':>8} {'failed':>8} {'fail %':>7} {'users':>7}"]
    for h in hours:
        lines.append(
            f"{h.hour:%Y-%m-%d %H:%M} {h.logins:>8} {h.failures:>8} "
            f"{100 * h.failure_rate:>6.1f}% {h.users:>7}"
        )
    total = sum(h.logins for h in hours)
    lines.append(f"{'total':<17} {total:>8} {sum(h.failures for h in hours):>8}")
    return "\n".join(lines)


@dataclass
class WindowFigures:
    """One window's service quality."""

    logins: int = 0
    login_failures: int = 0
    login_users: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    sessions_started: int = 0
    sessions_normal: int = 0
    sessions_dropped: int = 0
    sessions_errored: int = 0
    sessions_timed_out: int = 0
    session_users: int = 0
    duration_ms: list[float] = field(default_factory=list)
    """p50, p95, p99 of the server-measured duration."""
    rtt_ms: list[float] = field(default_factory=list)
    jitter_ms: list[float] = field(default_factory=list)
    loss_pct: list[float] = field(default_factory=list)
    mos: list[float] = field(default_factory=list)
    quality_classes: dict[str, int] = field(default_factory=dict)
    poor_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def login_failure_rate(self) -> float:
        return self.login_failures / self.logins if self.logins else 0.0

    @property
    def drop_rate(self) -> float:
        return self.sessions_dropped / self.sessions if self.sessions else 0.0

    @property
    def poor_share(self) -> float:
        return self.quality_classes.get("poor", 0) / self.sessions if self.sessions else 0.0


@dataclass
class Ranked:
    name: str
    sessions: int
    poor_share: float


@dataclass
class QualityReport:
    start: datetime
    end: datetime
    now: WindowFigures
    before: WindowFigures
    worst_versions: list[Ranked]
    worst_countries: list[Ranked]


def _window_figures(backend: ClickHouseBackend, start: datetime, end: datetime) -> WindowFigures:
    where = _window(start, end)
    figures = WindowFigures()
    [(logins, failures, users)] = backend.query(
        "SELECT toUInt64(sum(logins)), toUInt64(sum(failures)), uniqIfMerge(users_state) "
        f"FROM {analyst_view('logins')} WHERE {where}"
    )
    figures.logins, figures.login_failures, figures.login_users = logins, failures, users
    figures.failures_by_reason = {
        reason or OTHER: int(count)
        for reason, count in backend.query(
            f"SELECT failure_reason, toUInt64(sum(failures)) AS n "
            f"FROM {analyst_view('logins', ('outcome', 'failure_reason'))} "
            f"WHERE {where} AND outcome != 'success' GROUP BY failure_reason ORDER BY n DESC"
        )
        if count
    }
    [row] = backend.query(
        "SELECT toUInt64(sum(sessions)), toUInt64(sum(started)), toUInt64(sum(normal)), "
        "toUInt64(sum(dropped)), toUInt64(sum(errored)), toUInt64(sum(timed_out)), "
        "uniqIfMerge(users_state), "
        + ", ".join(
            f"quantilesIfMerge({_LEVELS})({name}_state)"
            for name in ("duration_ms", "rtt_ms", "jitter_ms", "loss_pct", "mos")
        )
        + f" FROM {analyst_view('sessions')} WHERE {where}"
    )
    (figures.sessions, figures.sessions_started, figures.sessions_normal,
     figures.sessions_dropped, figures.sessions_errored, figures.sessions_timed_out,
     figures.session_users) = (int(value) for value in row[:7])  # fmt: skip
    if figures.sessions:
        quantiles = [[round(float(v), 2) for v in values] for values in row[7:]]
        figures.duration_ms, figures.rtt_ms, figures.jitter_ms = quantiles[:3]
        figures.loss_pct, figures.mos = quantiles[3:]
    by_class = backend.query(
        f"SELECT quality_class, quality_reason, toUInt64(sum(sessions)) "
        f"FROM {analyst_view('sessions', ('quality_class', 'quality_reason'))} "
        f"WHERE {where} GROUP BY quality_class, quality_reason"
    )
    for quality_class, reason, count in by_class:
        figures.quality_classes[quality_class] = (
            figures.quality_classes.get(quality_class, 0) + count
        )
        if quality_class == "poor":
            figures.poor_reasons[reason] = figures.poor_reasons.get(reason, 0) + count
    return figures


def _worst(backend: ClickHouseBackend, column: str, start: datetime, end: datetime) -> list[Ranked]:
    rows = backend.query(
        f"SELECT {column}, toUInt64(sum(sessions)) AS n, sum(poor) / sum(sessions) AS share "
        f"FROM {analyst_view('sessions', (column,))} WHERE {_window(start, end)} "
        f"AND {column} != '{OTHER}' GROUP BY {column} HAVING n >= {WORST_MIN_SESSIONS} "
        f"ORDER BY share DESC, {column} LIMIT 5"
    )
    return [Ranked(name, int(n), round(float(share), 4)) for name, n, share in rows]


def quality_report(
    backend: ClickHouseBackend, end: datetime, window: timedelta = timedelta(hours=24)
) -> QualityReport:
    """The window ending at ``end`` (whole hours), and the same length before it."""
    end = end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - window
    return QualityReport(
        start,
        end,
        _window_figures(backend, start, end),
        _window_figures(backend, start - window, start),
        _worst(backend, "software_version", start, end),
        _worst(backend, "country_code", start, end),
    )


def _change(now: float, before: float, percent: bool = False) -> str:
    if percent:
        return f"{100 * now:.1f}% ({100 * (now - before):+.1f} pts)"
    if not before:
        return f"{now:,.0f} (new)" if now else "0"
    return f"{now:,.0f} ({100 * (now - before) / before:+.0f}%)"


def _quantiles(values: list[float], unit: str) -> str:
    return " / ".join(f"{v:g}" for v in values) + f" {unit}" if values else "n/a"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counts.items()) or "none"


def _shares(counts: dict[str, int], total: int) -> str:
    if not total:
        return "n/a"
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{name or 'none'} {100 * n / total:.1f}%" for name, n in ordered)


def format_report(report: QualityReport) -> str:
    """The report as an SRE reads it in a terminal."""
    now, before = report.now, report.before
    lines = [
        f"Service quality {report.start:%Y-%m-%d %H:%M} to {report.end:%Y-%m-%d %H:%M} UTC "
        "(change against the window before; groups under the suppression threshold read "
        f"'{OTHER}')",
        f"  logins            {_change(now.logins, before.logins)}, "
        f"failure rate {_change(now.login_failure_rate, before.login_failure_rate, True)}, "
        f"{now.login_users:,} users",
        f"  failures by reason {_counts(now.failures_by_reason)}",
        f"  sessions          {_change(now.sessions, before.sessions)}: {now.sessions_normal:,} "
        f"normal, {now.sessions_dropped:,} dropped, {now.sessions_errored:,} errored, "
        f"{now.sessions_timed_out:,} timed out; {now.session_users:,} users",
        f"  drop rate         {_change(now.drop_rate, before.drop_rate, True)}",
        f"  duration p50/p95/p99  {_quantiles([v / 1000 for v in now.duration_ms], 's')}",
        f"  call quality      {_shares(now.quality_classes, now.sessions)}; poor share "
        f"{_change(now.poor_share, before.poor_share, True)}",
        f"  poor calls by reason  {_shares(now.poor_reasons, sum(now.poor_reasons.values()))}",
        f"  RTT p50/p95/p99   {_quantiles(now.rtt_ms, 'ms')}   "
        f"jitter {_quantiles(now.jitter_ms, 'ms')}",
        f"  loss p50/p95/p99  {_quantiles(now.loss_pct, '%')}   MOS {_quantiles(now.mos, '')}",
    ]
    for title, ranked in (
        ("versions", report.worst_versions),
        ("countries", report.worst_countries),
    ):
        listed = ", ".join(f"{r.name} {100 * r.poor_share:.1f}% of {r.sessions}" for r in ranked)
        listed = listed or f"none with {WORST_MIN_SESSIONS}+ sessions"
        lines.append(f"  worst {title} by poor calls  {listed}")
    return "\n".join(lines)


def report_as_dict(report: QualityReport) -> dict[str, Any]:
    data = asdict(report)
    for window in ("now", "before"):
        figures = getattr(report, window)
        data[window] |= {
            "login_failure_rate": round(figures.login_failure_rate, 4),
            "drop_rate": round(figures.drop_rate, 4),
            "poor_share": round(figures.poor_share, 4),
        }
    return data


def report_as_json(report: QualityReport) -> str:
    return orjson.dumps(report_as_dict(report), option=orjson.OPT_INDENT_2).decode()


def report_as_csv(report: QualityReport) -> str:
    """One row per figure: name, this window, the window before (lists and maps flattened)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["figure", "window", "before"])
    data = report_as_dict(report)
    for name, value in data["now"].items():
        before = data["before"][name]
        if isinstance(value, dict):
            for key in sorted(set(value) | set(before)):
                writer.writerow([f"{name}.{key}", value.get(key, 0), before.get(key, 0)])
        elif isinstance(value, list):
            for level, (v, b) in zip(_LEVELS.split(", "), _padded(value, before), strict=True):
                writer.writerow([f"{name}.p{float(level) * 100:g}", v, b])
        else:
            writer.writerow([name, value, before])
    for title in ("worst_versions", "worst_countries"):
        for ranked in data[title]:
            writer.writerow([f"{title}.{ranked['name']}.poor_share", ranked["poor_share"], ""])
    return out.getvalue()


def _padded(now: list[float], before: list[float]) -> list[tuple[Any, Any]]:
    blank: list[Any] = [""] * len(_LEVELS.split(", "))
    return list(zip(now or blank, before or blank, strict=True))
