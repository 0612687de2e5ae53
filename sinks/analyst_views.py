"""The views analysts read: the rollups broken down one way at a time, per hour or per day,
with small-count suppression.

Within each time bucket, a group (one value of the breakdown) with fewer than ``min_users``
distinct users is hidden: its breakdown columns read ``other`` and its counts are added to
the ``other`` row, so no aggregate singles out a person and totals still add up. A view
without a breakdown is the bucket's total and is always shown. Each view also carries the
merged aggregate states (``*_state`` columns), so a report can combine buckets into one
window exactly (``uniqIfMerge(users_state)``, ``quantilesIfMerge(...)(duration_ms_state)``);
a hidden group's states are only ever merged into ``other``'s.

On a ClickHouse server the analyst user reaches these views through Distributed tables of the
same names in ``<database>_analyst`` (``server_mirror_ddl``): 18.16 checks a view's source
tables against the reading user, and has no SQL grants, so a user allowed only the mirror
database reads the views through a loopback connection of the server's own, and can never
read the event tables or rollups.
"""

from dataclasses import dataclass
from typing import Final

from sinks.rollups import ROLLUPS, Measure, Rollup

MIRROR_CLUSTER: Final = "tally_self"
"""The cluster (in the server's ``remote_servers``) the analyst mirror reads the views over."""
OTHER: Final = "other"
_GRAINS: Final = {"hourly": ("hour", "hour"), "daily": ("day", "toDate(hour)")}


@dataclass(frozen=True)
class AnalystView:
    rollup: Rollup
    breakdown: tuple[str, ...]
    grain: str

    @property
    def name(self) -> str:
        by = f"_by_{'_'.join(self.breakdown)}" if self.breakdown else ""
        return f"analyst_{self.rollup.name}{by}_{self.grain}"

    @property
    def time_column(self) -> str:
        return _GRAINS[self.grain][0]


_ROLLUP = {rollup.name: rollup for rollup in ROLLUPS}
FILTER_DIMENSIONS: Final = (
    "app_id", "software_version", "os_family", "browser_family", "country_code",
)  # fmt: skip
"""The dimensions a dashboard filters by. Every rollup has one view broken down by all of them
at once, for filters in combination: a combination with fewer than ``min_users`` users is
hidden like any other group, so the narrower the filter, the more of it reads ``other``."""
_BREAKDOWNS: Final = {
    "logins": ((), ("outcome", "failure_reason"), ("software_version",), ("os_family",),
               ("browser_family",), ("country_code",), ("app_id", "channel"),
               FILTER_DIMENSIONS),
    "sessions": ((), ("end_reason",), ("quality_class", "quality_reason"), ("session_kind",),
                 ("software_version",), ("os_family",), ("browser_family",), ("country_code",),
                 ("device_class",), ("app_id", "channel"), FILTER_DIMENSIONS),
    "clients": ((), ("software_version",), ("os_family",), ("browser_family",),
                ("device_class",), ("platform",), ("country_code",), FILTER_DIMENSIONS),
}  # fmt: skip

ANALYST_VIEWS: Final = tuple(
    AnalystView(_ROLLUP[name], breakdown, grain)
    for name, breakdowns in _BREAKDOWNS.items()
    for breakdown in breakdowns
    for grain in _GRAINS
)


def analyst_view(rollup: str, breakdown: tuple[str, ...] = (), grain: str = "hourly") -> str:
    """The name of a view, checked to exist."""
    view = AnalystView(_ROLLUP[rollup], breakdown, grain)
    if view not in ANALYST_VIEWS:
        raise ValueError(f"no analyst view of {rollup} by {breakdown} {grain}")
    return view.name


def filtered_view(
    rollup: str, breakdown: tuple[str, ...], filters: tuple[str, ...], grain: str
) -> str | None:
    """The view to read a rollup broken down by ``breakdown`` and filtered on ``filters``:
    the one-dimension view when that is all it takes (fewer groups are hidden), else the view
    by every filter dimension; None when the breakdown is not among the filter dimensions."""
    wanted = set(breakdown) | set(filters)
    if not wanted <= set(FILTER_DIMENSIONS):
        return None
    if len(wanted) <= 1:
        single = AnalystView(_ROLLUP[rollup], tuple(wanted), grain)
        if single in ANALYST_VIEWS:
            return single.name
    return analyst_view(rollup, FILTER_DIMENSIONS, grain)


def _is_count(measure: Measure) -> bool:
    return measure.merge in ("countMerge", "countIfMerge")


def view_select(view: AnalystView, min_users: int) -> str:
    """The view's query: group the rollup by bucket and breakdown, then fold the groups with
    fewer than ``min_users`` users into ``other``."""
    time_column, time_expression = _GRAINS[view.grain]
    inner = [f"{time_expression} AS {time_column}"]
    inner += [f"{column} AS g_{column}" for column in view.breakdown]
    outer = [time_column]
    outer += [f"if(visible, g_{column}, '{OTHER}') AS {column}" for column in view.breakdown]
    for m in view.rollup.measures:
        if _is_count(m):
            inner.append(f"{m.merge}({m.name}) AS c_{m.name}")
            outer.append(f"sum(c_{m.name}) AS {m.name}")
        else:
            inner.append(f"{m.merge_state}({m.name}) AS s_{m.name}")
            outer.append(f"{m.merge}(s_{m.name}) AS {m.name}")
            outer.append(f"{m.merge_state}(s_{m.name}) AS {m.name}_state")
    inner.append(f"uniqIfMerge(users) >= {int(min_users)} AS visible")
    inner_group = ", ".join([time_column, *(f"g_{column}" for column in view.breakdown)])
    outer_group = ", ".join([time_column, *view.breakdown])
    return (
        f"SELECT {', '.join(outer)}\n"
        f"FROM (\n  SELECT {', '.join(inner)}\n  FROM {view.rollup.table}\n"
        f"  GROUP BY {inner_group}\n)\n"
        f"GROUP BY {outer_group}"
    )


def analyst_views_ddl(min_users: int) -> list[str]:
    """Drop and create every view (they hold no data, and ``min_users`` may have changed)."""
    if min_users < 1:
        raise ValueError("min_users must be at least 1")
    statements = []
    for view in ANALYST_VIEWS:
        statements.append(f"DROP TABLE IF EXISTS {view.name}")
        statements.append(f"CREATE VIEW {view.name} AS\n{view_select(view, min_users)}")
    return statements


def mirror_database(database: str) -> str:
    return f"{database}_analyst"


def server_mirror_ddl(database: str, described: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Distributed tables in ``<database>_analyst``, one per view, with the view's columns
    (``described``: view name to (column, type) pairs, as DESCRIBE gives them)."""
    mirror = mirror_database(database)
    statements = [f"CREATE DATABASE IF NOT EXISTS {mirror}"]
    for view in ANALYST_VIEWS:
        columns = ", ".join(f"{name} {ch_type}" for name, ch_type in described[view.name])
        statements.append(f"DROP TABLE IF EXISTS {mirror}.{view.name}")
        statements.append(
            f"CREATE TABLE {mirror}.{view.name} ({columns}) "
            f"ENGINE = Distributed({MIRROR_CLUSTER}, {database}, {view.name})"
        )
    return statements
