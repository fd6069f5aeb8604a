"""app.http.sendfile: the zero-copy path behind embedded downloads, on uvloop and asyncio.

Downloads through the API cover the bytes end to end; these pin down what
those tests cannot see from the client: a large body's socket is corked from
before its headers (which then leave with its first segment, as nginx's
tcp_nopush does) to its last byte, and uncorked however the body ends, so
nothing after it waits on a half-full segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from datetime import datetime, timezone

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.http import fileresponse, sendfile

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


async def _no_reads(offset: int, count: int):
    raise AssertionError("a local file is sent with sendfile, not read")
    yield b""


class Served:
    """An app answering Range requests for a file through fileresponse.send, and what the socket saw."""

    def __init__(self, path, monkeypatch) -> None:
        self.path = path
        path.write_bytes(DATA)
        self.size = len(DATA)  # the size the representation declares
        self.at_headers: list[int] = []  # TCP_CORK as each response's headers were about to be sent
        self.during: list[int] = []  # TCP_CORK at each sendfile call
        self.corks: list[bool] = []  # every change of TCP_CORK, in order
        self.missing: list[str] = []
        self.send_buffer: int | None = None  # SO_SNDBUF for the response's socket, to make it fill up
        real_sendfile, real_cork = os.sendfile, sendfile._cork

        def spying_sendfile(out, fd, offset, count):
            self.during.append(_cork_state(out))
            return real_sendfile(out, fd, offset, count)

        def spying_cork(sock, on: bool) -> None:
            self.corks.append(on)
            real_cork(sock, on)

        monkeypatch.setattr(sendfile.os, "sendfile", spying_sendfile)
        monkeypatch.setattr(sendfile, "_cork", spying_cork)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.send_buffer is not None:
            request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                                   self.send_buffer)
        file = fileresponse.Representation(
            headers={"ETag": '"blob"', "Content-Type": "application/octet-stream"}, size=self.size,
            last_modified=datetime.now(timezone.utc), date_is_strong=False, not_modified_headers=("ETag",),
            read=_no_reads, path=str(self.path))
        try:
            return await fileresponse.send(request, file, timeout=10, sending=lambda _: contextlib.nullcontext(),
                                           aborts=(sendfile.FileGone,))
        except sendfile.FileGone as e:
            # fileresponse has aborted the connection: the client sees a cut body.
            self.missing.append(str(e))
            return web.Response()

    async def headers_going(self, request: web.Request, response: web.StreamResponse) -> None:
        self.at_headers.append(_cork_state(request.transport.get_extra_info("socket").fileno()))

    async def get(self, *queries: tuple[int, int]) -> list[bytes | Exception]:
        """Each (offset, count) as a Range on one keep-alive connection: the body, or the error."""
        app = web.Application()
        app.router.add_get("/", self.handler)
        app.on_response_prepare.append(self.headers_going)
        bodies: list[bytes | Exception] = []
        async with TestClient(TestServer(app)) as client:
            for offset, count in queries:
                try:
                    async with client.get("/", headers={"Range": f"bytes={offset}-{offset + count - 1}"}) as resp:
                        assert resp.status == 206
                        bodies.append(await resp.read())
                except aiohttp.ClientPayloadError as e:
                    bodies.append(e)
        return bodies


@pytest.fixture
def served(tmp_path, monkeypatch) -> Served:
    return Served(tmp_path / "blob", monkeypatch)


@RUNNERS
def test_a_large_body_is_corked_from_before_its_headers_to_its_end(served, run):
    queries = [(0, len(DATA)), (2 * 1024 * 1024 - 1, 2 * 1024 * 1024 + 2), (7, sendfile._CORK_ABOVE + 1)]
    bodies = run(served.get(*queries))
    assert bodies == [DATA[o:o + c] for o, c in queries]
    assert served.at_headers == [1, 1, 1]
    assert served.during and set(served.during) == {1}
    assert served.corks == [True, False] * 3


@RUNNERS
def test_a_small_body_goes_uncorked(served, run):
    """One sendfile call holds it: corking would only cost two setsockopt calls."""
    queries = [(1, 3), (len(DATA) - 10, 10), (0, sendfile._CORK_ABOVE)]
    bodies = run(served.get(*queries))
    assert bodies == [DATA[o:o + c] for o, c in queries]
    assert served.at_headers == [0, 0, 0]
    assert served.during and set(served.during) == {0}
    assert served.corks == []


@RUNNERS
def test_a_file_shorter_than_recorded_is_reported_and_uncorked(served, run):
    served.size = len(DATA) + 1024 * 1024
    [body] = run(served.get((len(DATA) - 5, 200_000)))
    assert isinstance(body, aiohttp.ClientPayloadError)
    assert [m.endswith("is shorter than recorded") for m in served.missing] == [True]
    assert served.corks == [True, False]


@RUNNERS
def test_a_missing_file_is_reported(served, run):
    served.path.unlink()
    [body] = run(served.get((0, 10)))
    assert isinstance(body, aiohttp.ClientPayloadError)
    assert [m.endswith("is missing") for m in served.missing] == [True]


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
