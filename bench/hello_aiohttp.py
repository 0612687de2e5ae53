"""The baseline for bench/collector.py: an aiohttp server that reads a POST body and answers a
small JSON document, run with the collector's server settings (one process, no access log),
so the ratio between the two is what the collector's own work costs.

Run: python bench/hello_aiohttp.py HOST PORT
"""

import sys

from aiohttp import web

ANSWER = b'{"accepted":[],"refused":[]}'


async def post_events(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"up"}', content_type="application/json")


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = web.Application()
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/readyz", healthz)
    web.run_app(app, host=host, port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
