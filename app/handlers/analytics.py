"""Registry analytics: totals, distributions, storage use, popular and recent models."""

from __future__ import annotations

from aiohttp import web

from .. import clock, registry, render, validation
from ..appkeys import COUNTS, SETTINGS, STORAGE
from ..http.json import json_response
from ..schemas import ModelTop, RecentActivity, Statistics, StatusDistribution, StorageUsage
from ..storage.base import ModelQuery


async def statistics(request: web.Request) -> web.Response:
    await request.app[COUNTS].settle()
    s = await registry.statistics(request.app[STORAGE])
    total = sum(s.by_status.values())
    return json_response(Statistics(
        total_models=total,
        algorithms=dict(sorted(s.by_algorithm.items(), key=lambda kv: (-kv[1], kv[0]))),
        status_distribution=StatusDistribution(**{status: s.by_status.get(status, 0)
                                                  for status in validation.STATUSES}),
        total_downloads=s.total_downloads,
        storage_usage=StorageUsage(
            total_size_bytes=s.stored_bytes,
            total_size_gb=round(s.stored_bytes / 1e9, 3),
            average_model_size_mb=round(s.model_bytes / s.models_with_files / 1e6, 2) if s.models_with_files else 0,
        ),
        recent_activity=RecentActivity(
            models_added_last_7_days=s.added_since,
            downloads_last_24_hours=s.downloads_since,
        ),
        timestamp=clock.iso(clock.now()),
    ))


async def _top(request: web.Request, sort_field: str) -> web.Response:
    limit = validation.limit_param(request.query, request.app[SETTINGS].max_page_size)
    await request.app[COUNTS].settle()
    docs, _ = await request.app[STORAGE].find_models(ModelQuery(sort_field=sort_field, sort_desc=True, limit=limit))
    return json_response(ModelTop(models=[render.summary(d) for d in docs]))


async def popular(request: web.Request) -> web.Response:
    return await _top(request, "download_count")


async def recent(request: web.Request) -> web.Response:
    return await _top(request, "created_at")

