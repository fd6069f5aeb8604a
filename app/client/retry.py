"""When and how long to wait before trying a request again."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Mapping

import aiohttp

# Statuses worth another try: overload and server-side trouble.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})

# Failures of the connection itself (refused, reset, cut mid-body, timed out).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    asyncio.TimeoutError,
    ConnectionError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; ``Retry-After`` wins when the server sends one."""

    attempts: int = 5  # tries in all, the first one included
    backoff: float = 0.5  # the first delay, doubled on each retry
    max_backoff: float = 20.0
    max_retry_after: float = 120.0  # never wait longer than this, whatever Retry-After says

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        base = min(self.max_backoff, self.backoff * (2 ** retry))
        return base * (0.5 + random.random() / 2)


NO_RETRIES = RetryPolicy(attempts=1)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` as seconds: either delay-seconds or an HTTP date."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
