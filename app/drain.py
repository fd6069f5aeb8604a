"""Draining at shutdown: after SIGTERM new requests get 503 (and /health says so)
while the ones in flight finish."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from . import errors
from .errors import ApiError


class Drain:
    """Counts requests in flight; once draining, turns new ones away."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0

    def middleware(self):
        @web.middleware
        async def drain_middleware(request: web.Request, handler):
            # Health endpoints answer for themselves (503, "draining").
            if self.draining and not request.path.startswith("/health"):
                raise ApiError(errors.SHUTTING_DOWN, "the service is shutting down; retry on another instance",
                               {"Retry-After": "1", "Connection": "close"})
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        return drain_middleware
