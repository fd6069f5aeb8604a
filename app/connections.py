"""Connection-level limits of a serving process: slow heads, stalled bodies, too many connections.

aiohttp 3.x bounds only an idle connection (``keepalive_timeout``, counted
from the connection or the last response, whatever arrives meanwhile). It has
no timeout for a request head that trickles in, none for a body that stops
half-way, and no cap on connections, so a few hundred slow clients hold a
descriptor each until the process has none left. ``GuardedRequestHandler``
is aiohttp's protocol with those three added:

- HEADER_TIMEOUT: a request head must be complete this long after its first
  byte (or after the connection opened); otherwise 408 and the connection is
  closed.
- BODY_TIMEOUT: while the service waits for a request body, some of it must
  arrive this often. When it does not, reading the body raises
  ``BodyTimeout`` (408): an upload unwinds like any other failed upload and
  leaves no file. The clock stops while the service itself is not reading
  (its buffers are full), since the client cannot send then.
- MAX_CONNECTIONS, and never more than the descriptor limit allows: at the
  cap a new connection closes the oldest idle one (a keep-alive connection
  between requests, or one whose head is still trickling in), and only when
  every connection is in the middle of a request is it answered 503.

aiohttp's own answers to requests it cannot parse (bad framing, an oversized
header line) take the service's JSON error shape here too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import errors
from .http.body import BodyTimeout
from .http.json import status_error_response

log = logging.getLogger("app.connections")

# While sendfile runs, a download holds up to three descriptors: the socket,
# the file and, while it waits for the socket, a duplicate of it (app/http/sendfile.py).
FDS_PER_CONNECTION = 3
# Descriptors for everything else: the store (SQLite files, the MongoDB
# connection pool), logs, the listening socket.
RESERVED_FDS = 128
# How often a refusal at the cap is logged, at most.
_LOG_EVERY = 60.0


def connection_limit(configured: int) -> int:
    """MAX_CONNECTIONS, lowered to what this process's descriptor limit can hold."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - RESERVED_FDS) // FDS_PER_CONNECTION))


def raw_error(error: errors.ErrorCode, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole JSON error response, for a connection that has no request object to answer."""
    status = error.status
    body = orjson.dumps({"error": {"code": error.code, "message": message}})
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class ConnectionGuard:
    """The open connections of one serving process and the limits they share."""

    def __init__(self, limit: int, header_timeout: float, body_timeout: float) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        # In the order they connected, so the first idle one is the oldest.
        self._open: dict[GuardedRequestHandler, None] = {}
        self._refused = 0
        self._logged_at = 0.0
        self.busy_answer = raw_error(errors.TOO_MANY_CONNECTIONS,
                                     f"{limit} connections are busy here; retry shortly", {"Retry-After": "1"})
        self.head_timeout_answer = raw_error(
            errors.REQUEST_TIMEOUT, f"the request head did not arrive within {header_timeout:g} s")

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedRequestHandler) -> bool:
        if len(self._open) >= self.limit:
            victim = next((c for c in self._open if c.idle), None)
            if victim is None:
                self._note_refusal()
                return False
            self.leave(victim)
            victim.force_close()
        self._open[conn] = None
        return True

    def leave(self, conn: GuardedRequestHandler) -> None:
        self._open.pop(conn, None)

    def _note_refusal(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            log.warning("all %d connections are busy with requests; refused %d connection(s) with 503",
                        self.limit, self._refused)
            self._logged_at, self._refused = now, 0


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the guard's timeouts and cap.

    Reads a few of RequestHandler's internals (``_messages``, ``_waiter``)
    and BaseProtocol's flow-control flags (``_reading_paused``,
    ``_buffer_paused``); tests/test_slow_clients.py covers each behaviour
    against a real process, so an aiohttp upgrade that moves them shows.
    """

    def __init__(self, manager, *, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._admitted = False
        # Connected, and not a byte received yet.
        self._fresh = True
        self._head_timer: asyncio.TimerHandle | None = None
        # The body being received (the latest request's payload) and when a byte of it last came.
        self._body = None
        self._body_seen = 0.0
        self._body_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """Between requests or still receiving a head: nothing would be lost by closing.

        The same test aiohttp's keep-alive expiry makes before it closes a connection.
        """
        waiter = self._waiter
        return self._fresh or (waiter is not None and not waiter.done())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(self):
            transport.write(self._guard.busy_answer)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._guard.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._guard.leave(self)
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        self._fresh = False
        in_body = self._body is not None and not self._body.is_eof()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            # A head is complete; its body, if it has one, is what arrives next.
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._receive_body(self._messages[-1][1])
        elif in_body:
            self._body_seen = self._loop.time()
        elif data and self._head_timer is None:
            # The first bytes of the next request's head.
            self._head_timer = self._loop.call_later(self._guard.header_timeout, self._head_timed_out)

    def _receive_body(self, payload) -> None:
        self._body = None if payload.is_eof() else payload
        if self._body is not None:
            self._body_seen = self._loop.time()
            if self._body_timer is None:
                self._body_timer = self._loop.call_later(self._guard.body_timeout, self._check_body)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        if not self.idle:
            # A request is being handled; the head arriving behind it (pipelined)
            # is timed again once the connection waits for it.
            self._head_timer = self._loop.call_later(self._guard.header_timeout, self._head_timed_out)
            return
        if not self._fresh:
            self.transport.write(self._guard.head_timeout_answer)
        # aiohttp's own way to close an idle connection (its keep-alive expiry).
        self.force_close()

    def _check_body(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or body.exception() is not None or self.transport is None:
            return
        now = self._loop.time()
        if self._reading_paused or self._buffer_paused:
            # The service is not reading (its buffer is full): the client cannot be behind.
            self._body_seen = now
        due = self._body_seen + self._guard.body_timeout
        if now < due:
            self._body_timer = self._loop.call_at(due, self._check_body)
            return
        body.set_exception(BodyTimeout(
            f"no part of the request body arrived for {self._guard.body_timeout:g} s (BODY_TIMEOUT)"))

    def finish_response(self, request, resp: web.StreamResponse, start_time):
        # An answer the service itself marked "Connection: close" to a body it did not read
        # (an upload refused or stalled) closes at once: aiohttp would read and discard up to
        # 10 s more of that body first, which for a hundred refused uploads is a hundred bodies.
        # Any other answer gets aiohttp's own coroutine, without a layer of ours around it.
        if not request.content.is_eof() and resp.headers.get("Connection", "").lower() == "close":
            return self._finish_and_close(request, resp, start_time)
        return super().finish_response(request, resp, start_time)

    async def _finish_and_close(self, request, resp: web.StreamResponse, start_time):
        result = await super().finish_response(request, resp, start_time)
        self.force_close()
        return result

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp logs, and refuses when a response has already started; the answer is ours.
        super().handle_error(request, status, exc, message)
        if status >= 500 or not message:
            text = HTTPStatus(status).phrase.lower()
        else:
            text = " ".join(message.split())
        response = status_error_response(status, text)
        response.force_close()
        return response


class GuardedSite(web.BaseSite):
    """web.TCPSite, serving each connection with a GuardedRequestHandler."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, reuse_port: bool,
                 guard: ConnectionGuard, handler_args: dict) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._guard = guard
        self._handler_args = handler_args

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, guard=self._guard, loop=loop, **self._handler_args)

        self._server = await loop.create_server(protocol, self._host, self._port, backlog=self._backlog,
                                                reuse_port=self._reuse_port or None)
