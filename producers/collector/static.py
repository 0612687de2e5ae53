"""The files the collector serves to browsers: the SDK at ``/sdk/tally.js`` and the demo call
at ``/demo`` (its script at ``/demo/demo.js``: the page has no inline script, so a strict
Content-Security-Policy holds).

The files are read once, when the routes are added, and served from memory with a strong
ETag: a conditional request for an unchanged file gets 304.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"

_SDK_CACHE: Final = "public, max-age=3600"
"""The SDK's URL carries no version, so browsers check again within the hour for a new one."""
_DEMO_CACHE: Final = "no-cache"
_DEMO_POLICY: Final = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; media-src 'self' blob:; "
    "style-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class StaticFile:
    """A file as served: its bytes, content type, cache policy and extra headers."""

    body: bytes
    content_type: str
    cache_control: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'


def _load(name: str, content_type: str, cache_control: str, **headers: str) -> StaticFile:
    body = (STATIC_DIR / name).read_bytes()
    return StaticFile(body, content_type, cache_control, tuple(headers.items()))


def _handler(file: StaticFile) -> Callable[[web.Request], Awaitable[web.Response]]:
    etag = file.etag
    headers = {
        "Cache-Control": file.cache_control,
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        **dict(file.headers),
    }

    async def serve(request: web.Request) -> web.Response:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=file.body, content_type=file.content_type, charset="utf-8", headers=headers
        )

    return serve


def add_static_routes(app: web.Application) -> None:
    """GET (and HEAD) routes for the browser SDK and its demo page, read from disk now.

    Raises OSError when a file is missing: the collector then fails at start, not on the
    first browser that asks.
    """
    demo_headers = {"Content-Security-Policy": _DEMO_POLICY, "Referrer-Policy": "no-referrer"}
    files = {
        "/sdk/tally.js": _load(
            "tally.js",
            "text/javascript",
            _SDK_CACHE,
            **{"Cross-Origin-Resource-Policy": "cross-origin"},
        ),
        "/demo": _load("demo.html", "text/html", _DEMO_CACHE, **demo_headers),
        "/demo/demo.js": _load("demo.js", "text/javascript", _DEMO_CACHE),
    }
    for path, file in files.items():
        app.router.add_get(path, _handler(file))
