"""Zero-copy sending of a byte range of a local file (the embedded backend).

The kernel's sendfile moves page-cache pages straight to the socket, as nginx
does: no copy through Python, a fraction of the CPU per GB. uvloop's
``loop.sendfile`` falls back to a read/write copy, so this drives
``os.sendfile`` itself, non-blocking on the event loop thread, waiting for
writability on a duplicate of the socket's descriptor (uvloop keeps the
transport's own descriptor to itself, and one that is not waited on needs no
duplicate).

While a response of this kind is sent, from before its headers to its last
byte, the socket is corked (``cork``; TCP_CORK, nginx's ``tcp_nopush``), so
the kernel sends only full segments, the headers in the first: on loopback
nginx measured 2.5 GB/s with it and 1.8 GB/s without, and this loop the same.
"""

from __future__ import annotations

import asyncio
import os
import socket

from aiohttp import web

_STEP = 2 * 1024 * 1024
# Bodies up to this size are sent uncorked: one sendfile call holds them, as
# full segments and one partial that uncorking would push at once anyway, so
# corking would only add two setsockopt calls (each a socket object in uvloop's stand-in).
_CORK_ABOVE = 64 * 1024


class FileGone(Exception):
    """The file is missing, or shorter than the range being sent."""


def usable(request: web.Request) -> bool:
    transport = request.transport
    return (transport is not None and transport.get_extra_info("socket") is not None
            and hasattr(os, "sendfile"))


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        loop.remove_writer(fd)


async def send_range(request: web.Request, writer, path: str, offset: int, count: int, timeout: float) -> int:
    """Send [offset, offset+count) of ``path`` after what ``writer`` has buffered; bytes sent.

    Raises FileGone if the file is gone or shorter than that, TimeoutError
    after ``timeout`` seconds without progress, ConnectionError if the client left.
    """
    loop = asyncio.get_running_loop()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as e:
        raise FileGone(f"content at {path} is missing") from e
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        # The transport closed its socket: the client left.
        os.close(fd)
        raise ConnectionResetError("the client closed the connection")
    # A duplicate of the socket's descriptor, made only once the socket is full and the loop must
    # wait for it: most bodies leave in one sendfile on the transport's own descriptor, which
    # stays open until the transport is closing (checked before each call, with no await between).
    out: int | None = None
    sent = 0
    try:
        # Headers (and any multipart preamble) first, all the way out of the
        # transport's buffer, so the file's bytes follow them in order (a
        # writer that still holds its headers sends them now).
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:
            send_headers()
        await _flushed(request, writer, timeout)
        while sent < count:
            if out is None and transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            try:
                n = os.sendfile(sock.fileno() if out is None else out, fd, offset + sent, min(_STEP, count - sent))
            except BlockingIOError:
                if out is None:
                    out = os.dup(sock.fileno())
                await _writable(loop, out, timeout)
                continue
            if n == 0:
                raise FileGone(f"content at {path} is shorter than recorded")
            sent += n
            # Let other connections have the loop between steps.
            await asyncio.sleep(0)
    finally:
        if out is not None:
            os.close(out)
        os.close(fd)
    return sent


async def _flushed(request: web.Request, writer, timeout: float) -> asyncio.Transport:
    """The request's transport, once everything it had buffered is on the wire.

    Waits without polling: with a high-water mark of zero the transport pauses
    its protocol while a single byte is buffered and resumes it once none is,
    which is what aiohttp's ``drain()`` waits for. Raises ConnectionResetError
    when the client has gone, TimeoutError after ``timeout`` seconds.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    if transport.get_write_buffer_size():
        high, low = transport.get_write_buffer_limits()[::-1]
        transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(timeout):
                await writer.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)
        if transport.is_closing() or request.transport is None:
            raise ConnectionResetError("the client closed the connection")
    return transport


def cork(request: web.Request, length: int):
    """Cork the socket of a response whose body of ``length`` bytes goes out by ``send_range``,
    before its headers are sent; what ``uncork`` takes once the body has ended, or None if not corked."""
    if length <= _CORK_ABOVE or request.transport is None:
        return None
    sock = request.transport.get_extra_info("socket")
    if sock is not None:
        _cork(sock, True)
    return sock


def uncork(sock) -> None:
    _cork(sock, False)


def _cork(sock, on: bool) -> None:
    if hasattr(socket, "TCP_CORK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
        except (OSError, ValueError):
            # The client has gone; the send loop reports that. (uvloop's socket
            # stand-in raises ValueError once the transport has closed its descriptor.)
            pass
