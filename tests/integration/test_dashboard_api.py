"""The built-in dashboard's HTTP API on both ClickHouse backends: every panel answers with
rows after a workload, filters narrow what the panels count (alone, combined, or on a group
too small to show), hostile filter values are only values, and the page and its chart library
come from the dashboard itself under a policy that allows no other host."""

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer

from deploy.dashboard.pipeline import PipelineWatch
from deploy.dashboard.server import SQL_PANELS, dashboard_app
from sinks.backends import ClickHouseBackend
from sinks.migrations import apply_migrations
from sinks.writer import ClickHouseWriter
from tests.integration.test_rollups import NOW, K, workload, write

VERSIONS_PANEL = next(n for n, p in enumerate(SQL_PANELS) if p.title.startswith("Software"))
DROP_PANEL = next(n for n, p in enumerate(SQL_PANELS) if p.title.startswith("Sessions: drop"))
REASONS_PANEL = next(n for n, p in enumerate(SQL_PANELS) if "by reason" in p.title)


class Unclosed:
    """The test's backend, handed to the dashboard per request and kept open after it."""

    def __init__(self, backend: ClickHouseBackend) -> None:
        self.backend = backend
        self.name = backend.name

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self.backend.query(sql)

    def close(self) -> None:
        pass


Call = Callable[[str], Awaitable[tuple[int, Any, dict[str, str]]]]


def with_dashboard(backend: ClickHouseBackend, tmp_path: Path,
                   check: Callable[[Call], Awaitable[None]]) -> None:  # fmt: skip
    async def main() -> None:
        app = dashboard_app(
            lambda: Unclosed(backend),  # type: ignore[arg-type, return-value]
            PipelineWatch({}), min_users=K, backend_name=backend.name,
            state_file=tmp_path / "up.json",
        )  # fmt: skip
        async with TestClient(TestServer(app)) as client:

            async def get(path: str) -> tuple[int, Any, dict[str, str]]:
                response = await client.get(path)
                body = await response.read()
                is_json = response.content_type == "application/json"
                return (
                    response.status,
                    orjson.loads(body) if is_json else body,
                    dict(response.headers),
                )

            await check(get)

    asyncio.run(main())


def fill(backend: ClickHouseBackend) -> None:
    apply_migrations(backend, K)
    records = workload([f"u{n}" for n in range(3 * K)], NOW)
    records += workload([f"v{n}" for n in range(2 * K)], NOW, software_version="5.0.0",
                        os_family="Linux")  # fmt: skip
    records += workload([f"w{n}" for n in range(K // 2)], NOW, country_code="FR")
    write(ClickHouseWriter(backend), records)


def test_every_panel_answers_and_filters_narrow_it(backend: ClickHouseBackend, tmp_path: Path):
    fill(backend)
    hours_ago = (datetime.now(UTC).timestamp() - NOW) / 3600
    assert hours_ago < 6

    async def check(get: Call) -> None:
        status, about, headers = await get("/api/panels")
        assert status == 200 and len(about["panels"]) == len(SQL_PANELS)
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        for n, panel in enumerate(SQL_PANELS):
            status, data, _ = await get(f"/api/panel/{n}?range=6h")
            assert status == 200, (panel.title, data)
            assert data["rows"], f"{panel.title}: no rows after a workload"
            assert all(len(row) == len(panel.columns) for row in data["rows"])
            assert data["filtered"] is False

        _, versions, _ = await get(f"/api/panel/{VERSIONS_PANEL}?range=6h")
        assert dict(versions["rows"]) == {"4.2.1": 3 * K + K // 2, "5.0.0": 2 * K}
        # one filter: the one-dimension view
        _, on_linux, _ = await get(f"/api/panel/{VERSIONS_PANEL}?range=6h&os_family=Linux")
        assert on_linux["filtered"] and dict(on_linux["rows"]) == {"5.0.0": 2 * K}
        # two filters: the view by every filter dimension
        _, both, _ = await get(
            f"/api/panel/{DROP_PANEL}?range=6h&os_family=Windows&software_version=4.2.1"
        )
        assert both["filtered"] and len(both["rows"]) == 1
        # FR has fewer than K users: filtering on it finds nothing, it reads "other"
        _, france, _ = await get(f"/api/panel/{VERSIONS_PANEL}?range=6h&country_code=FR")
        assert france["filtered"] and france["rows"] == []
        # a breakdown no view crosses with the filters: shown unfiltered, and said so
        _, reasons, _ = await get(f"/api/panel/{REASONS_PANEL}?range=6h&os_family=Linux")
        assert reasons["filtered"] is False and reasons["rows"]
        # a value is only ever a value
        hostile = "x' OR 1=1 OR os_family='"
        status, none, _ = await get(f"/api/panel/{VERSIONS_PANEL}?range=6h&os_family={hostile}")
        assert status == 200 and none["rows"] == []

        _, values, _ = await get("/api/filters?range=24h")
        assert values["software_version"] == ["4.2.1", "5.0.0"]
        assert values["os_family"] == ["Linux", "Windows"]
        assert values["country_code"] == ["DE"], "a hidden group offered as a filter"
        assert values["app_id"] == ["conferendo.desktop"]

        assert (await get("/api/panel/0?range=1y"))[0] == 400
        assert (await get(f"/api/panel/{len(SQL_PANELS)}"))[0] == 404
        assert (await get("/api/panel/0?os_family=" + "x" * 201))[0] == 400

    with_dashboard(backend, tmp_path, check)


def test_the_page_asks_only_its_own_origin(backend: ClickHouseBackend, tmp_path: Path):
    async def check(get: Call) -> None:
        status, page, headers = await get("/")
        assert status == 200 and b"Tally" in page
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        sources = re.findall(rb'(?:src|href)="([^"]+)"', page)
        assert sources and all(s.startswith(b"/") for s in sources), sources
        for source in sources:
            status, body, _ = await get(source.decode())
            assert status == 200 and body, source
            code = re.sub(rb"/\*.*?\*/", b"", body, flags=re.DOTALL)  # licence headers
            assert not re.search(rb"https?://", code), source
        assert (await get("/static/../server.py"))[0] == 404
        assert (await get("/static/vendor/uplot/LICENSE"))[0] == 404  # only page assets

    with_dashboard(backend, tmp_path, check)
