"""MAX_CONCURRENT_UPLOADS and MAX_UPLOADS_PER_CLIENT: how many request bodies are stored at once.

Each upload in progress holds memory (a MiB of buffered body on its way to
the store) and a temporary file or GridFS chunks that grow to MAX_FILE_SIZE,
so these caps bound both; BODY_TIMEOUT bounds how long a stalled one keeps
them. An upload beyond the caps is refused at once, before any of its body is
read (and before ``Expect: 100-continue`` is answered): 429 when this client
already has its share, 503 when the process has no slot left, both with
Retry-After. 0 turns a cap off.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from aiohttp import web

from .http import ApiError
from .limits import client_key

# Uploads take seconds to minutes; a retry sooner than this mostly finds the same.
RETRY_AFTER_SECONDS = 5
# The body is not read, so the connection cannot carry another request.
_REFUSAL_HEADERS = {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"}


class UploadSlots:
    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._by_client: Counter[str] = Counter()
        self._active = 0

    @property
    def active(self) -> int:
        return self._active

    def check_total(self) -> None:
        """ApiError (503) if the process has no upload slot free."""
        if self.total and self._active >= self.total:
            raise ApiError(503, "too_many_uploads",
                           f"{self.total} uploads are already in progress here (MAX_CONCURRENT_UPLOADS); "
                           "retry shortly", _REFUSAL_HEADERS)

    def check(self, request: web.Request) -> str:
        """The request's client key, or ApiError if no upload slot is free for it.

        Needs the authenticated caller (the key name), so only after the auth middleware.
        """
        key = client_key(request)
        if self.per_client and self._by_client[key] >= self.per_client:
            raise ApiError(429, "too_many_uploads",
                           f"this client already has {self.per_client} uploads in progress "
                           "(MAX_UPLOADS_PER_CLIENT); retry when one has finished",
                           _REFUSAL_HEADERS)
        self.check_total()
        return key

    @contextmanager
    def slot(self, request: web.Request) -> Iterator[None]:
        """Held while the request's body is received and stored."""
        key = self.check(request)
        self._active += 1
        self._by_client[key] += 1
        try:
            yield
        finally:
            self._active -= 1
            self._by_client[key] -= 1
            if not self._by_client[key]:
                del self._by_client[key]
