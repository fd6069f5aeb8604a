"""Draining at shutdown: after SIGTERM new requests get 503 (and /health says so)
while the ones in flight finish. The request middleware (app/middleware.py)
counts them and turns new ones away."""

from __future__ import annotations

import asyncio
import time


class Drain:
    """Requests in flight, and whether new ones are turned away (``draining``)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0
