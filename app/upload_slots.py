"""MAX_CONCURRENT_UPLOADS and MAX_UPLOADS_PER_CLIENT: how many request bodies are stored at once.

Each upload in progress holds memory (a MiB of buffered body on its way to
the store) and a temporary file or GridFS chunks that grow to MAX_FILE_SIZE,
so these caps bound both; BODY_TIMEOUT bounds how long a stalled one keeps
them. An upload beyond the caps waits up to UPLOAD_QUEUE_SECONDS for a slot,
its body unread, then is refused: 429 when this client still has its share in
progress, 503 when the process has no slot left, both with Retry-After and
Connection: close (the body was not read). 0 turns a cap off.

Per process, as the rate limits are (app/limits.py): each replica and worker
has its own slots.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from typing import AsyncIterator

from aiohttp import web

from . import errors
from .errors import ApiError
from .limits import client_key

# Uploads take seconds to minutes; a retry sooner than this mostly finds the same.
RETRY_AFTER_SECONDS = 5
# The body is not read, so the connection cannot carry another request.
_REFUSAL_HEADERS = {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"}


class UploadSlots:
    def __init__(self, total: int, per_client: int, queue_seconds: float) -> None:
        self.total = total
        self.per_client = per_client
        self.queue_seconds = queue_seconds
        self._by_client: Counter[str] = Counter()
        self._active = 0
        # Uploads waiting for a slot, woken whenever one is released.
        self._waiters: list[asyncio.Future] = []

    @property
    def active(self) -> int:
        return self._active

    def _refusal(self, key: str) -> ApiError | None:
        """Why this client cannot start an upload now, or None if it can."""
        if self.per_client and self._by_client[key] >= self.per_client:
            return ApiError(errors.TOO_MANY_CLIENT_UPLOADS,
                            f"this client already has {self.per_client} uploads in progress "
                            "(MAX_UPLOADS_PER_CLIENT); retry when one has finished", _REFUSAL_HEADERS)
        if self.total and self._active >= self.total:
            return ApiError(errors.TOO_MANY_UPLOADS,
                            f"{self.total} uploads are already in progress here (MAX_CONCURRENT_UPLOADS); "
                            "retry shortly", _REFUSAL_HEADERS)
        return None

    @asynccontextmanager
    async def slot(self, request: web.Request) -> AsyncIterator[None]:
        """Held while the request's body is received and stored.

        Needs the authenticated caller (the key name), so only after the auth middleware.
        """
        key = client_key(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_seconds
        protocol = None
        while (refusal := self._refusal(key)) is not None:
            if loop.time() >= deadline:
                raise refusal
            if protocol is None and not request.content.is_eof() and request.protocol.transport is not None:
                # While it waits, the rest of its body stays in the client's socket, not in our
                # memory. (aiohttp's parser can pause only while it is feeding a body.)
                protocol = request.protocol
                protocol.pause_reading()
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if protocol is not None and protocol.transport is not None:
            protocol.resume_reading()
        self._active += 1
        self._by_client[key] += 1
        try:
            yield
        finally:
            self._active -= 1
            self._by_client[key] -= 1
            if not self._by_client[key]:
                del self._by_client[key]
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
