"""Liveness: does the service answer, and can it reach its store?"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .. import clock
from ..http import json_response
from ..keys import SETTINGS, STORAGE
from ..storage.base import StorageUnavailable


async def health(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    body = {
        "status": "healthy",
        "service": "model-service",
        "storage": storage.kind,
        # Not applicable to the embedded backend, so null rather than false.
        "mongodb_connected": None,
        "gridfs_available": None,
        "total_models": None,
        "timestamp": clock.iso(clock.now()),
    }
    timeout = request.app[SETTINGS].mongodb_timeout_ms / 1000
    try:
        await asyncio.wait_for(storage.ping(), timeout)
        body["total_models"] = await asyncio.wait_for(storage.count_models(), timeout)
        ok = True
    except (StorageUnavailable, asyncio.TimeoutError) as e:
        body["status"] = "unhealthy"
        body["error"] = str(e) or "storage did not answer in time"
        ok = False
    if storage.kind == "mongodb":
        body["mongodb_connected"] = ok
        body["gridfs_available"] = ok
    return json_response(body, 200 if ok else 503)


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
