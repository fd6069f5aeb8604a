"""Protection against overload: rate limits and a download cap (draining at shutdown is app/drain.py).

All of it is per process, by design: each replica and each worker keeps its own
buckets and slots, so N processes allow N times the figures configured; a
cluster-wide limit belongs at the ingress (README, Scaling out).

- RATE_LIMIT / DOWNLOAD_RATE_LIMIT: token buckets per client (API key name
  when the request presents a valid one, else the client address), 429 with
  Retry-After. They run before authentication, so failed authentications
  use up the address's tokens too, and so do /metrics and /health/detailed.
- MAX_CONCURRENT_DOWNLOADS: downloads beyond the cap wait up to
  DOWNLOAD_QUEUE_SECONDS for a slot, then get 503 with Retry-After, instead of
  exhausting memory or database connections.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict

from aiohttp import web

from . import errors
from .auth import caller_name
from .config import Rate
from .errors import ApiError

# Liveness is never rate limited: load balancers and probes poll it from one
# address each, and a 429 there would read as "instance down".
UNLIMITED_PATHS = ("/health",)


class TokenBuckets:
    """One bucket per client key; capacity ``count``, refilled evenly over ``seconds``.

    The table is bounded: the least recently seen clients are forgotten first
    (a forgotten client starts with a full bucket, which errs towards serving).
    """

    def __init__(self, rate: Rate, max_clients: int = 100_000) -> None:
        self.capacity = float(rate.count)
        self.per_second = rate.count / rate.seconds
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.per_second)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.per_second
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def is_download(request: web.Request) -> bool:
    # HEAD moves no file bytes and costs what any metadata read costs (RATE_LIMIT
    # covers it); counting it would charge every pull twice, since clients
    # probe (or revalidate a cached copy) with a HEAD first. One file of a
    # version (/files/{path}) is a download: it serves /download's bytes for a
    # single-file version, and the limit must not have a second door.
    if request.method != "GET":
        return False
    resource = request.match_info.route.resource
    return request.path.endswith("/download") or (
        resource is not None and resource.canonical.endswith("/files/{path}"))


def client_key(request: web.Request) -> str:
    name = caller_name(request)
    return f"key:{name}" if name else f"addr:{request.remote}"


def rate_limit_middleware(general: Rate | None, downloads: Rate | None):
    general_buckets = TokenBuckets(general) if general else None
    download_buckets = TokenBuckets(downloads) if downloads else None

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path not in UNLIMITED_PATHS:
            key = client_key(request)
            for buckets, what in ((general_buckets, "RATE_LIMIT"),
                                  (download_buckets if is_download(request) else None, "DOWNLOAD_RATE_LIMIT")):
                if buckets is None:
                    continue
                wait = buckets.take(key)
                if wait:
                    raise ApiError(errors.RATE_LIMITED, f"too many requests ({what}); retry in {math.ceil(wait)} s",
                                   {"Retry-After": str(math.ceil(wait))})
        return await handler(request)

    return middleware


class DownloadSlots:
    """At most ``limit`` bodies streaming at once in this process; 0 means no cap."""

    def __init__(self, limit: int, queue_seconds: float) -> None:
        self.limit = limit
        self.queue_seconds = queue_seconds
        self._sem = asyncio.Semaphore(limit) if limit else None
        # Downloads queued for a slot right now.
        self.waiting = 0

    def slot(self) -> DownloadSlots:
        """``async with slots.slot():`` around a body: a slot, or after queueing up to
        ``queue_seconds`` for one, TOO_MANY_DOWNLOADS. The slots are their own context
        manager: no generator to set up per download (see leases._Reading)."""
        return self

    async def __aenter__(self) -> None:
        sem = self._sem
        if sem is None:
            return
        if not sem.locked():
            await sem.acquire()  # free: taken at once, no timer to set up
            return
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_seconds):
                await sem.acquire()
        except TimeoutError:
            raise ApiError(errors.TOO_MANY_DOWNLOADS,
                           f"{self.limit} downloads are already running here; retry shortly",
                           {"Retry-After": str(max(1, math.ceil(self.queue_seconds)))}) from None
        finally:
            self.waiting -= 1

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sem is not None:
            self._sem.release()
