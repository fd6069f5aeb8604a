"""Health: ``/health`` is liveness (cheap), ``/health/detailed`` is readiness."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .. import clock, registry, snapshots
from ..appkeys import DRAIN, SETTINGS, STORAGE
from ..config import format_size
from ..http.json import json_response
from ..schemas import Checks, DetailedHealth, Health, StoredBytes
from ..storage.base import ModelQuery, StorageError, StorageUnavailable

log = logging.getLogger("app.health")

# model_registry check: how many of the newest models with files to verify.
REGISTRY_SAMPLE = 20


async def health(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    body = Health(
        status="healthy",
        service="model-service",
        storage=storage.kind,
        # Not applicable to the embedded backend, so null rather than false.
        mongodb_connected=None,
        gridfs_available=None,
        total_models=None,
        timestamp=clock.iso(clock.now()),
    )
    timeout = request.app[SETTINGS].mongodb_timeout_ms / 1000
    try:
        await asyncio.wait_for(storage.ping(), timeout)
        body.total_models = await asyncio.wait_for(storage.count_models(), timeout)
        ok = True
    except (StorageUnavailable, asyncio.TimeoutError) as e:
        # The reason (on MongoDB: hosts, topology) goes to the log and to the
        # keyed /health/detailed, never to this open endpoint.
        log.warning("health check: storage unhealthy: %s", str(e) or "did not answer in time")
        body.status = "unhealthy"
        ok = False
    if storage.kind == "mongodb":
        body.mongodb_connected = ok
        body.gridfs_available = ok
    if request.app[DRAIN].draining:
        body.status, body.draining, ok = "unhealthy", True, False
    return json_response(body, 200 if ok else 503)


async def _check(coro, timeout: float) -> str:
    try:
        result = await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        return f"did not answer within {timeout:g} s"
    except StorageError as e:
        return str(e) or e.__class__.__name__
    return result or "healthy"


async def _disk(storage, minimum: int) -> str | None:
    free = await storage.disk_free()
    if free is not None and free < minimum:
        return f"only {format_size(free)} free, below HEALTH_MIN_FREE_DISK ({format_size(minimum)})"
    return None


async def _registry(storage) -> str | None:
    """Do the newest models with files point at content that is there? (A snapshot's first file stands
    for the rest: a health check must stay cheap whatever the snapshots' sizes.)"""
    docs, _ = await storage.find_models(ModelQuery(limit=REGISTRY_SAMPLE * 5))
    sample = [(d, found[0]) for d in docs if (found := snapshots.entries(d))][:REGISTRY_SAMPLE]
    infos = await asyncio.gather(*(storage.file_info(e["file_id"]) for _, e in sample))
    broken = [d["id"] for (d, e), info in zip(sample, infos) if info is None or info.size != e["size_bytes"]]
    if broken:
        return f"{len(broken)} of {len(sample)} sampled models point at missing files: {', '.join(broken[:5])}"
    return None


async def detailed(request: web.Request) -> web.Response:
    storage, settings = request.app[STORAGE], request.app[SETTINGS]
    timeout = settings.mongodb_timeout_ms / 1000
    names = ("storage", "files", "disk_space", "model_registry")
    results = await asyncio.gather(
        _check(storage.ping(), timeout),
        _check(storage.probe_files(), timeout),
        _check(_disk(storage, settings.min_free_disk), timeout),
        _check(_registry(storage), timeout),
    )
    checks = dict(zip(names, results))
    if request.app[DRAIN].draining:
        checks["shutdown"] = "draining: the service is shutting down"
    body = DetailedHealth(
        status="healthy" if all(r == "healthy" for r in checks.values()) else "unhealthy",
        service="model-service",
        storage=storage.kind,
        checks=Checks(**checks),
        total_models=None,
        active_models=None,
        storage_usage=None,
        timestamp=clock.iso(clock.now()),
        disk_free_bytes=None,
    )
    if checks["storage"] == "healthy":
        try:
            stats = await asyncio.wait_for(registry.statistics(storage), timeout)
            body.total_models = sum(stats.by_status.values())
            body.active_models = stats.by_status.get("active", 0)
            body.storage_usage = StoredBytes(total_size_bytes=stats.stored_bytes)
        except (StorageError, asyncio.TimeoutError):
            pass
    try:
        body.disk_free_bytes = await asyncio.wait_for(storage.disk_free(), timeout)
    except (StorageError, asyncio.TimeoutError):
        pass
    return json_response(body, 200 if body.status == "healthy" else 503)

