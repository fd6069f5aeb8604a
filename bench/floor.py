"""The framework's floor: a bare aiohttp app on uvloop returning pre-serialized bytes.

``python -m bench.floor SPEC.json`` serves, on 127.0.0.1:PORT, exactly the bytes
the service answered once (the bench copied them): each get-by-id body, the
listing body and one file's bytes, with no middleware, no logging, no lookup.
What the service spends above this per request is ours to cut; what this app
spends is aiohttp's and uvloop's. SPEC: {"port", "models": {id: path},
"list": path, "file": path}.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvloop
from aiohttp import web


def make_app(spec: dict) -> web.Application:
    models = {mid: Path(p).read_bytes() for mid, p in spec["models"].items()}
    listing = Path(spec["list"]).read_bytes()
    blob = Path(spec["file"]).read_bytes()

    async def get(request: web.Request) -> web.Response:
        body = models.get(request.match_info["id"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="application/json")

    async def listing_(request: web.Request) -> web.Response:
        return web.Response(body=listing, content_type="application/json")

    async def file_(request: web.Request) -> web.Response:
        return web.Response(body=blob, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/api/v1/models", listing_)
    app.router.add_get("/api/v1/models/{id}", get)
    app.router.add_get("/file", file_)
    return app


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(make_app(spec), spec["port"]))


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
