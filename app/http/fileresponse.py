"""Answering GET and HEAD of a stored file as nginx answers for a static one (RFC 9110).

Given the representation's headers, size and date, a reader of byte ranges and
optionally a local path for sendfile, ``send`` answers 304 or 412
(preconditions), 416, 200, 206 with one range or multipart/byteranges. It
knows nothing of the application: the caller's ``sending`` hook wraps the
body (where it takes slots and leases and counts), and the exceptions it names
in ``aborts`` are the reader's failures mid-body.

The body is streamed through the reader's pieces, so memory per response stays
a few pieces whatever the file size. If the reader fails mid-body the
connection is aborted: the client sees fewer bytes than Content-Length
promised, never a short response that looks complete.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from .. import errors
from . import preconditions, ranges, sendfile
from .json import error_response

log = logging.getLogger("app.http.fileresponse")


@dataclass
class Transfer:
    """What the ``sending`` hook learns about the body it wraps."""

    whole: bool  # the answer carries byte 0: a download, not the resumption of one
    sent: int = 0  # representation bytes sent, known once the body has ended


@dataclass(frozen=True)
class LocalRange:
    """``count`` bytes of the local file ``path`` from ``offset``: sent with sendfile."""

    path: str
    offset: int
    count: int


@dataclass(frozen=True)
class Representation:
    """A representation to answer with: everything ``send`` needs to know about it."""

    headers: Mapping[str, str]  # Content-Type, ETag, Last-Modified and any others of a 200
    size: int
    last_modified: datetime
    # Whether Last-Modified names only this content (RFC 9110 section 8.8.2.2): If-Range may use it.
    date_is_strong: bool
    # The headers a 304 repeats (section 15.4.5).
    not_modified_headers: tuple[str, ...]
    read: Callable[[int, int], AsyncIterator[bytes]]  # read(offset, count): the pieces of that range
    path: str | None = None  # a local file holding exactly these bytes, for sendfile
    # Or, for a representation pieced together from bytes and ranges of local
    # files (a snapshot's tar): spans(offset, count), the pieces of that range, for sendfile.
    spans: Callable[[int, int], Iterable[bytes | LocalRange]] | None = None
    name: str = ""  # what the log calls it


async def send(request: web.Request, file: Representation, *, timeout: float,
               sending: Callable[[Transfer], AbstractAsyncContextManager[object]],
               aborts: tuple[type[BaseException], ...] = (),
               started_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The answer to a GET or HEAD of ``file``.

    ``sending(transfer)`` is entered before the response starts and left after
    its body ends (not for HEAD or answers without a file body); ``aborts`` are
    the reader's exceptions that abort the connection mid-body: they are
    raised into the hook, which may swallow them. ``timeout``: seconds a client
    may make no progress before the connection is reset. ``started_headers``
    go with the answers this function starts itself (200, 206, HEAD's), which
    are sent before it returns; the others are returned unsent.
    """
    headers = dict(file.headers)
    etag = headers["ETag"]

    decided = preconditions.evaluate(request.headers, etag, file.last_modified)
    if decided == preconditions.NOT_MODIFIED:
        return web.Response(status=304, headers={k: headers[k] for k in file.not_modified_headers})
    if decided == preconditions.PRECONDITION_FAILED:
        return error_response(errors.PRECONDITION_FAILED, "the file does not match the request's preconditions",
                              {"ETag": etag})

    size = file.size
    wanted = None
    # Range is defined for GET only; HEAD answers as a GET without Range would.
    if request.method == "GET" and preconditions.if_range_allows(request.headers, etag, file.last_modified,
                                                                 file.date_is_strong):
        try:
            wanted = ranges.parse(request.headers.get("Range"), size)
        except ranges.Unsatisfiable as e:
            return error_response(errors.RANGE_NOT_SATISFIABLE, f"{e} (file size {size})",
                                  {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})

    # The body as (preamble, offset, count) pieces of file, then a trailer.
    trailer = b""
    if wanted is None:
        status, parts = 200, [(b"", 0, size)]
    elif len(wanted) == 1:
        r = wanted[0]
        status, parts = 206, [(b"", r.start, r.length)]
        headers["Content-Range"] = r.content_range(size)
    else:
        boundary = secrets.token_hex(16)
        part_type = headers.get("Content-Type", "application/octet-stream")
        headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        status = 206
        parts = [(_part_header(boundary, part_type, r, size), r.start, r.length) for r in wanted]
        trailer = f"\r\n--{boundary}--\r\n".encode()
    length = sum(len(pre) + count for pre, _, count in parts) + len(trailer)

    if started_headers:
        headers.update(started_headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    if request.method == "HEAD":
        await response.prepare(request)
        return response

    transfer = Transfer(whole=wanted is None or any(r.start == 0 for r in wanted))
    async with sending(transfer):
        await _body(request, file, response, parts, trailer, length, transfer, timeout, aborts)
    return response


async def _body(request: web.Request, file: Representation, response: web.StreamResponse, parts, trailer: bytes,
                length: int, transfer: Transfer, timeout: float, aborts: tuple[type[BaseException], ...]) -> None:
    spans = _local_spans(file) if sendfile.usable(request) else None
    # Corked from before the headers, as nginx's tcp_nopush: they leave in the body's first segment.
    corked = sendfile.cork(request, length) if spans is not None else None
    try:
        writer = await response.prepare(request)
        sent = 0
        try:
            for preamble, offset, count in parts:
                if preamble:
                    await response.write(preamble)
                if not count:
                    continue
                if spans is not None:
                    for span in spans(offset, count):
                        if isinstance(span, LocalRange):
                            sent += await sendfile.send_range(request, writer, span.path, span.offset, span.count,
                                                              timeout)
                            continue
                        async with asyncio.timeout(timeout):
                            await response.write(span)
                        sent += len(span)
                    continue
                pieces = file.read(offset, count)
                # aclosing: whichever way the loop ends, the reader (and its
                # database cursor) is closed now, not when collected.
                async with aclosing(pieces):
                    async for piece in pieces:
                        # A client that stops reading holds a cursor: give up
                        # on it after ``timeout`` without progress.
                        async with asyncio.timeout(timeout):
                            await response.write(piece)
                        sent += len(piece)
            if trailer:
                await response.write(trailer)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError) as e:
            # The client went away; the reader is already closed.
            log.debug("client left the body of %s: %s", file.name, e)
        except TimeoutError:
            log.info("body of %s dropped: client made no progress for %g s", file.name, timeout)
            _reset(request)
        except aborts:
            # Abort, not close: the client must see a truncated body, not a complete one.
            if request.transport is not None:
                request.transport.abort()
            raise
        finally:
            transfer.sent = sent
    finally:
        if corked is not None:
            # Pushes out the last partial segment now, not after 200 ms.
            sendfile.uncork(corked)


def _local_spans(file: Representation) -> Callable[[int, int], Iterable[bytes | LocalRange]] | None:
    if file.path is not None:
        path = file.path
        return lambda offset, count: (LocalRange(path, offset, count),)
    return file.spans


def _reset(request: web.Request) -> None:
    """Drop the connection with an RST, as nginx's ``reset_timedout_connection``.

    A plain close leaves the kernel delivering the megabytes already queued for
    the socket to a client that stopped reading, at its pace, for minutes.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone
    transport.abort()


def _part_header(boundary: str, content_type: str, r: ranges.ByteRange, size: int) -> bytes:
    return (f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {r.content_range(size)}\r\n\r\n").encode()
