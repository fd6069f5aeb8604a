"""app.http.sendfile: the zero-copy path behind embedded downloads, on uvloop and asyncio.

Downloads through the API cover the bytes end to end; these pin down what
those tests cannot see from the client: the socket is corked only while the
file is being sent, so nothing after it waits on a half-full segment.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.http import sendfile

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux-only")

DATA = os.urandom(5 * 1024 * 1024 + 7)  # more than two sendfile steps


# The service runs on uvloop, the rest of the suite on asyncio: both here.
# Each test runs its own loop, so the async parts are plain functions.
RUNNERS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


def _cork_state(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
    finally:
        s.close()


class Served:
    """An app whose handler sends ?offset=&count= of a file with send_range, and what it saw."""

    def __init__(self, path, monkeypatch) -> None:
        self.path = path
        path.write_bytes(DATA)
        self.during: list[int] = []
        self.after: list[int] = []
        self.missing: list[tuple[str, int]] = []
        self.send_buffer: int | None = None  # SO_SNDBUF for the response's socket, to make it fill up
        real_sendfile = os.sendfile

        def spying_sendfile(out, fd, offset, count):
            self.during.append(_cork_state(out))
            return real_sendfile(out, fd, offset, count)

        monkeypatch.setattr(sendfile.os, "sendfile", spying_sendfile)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        offset, count = int(request.query["offset"]), int(request.query["count"])
        response = web.StreamResponse()
        response.content_length = count
        writer = await response.prepare(request)
        fd = request.transport.get_extra_info("socket").fileno()
        if self.send_buffer is not None:
            request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                                   self.send_buffer)
        try:
            await sendfile.send_range(request, writer, str(self.path), offset, count, 10)
        except sendfile.FileGone as e:
            self.missing.append((str(e), _cork_state(fd)))
            request.transport.abort()
            return response
        self.after.append(_cork_state(fd))
        await response.write_eof()
        return response

    async def get(self, *queries: tuple[int, int]) -> list[bytes | Exception]:
        """Each (offset, count) on one keep-alive connection: the body, or the error."""
        app = web.Application()
        app.router.add_get("/", self.handler)
        bodies: list[bytes | Exception] = []
        async with TestClient(TestServer(app)) as client:
            for offset, count in queries:
                try:
                    async with client.get("/", params={"offset": offset, "count": count}) as resp:
                        assert resp.status == 200
                        bodies.append(await resp.read())
                except aiohttp.ClientPayloadError as e:
                    bodies.append(e)
        return bodies


@pytest.fixture
def served(tmp_path, monkeypatch) -> Served:
    return Served(tmp_path / "blob", monkeypatch)


@RUNNERS
def test_sends_the_range_corked_then_uncorks(served, run):
    queries = [(0, len(DATA)), (2 * 1024 * 1024 - 1, 2 * 1024 * 1024 + 2), (7, sendfile._CORK_ABOVE + 1)]
    bodies = run(served.get(*queries))
    assert bodies == [DATA[o:o + c] for o, c in queries]
    assert served.during and set(served.during) == {1}
    assert served.after == [0, 0, 0]


@RUNNERS
def test_a_small_range_goes_uncorked(served, run):
    """One sendfile call holds it: corking would only cost two setsockopt calls."""
    queries = [(1, 3), (len(DATA) - 10, 10), (0, sendfile._CORK_ABOVE)]
    bodies = run(served.get(*queries))
    assert bodies == [DATA[o:o + c] for o, c in queries]
    assert served.during and set(served.during) == {0}
    assert served.after == [0, 0, 0]


@RUNNERS
def test_a_file_shorter_than_recorded_is_reported_and_uncorked(served, run):
    [body] = run(served.get((len(DATA) - 5, 50)))
    assert isinstance(body, aiohttp.ClientPayloadError)
    assert [(m.endswith("is shorter than recorded"), cork) for m, cork in served.missing] == [(True, 0)]


@RUNNERS
def test_a_missing_file_is_reported(served, run):
    served.path.unlink()
    [body] = run(served.get((0, 10)))
    assert isinstance(body, aiohttp.ClientPayloadError)
    assert [m.endswith("is missing") for m, _ in served.missing] == [True]


@RUNNERS
def test_the_socket_is_duplicated_only_to_wait_for_it_and_closed_after(served, run, monkeypatch):
    """uvloop keeps the transport's descriptor to itself for waiting: a body that fills the socket
    waits on a duplicate; one that leaves in one call needs none."""
    made, closed = [], []
    real_dup, real_close = os.dup, os.close

    def by_send_range() -> bool:
        return sys._getframe(2).f_globals["__name__"] == sendfile.__name__

    def dup(fd: int) -> int:
        new = real_dup(fd)
        if by_send_range():
            made.append(new)
        return new

    def close(fd: int) -> None:
        if by_send_range():
            closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(sendfile.os, "dup", dup)
    monkeypatch.setattr(sendfile.os, "close", close)
    assert run(served.get((0, 100), (5, sendfile._CORK_ABOVE))) == [DATA[:100], DATA[5:5 + sendfile._CORK_ABOVE]]
    assert made == []
    served.send_buffer = 16 * 1024
    assert run(served.get((0, len(DATA)))) == [DATA]
    assert made and all(fd in closed for fd in made)
