"""Aggregate queries that `tally report` and `tally run` print."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.enriched import table_name
from sinks.backends import ClickHouseBackend


@dataclass(frozen=True)
class LoginHour:
    hour: datetime
    logins: int
    failures: int
    users: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.logins if self.logins else 0.0


def logins_per_hour(backend: ClickHouseBackend) -> list[LoginHour]:
    """Logins, failed logins and distinct pseudonymous users per hour (deduplicated), every
    hour from the first to the last that has logins."""
    rows = backend.query(
        "SELECT toStartOfHour(event_time) AS hour, toUInt64(count()) AS logins, "
        "toUInt64(countIf(outcome = 'failure')) AS failures, "
        "toUInt64(uniqExactIf(user_pseudonym, user_pseudonym != '')) AS users "
        f"FROM {table_name('login')} FINAL GROUP BY hour ORDER BY hour"
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
