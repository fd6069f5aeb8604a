"""GET /metrics: Prometheus text exposition (requests are measured in app/middleware.py, tallied in app/metrics.py)."""

from __future__ import annotations

from aiohttp import web

from .. import metrics, registry
from ..appkeys import DRAIN, STORAGE
from ..storage.base import StorageError


async def metrics_endpoint(request: web.Request) -> web.Response:
    # Registry-wide gauges come from the database at scrape time, so every
    # worker reports the same truth.
    try:
        stats = await registry.statistics(request.app[STORAGE])
        metrics.ACTIVE_MODELS.set(stats.by_status.get("active", 0))
        metrics.STORAGE_USAGE.set(stats.stored_bytes)
    except StorageError:
        metrics.STORAGE_ERRORS.labels("metrics").inc()
    metrics.TALLY.flush(request.app[DRAIN].in_flight)
    body, content_type = metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response

