"""GET /metrics: Prometheus text exposition, plus request metrics middleware."""

from __future__ import annotations

import time

from aiohttp import web

from .. import metrics, registry
from ..appkeys import STORAGE
from ..storage.base import StorageError


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    metrics.IN_FLIGHT.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        metrics.IN_FLIGHT.dec()
        route = request.match_info.route
        resource = route.resource if route is not None else None
        metrics.request_duration(resource, request.method, status).observe(time.perf_counter() - started)


async def metrics_endpoint(request: web.Request) -> web.Response:
    # Registry-wide gauges come from the database at scrape time, so every
    # worker reports the same truth.
    try:
        stats = await registry.statistics(request.app[STORAGE])
        metrics.ACTIVE_MODELS.set(stats.by_status.get("active", 0))
        metrics.STORAGE_USAGE.set(stats.stored_bytes)
    except StorageError:
        metrics.STORAGE_ERRORS.labels("metrics").inc()
    body, content_type = metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response

