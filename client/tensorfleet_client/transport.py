"""The way to the service: one session, its origin rule, retries, and sending.

Requests are retried on transient failures: connection errors, 429 and 5xx,
with exponential backoff, honouring ``Retry-After``. A POST (registration) is
retried only when it certainly did not reach the service (the connection was
never made) or the service refused it with 429, so a retry can never register
a model twice.

Requests go only to the origin of ``base_url`` (scheme, host and port), and
so does the API key: a redirect within it is followed, one elsewhere is
refused with ``ProtocolError`` before anything is sent there.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Mapping

import aiohttp
import orjson
from yarl import URL

from .errors import ConnectionFailed, ModelServiceError, ProtocolError, error_for

DEFAULT_URL = "http://localhost:8084"
API = "/api/v1/models"
USER_AGENT = "tensorfleet-model-client/0.1"
MAX_JSON = 64 * 1024 * 1024  # a JSON answer larger than this is not held in memory, whatever the server sends
# aiohttp pauses the socket once a response holds twice this much unread; at its 64 KiB default a
# fast download paused and resumed reading (two epoll changes) for nearly every 256 KiB received.
READ_BUFSIZE = 1024 * 1024

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


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port  # the port is the scheme's default when not given


class Transport:
    """One service's session: every request the client makes goes through ``send``.

    ``request_count`` counts the HTTP requests sent, retries included.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 retry: RetryPolicy | None = None, connect_timeout: float = 30.0,
                 read_timeout: float = 300.0, user_agent: str = USER_AGENT) -> None:
        base_url = base_url or os.environ.get("MODEL_SERVICE_URL") or DEFAULT_URL
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(URL(self.base_url))
        self.api_key = api_key if api_key is not None else (os.environ.get("MODEL_SERVICE_API_KEY") or None)
        self.retry = retry or RetryPolicy()
        self.request_count = 0
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    @property
    def read_timeout(self) -> float:
        """Seconds a response may go without a byte before the request fails."""
        return self._timeout.sock_read

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Not a session header: aiohttp would carry it along a redirect to any host.
            self._session = aiohttp.ClientSession(headers={"User-Agent": self._user_agent}, timeout=self._timeout,
                                                  auto_decompress=False, middlewares=(self._own_origin_only,),
                                                  read_bufsize=READ_BUFSIZE)
        return self._session

    async def _own_origin_only(self, req: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
        """Every request, redirects included, passes here: to the configured origin, with the key; else refused."""
        self._check_origin(req.url)
        if self.api_key:
            req.headers["X-API-Key"] = self.api_key
        return await handler(req)

    def _check_origin(self, url: URL) -> None:
        if _origin(url) != self._origin:
            raise ProtocolError(f"refused to send a request to {url}: this client talks only to {self.base_url} "
                                "(a redirect there, or a URL from the server, leads elsewhere); if the service "
                                "has moved, configure the client with its new URL")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        """The URL for ``path`` on the service; an absolute URL must be on its origin (else ProtocolError)."""
        if "://" in path:
            self._check_origin(URL(path))
            return path
        return self.base_url + path

    async def send(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                   headers: Mapping[str, str] | None = None, body: Any = None,
                   idempotent: bool | None = None, expect100: bool = False) -> aiohttp.ClientResponse:
        """Send a request, retrying transient failures; the caller reads and releases the response.

        ``body`` may be a callable that makes a fresh body for each attempt
        (a stream cannot be sent twice).
        """
        if idempotent is None:
            idempotent = method != "POST"
        session = self._get_session()
        url = self.url(path)
        attempts = max(1, self.retry.attempts)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            data = body() if callable(body) else body
            self.request_count += 1
            try:
                resp = await session.request(method, url, params=params, headers=headers, data=data,
                                             expect100=expect100)
            except TRANSIENT_ERRORS as e:
                never_connected = isinstance(e, aiohttp.ClientConnectorError)
                if last or not (idempotent or never_connected):
                    where = self.base_url if never_connected else f"{method} {url}"
                    raise ConnectionFailed(f"cannot reach the Model Service at {where}: "
                                           f"{type(e).__name__}: {e}") from e
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            except aiohttp.ClientResponseError as e:
                # Not HTTP aiohttp will read (e.g. a NUL in a header), or endless redirects.
                raise ProtocolError(f"{method} {url}: {e.message}") from e
            if resp.status in TRANSIENT_STATUSES and not last and (idempotent or resp.status == 429):
                wait = self.retry.delay(attempt, retry_after(resp.headers))
                resp.release()
                await asyncio.sleep(wait)
                continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def error(self, resp: aiohttp.ClientResponse) -> ModelServiceError:
        """The exception for an error response, from its status and (a bounded read of) its JSON body."""
        return (await self.error_and_body(resp))[0]

    async def error_and_body(self, resp: aiohttp.ClientResponse) -> tuple[ModelServiceError, Any]:
        """error(), and the JSON body it was made from (None if there was none), for callers that
        read more of it (an upload session's offset)."""
        try:
            raw = await resp.content.read(64 * 1024)
            body = orjson.loads(raw) if raw else None
        except (orjson.JSONDecodeError, aiohttp.ClientError, asyncio.TimeoutError):
            body = None
        return error_for(resp.status, body, dict(resp.headers),
                         f"{resp.method} {resp.url.path} failed: {resp.status} {resp.reason}"), body

    async def json(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                   json: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        """Send ``json`` (if any) and return the JSON answer; an answer outside ``ok`` is raised as its error."""
        headers = None
        body = None
        if json is not None:
            body = orjson.dumps(json)
            headers = {"Content-Type": "application/json"}
        resp = await self.send(method, path, params=params, headers=headers, body=body)
        async with resp:
            if resp.status not in ok:
                raise await self.error(resp)
            raw = await read_json_body(resp)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ProtocolError(f"{method} {path}: the response is not JSON: {e}", status=resp.status) from None


async def read_json_body(resp: aiohttp.ClientResponse) -> bytes:
    """The body, or ProtocolError once it proves larger than MAX_JSON (declared or sent)."""
    too_big = ProtocolError(f"{resp.method} {resp.url}: the answer is larger than {MAX_JSON} bytes",
                            status=resp.status)
    if resp.content_length is not None and resp.content_length > MAX_JSON:
        raise too_big
    body = bytearray()
    async for block in resp.content.iter_any():
        body += block
        if len(body) > MAX_JSON:
            raise too_big
    return bytes(body)
