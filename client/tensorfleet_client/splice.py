"""A response body moved from the socket into the file by the kernel (Linux ``splice``).

aiohttp hands every piece of a body to Python as a new bytes object, which the
download then writes: two copies of every byte, and a round of Python per
piece. ``splice`` moves the socket's pages into a pipe and from the pipe into
the file: one copy, made in the kernel. A 1 GB pull on loopback (bench.pull's
setting, sha256 included) took 1.32 s of the client's CPU instead of 1.86, and
1.14 s instead of 1.29 (medians of 7; curl, which does not hash, 0.87 and 0.88).

Only for a body that is the file's bytes as they stand on the wire: plain TCP
(over TLS the socket carries ciphertext), with a Content-Length and no
Transfer-Encoding, and at least MIN_BODY bytes. The connection cannot carry
another request afterwards (aiohttp's parser never saw the body), so it is
closed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Callable

import aiohttp

from .fileio import write_at

MiB = 1024 * 1024
# A pipe of 1 MiB (its default is 64 KiB) moves a socket's whole receive buffer in one call.
_PIPE_SIZE = 1 * MiB
# Smaller bodies go through aiohttp, which keeps the connection for the next request: the copy that
# splicing saves on a few MiB is worth about what a new connection costs.
MIN_BODY = 4 * MiB


def usable(resp: aiohttp.ClientResponse, count: int) -> bool:
    """Whether ``resp``'s body, ``count`` bytes, is spliced: plain TCP, exactly the bytes asked for, not small."""
    if count < MIN_BODY or not hasattr(os, "splice"):
        return False
    connection = resp.connection
    transport = connection.transport if connection is not None else None
    if transport is None or transport.get_extra_info("socket") is None:
        return False
    if transport.get_extra_info("ssl_object") is not None or transport.get_extra_info("sslcontext") is not None:
        return False
    # No Content-Encoding test: the session does not decompress, so an encoded body is written as sent either way.
    return resp.content_length == count and "Transfer-Encoding" not in resp.headers


async def receive(resp: aiohttp.ClientResponse, fd: int, pos: int, count: int, *, timeout: float,
                  received: Callable[[int], None]) -> None:
    """Write ``resp``'s ``count``-byte body to ``fd`` at ``pos``, calling ``received(n)`` as each n bytes land.

    Raises ClientPayloadError if the body ends early, TimeoutError after
    ``timeout`` seconds without a byte, ConnectionError if the connection
    breaks. Unless aiohttp had read the whole body already, the response is closed.
    """
    done = 0
    # What aiohttp read along with the headers; nothing more arrives once reading is paused, and
    # pausing follows the last read with no await between (the read may resume reading).
    while done < count and (data := resp.content.read_nowait(count - done)):
        write_at(fd, data, pos + done)
        done += len(data)
        received(len(data))
    if done == count:
        return
    try:
        connection = resp.connection
        transport = connection.transport if connection is not None else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            raise ConnectionResetError("the connection closed before the body arrived")
        # The protocol's pause also stops aiohttp's own read timeout: this loop keeps its own.
        connection.protocol.pause_reading()
        src = os.dup(sock.fileno())
        try:
            pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC)
            try:
                try:
                    fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
                except OSError:
                    pass  # over the user's pipe limit: the default size works, in more calls
                await _splice_body(src, pipe_out, pipe_in, fd, pos + done, count - done, timeout, received)
            finally:
                os.close(pipe_in)
                os.close(pipe_out)
        finally:
            os.close(src)
    finally:
        resp.close()


async def _splice_body(src: int, pipe_out: int, pipe_in: int, fd: int, pos: int, count: int, timeout: float,
                       received: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    done = 0
    while done < count:
        try:
            # Non-blocking on both ends: the socket is (the transport made it so), and the pipe is empty.
            n = os.splice(src, pipe_in, min(_PIPE_SIZE, count - done),
                          flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            await _readable(loop, src, timeout)
            continue
        if n == 0:
            raise aiohttp.ClientPayloadError(f"response ended {count - done} bytes before its end")
        _pipe_to_file(pipe_out, fd, pos + done, n)
        done += n
        received(n)
        # Other ranges' connections get the loop between steps.
        await asyncio.sleep(0)


def _pipe_to_file(pipe_out: int, fd: int, pos: int, n: int) -> None:
    """Move the ``n`` bytes in the pipe to ``fd`` at ``pos``."""
    while n:
        try:
            k = os.splice(pipe_out, fd, n, offset_dst=pos, flags=os.SPLICE_F_MOVE)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # A file system without splice_write: through memory, as a plain download would.
            data = os.read(pipe_out, n)
            write_at(fd, data, pos)
            k = len(data)
        pos += k
        n -= k


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        loop.remove_reader(fd)
