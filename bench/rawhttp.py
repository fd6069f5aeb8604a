"""A lean HTTP/1.1 GET client for measuring downloads without measuring the client.

Why not aiohttp's client for the download scenarios: on this class of machine
(2 cores, loopback) aiohttp's client tops out at roughly 1-2 GB/s for a single
stream, below what nginx (and possibly the service) can send, so ratios would
collapse towards 1.0 and say nothing about the server. This client receives
straight into a preallocated buffer (``asyncio.BufferedProtocol``, one
``recv_into`` per socket read, no per-piece objects) and verifies every byte
with ``memcmp`` against the source file, which keeps it near 3 GB/s against
nginx. ``--client aiohttp`` switches the download scenarios to aiohttp for
comparison.

Only what the bench needs: GET with an optional Range, Content-Length bodies
(no chunked transfer coding), keep-alive reuse, no pipelining.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import mmap
import time
from dataclasses import dataclass, field

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

RECV_BUFFER = 1 << 20


def buffer_address(buf) -> int:
    """Address of a writable buffer (bytearray, ACCESS_COPY mmap)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Source:
    """The expected bytes: the file the bench generated, mapped privately."""

    def __init__(self, path: str, size: int, sha256: str) -> None:
        self.path, self.size, self.sha256 = path, size, sha256
        self._file = open(path, "rb")
        # ACCESS_COPY: a private, writable mapping (nothing is ever written),
        # so ctypes can take its address for memcmp.
        self.map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.base = buffer_address(self.map) if size else 0

    def matches(self, offset: int, ptr, n: int) -> bool:
        """Whether n bytes at ptr (an address or a bytes object) equal the source at offset."""
        if offset < 0 or offset + n > self.size:
            return False
        return _memcmp(self.base + offset, ptr, n) == 0


# -- sinks: where body bytes go ----------------------------------------------
class CompareSink:
    """Byte-exact comparison with the source at the body's offset (cheap: memcmp)."""

    method = "bytes"

    def __init__(self, source: Source, offset: int) -> None:
        self.source, self.pos, self.ok = source, offset, True

    def feed(self, ptr, view, n: int) -> None:
        if self.ok and not self.source.matches(self.pos, ptr, n):
            self.ok = False
        self.pos += n

    def finish(self) -> bool:
        return self.ok


class Sha256Sink:
    """sha256 of the body, compared with the expected digest at the end."""

    method = "sha256"

    def __init__(self, expected: str) -> None:
        self.h, self.expected = hashlib.sha256(), expected

    def feed(self, ptr, view, n: int) -> None:
        self.h.update(view[:n])

    def finish(self) -> bool:
        return self.h.hexdigest() == self.expected


class AssembleSink:
    """Copies the body into a destination buffer at an offset (segmented downloads)."""

    method = "assembled"

    def __init__(self, dest: memoryview, offset: int) -> None:
        self.dest, self.pos = dest, offset

    def feed(self, ptr, view, n: int) -> None:
        self.dest[self.pos:self.pos + n] = view[:n]
        self.pos += n

    def finish(self) -> bool:
        return True


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0
    t_start: float = 0.0
    t_headers: float | None = None
    t_first_body: float | None = None
    t_end: float | None = None
    verified: bool = False
    error: str | None = None

    def record(self) -> dict:
        def rel(t):
            return None if t is None else t - self.t_start
        return {
            "status": self.status,
            "bytes": self.body_bytes,
            "ttfb_headers": rel(self.t_headers),
            "ttfb": rel(self.t_first_body if self.t_first_body is not None else self.t_headers),
            "total": rel(self.t_end),
            "verified": self.verified,
            "error": self.error,
        }


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.addr = buffer_address(self.buf)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()
        self.in_body = False
        self.left = 0
        self.result: Result | None = None
        self.sink = None
        self.waiter: asyncio.Future | None = None

    # -- asyncio callbacks --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.result is None:
            self._fail("bytes received with no request outstanding")
            return
        if self.in_body:
            self._body(self.addr, self.view, nbytes)
            return
        self.head += self.view[:nbytes]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 65536:
                self._fail("response head larger than 64 KiB")
            return
        self._parse_head(bytes(self.head[:end]))
        rest = bytes(self.head[end + 4:])
        self.head = bytearray()
        if self.result is None:
            return
        self.in_body = True
        if self.left == 0 and not rest:
            self._complete()
        elif rest:
            self._body(rest, memoryview(rest), len(rest))

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.result is not None and self.waiter is not None and not self.waiter.done():
            self._fail(f"connection closed after {self.result.body_bytes} body bytes"
                       + (f" ({exc})" if exc else ""))

    # -- parsing ---------------------------------------------------------------
    def _parse_head(self, head: bytes) -> None:
        r = self.result
        r.t_headers = time.perf_counter()
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            self._fail(f"bad status line {lines[0][:80]!r}")
            return
        r.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            r.headers[name.strip().lower()] = value.strip()
        if "chunked" in r.headers.get("transfer-encoding", "").lower():
            self._fail("chunked responses are not supported by this client")
            return
        if "content-length" not in r.headers:
            self._fail("response without Content-Length")
            return
        self.left = int(r.headers["content-length"])

    def _body(self, ptr, view, n: int) -> None:
        r = self.result
        if n > self.left:
            self._fail(f"{n - self.left} bytes beyond Content-Length")
            return
        if r.t_first_body is None and n:
            r.t_first_body = time.perf_counter()
        if self.sink is not None:
            self.sink.feed(ptr, view, n)
        r.body_bytes += n
        self.left -= n
        if self.left == 0:
            self._complete()

    def _complete(self) -> None:
        r = self.result
        r.t_end = time.perf_counter()
        waiter = self.waiter
        r.verified = self.sink.finish() if self.sink is not None else False
        self._reset()
        if waiter is not None and not waiter.done():
            waiter.set_result(r)

    def _fail(self, message: str) -> None:
        r, waiter = self.result, self.waiter
        if r is not None:
            r.error = message
            r.t_end = time.perf_counter()
        self._reset()
        if self.transport is not None:
            self.transport.abort()
        if waiter is not None and not waiter.done():
            waiter.set_result(r)


class Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._proto: _Protocol | None = None

    async def _ensure(self) -> _Protocol:
        if self._proto is None or self._proto.closed:
            loop = asyncio.get_running_loop()
            _, self._proto = await loop.create_connection(_Protocol, self.host, self.port)
        return self._proto

    async def get(self, path: str, sink=None, range_: tuple[int, int] | None = None,
                  timeout: float = 600.0) -> Result:
        result = Result(t_start=time.perf_counter())
        try:
            proto = await self._ensure()
        except OSError as e:
            result.error = f"connect: {e}"
            result.t_end = time.perf_counter()
            return result
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if range_ is not None:
            head += f"Range: bytes={range_[0]}-{range_[1]}\r\n"
        proto.result, proto.sink = result, sink
        proto.waiter = asyncio.get_running_loop().create_future()
        proto.transport.write((head + "\r\n").encode("latin-1"))
        try:
            return await asyncio.wait_for(proto.waiter, timeout)
        except asyncio.TimeoutError:
            proto._fail(f"no complete response within {timeout} s")
            return result

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
