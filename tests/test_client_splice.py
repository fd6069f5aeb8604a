"""The client's splice path (tensorfleet_client.splice): bodies moved from the socket to the file by the kernel.

Against a small fake service on 127.0.0.1 that cuts, stalls and overruns its
bodies: the file is exact in every case, a range that fails goes on from where
it stopped, and every descriptor the path opened is closed.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import web
from tensorfleet_client import AsyncModelServiceClient, RetryPolicy, fileio, splice
from tensorfleet_client import download as dl

from tests.test_client_hostile import ID, Liar, serve

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")

FAST = RetryPolicy(attempts=3, backoff=0.01)
BOUND = 30


class Spliced:
    """Records the bytes splice.receive left to the kernel and the descriptors it opened and closed."""

    def __init__(self, monkeypatch) -> None:
        self.bytes = 0
        self.opened: list[int] = []
        self.closed: list[int] = []
        real_body, real_dup, real_pipe2, real_close = splice._splice_body, os.dup, os.pipe2, os.close

        async def body(src, pipe_out, pipe_in, fd, pos, count, timeout, received):
            def counted(n: int) -> None:
                self.bytes += n
                received(n)
            await real_body(src, pipe_out, pipe_in, fd, pos, count, timeout, counted)

        def dup(fd: int) -> int:
            new = real_dup(fd)
            self.opened.append(new)
            return new

        def pipe2(flags: int) -> tuple[int, int]:
            fds = real_pipe2(flags)
            self.opened.extend(fds)
            return fds

        def close(fd: int) -> None:
            self.closed.append(fd)
            real_close(fd)

        monkeypatch.setattr(splice, "_splice_body", body)
        monkeypatch.setattr(splice.os, "dup", dup)
        monkeypatch.setattr(splice.os, "pipe2", pipe2)
        monkeypatch.setattr(splice.os, "close", close)

    def all_closed(self) -> bool:
        return bool(self.opened) and all(fd in self.closed for fd in self.opened)


async def pull_from(aiohttp_server, tmp_path, download, *names: str, **client_options) -> list[bytes]:
    """Serve ``download`` at the download route; pull the model into each of ``names`` (one connection
    each, in turn); the files' bytes."""
    app = web.Application()
    app.router.add_get("/api/v1/models/{id}/download", download)
    url = await serve(aiohttp_server, app)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST, **client_options) as client:
        for name in names or ("model.bin",):
            await client.download(ID, tmp_path / name, parallel=1)
    return [(tmp_path / name).read_bytes() for name in names or ("model.bin",)]


@pytest.mark.parametrize("parallel", [1, 3])
async def test_a_plain_tcp_body_goes_to_the_file_through_the_kernel(aiohttp_server, tmp_path, monkeypatch, parallel):
    spliced = Spliced(monkeypatch)
    data = os.urandom(3 * splice.MIN_BODY)
    url = await serve(aiohttp_server, Liar(data))
    target = tmp_path / "model.bin"
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        result = await client.download(ID, target, parallel=parallel)
    assert target.read_bytes() == data and result.bytes_transferred == len(data)
    # Most of the body was still in the socket when the headers were read.
    assert spliced.bytes > len(data) // 2
    assert spliced.all_closed()


async def test_a_body_that_stalls_is_dropped_after_the_read_timeout_and_goes_on_from_there(aiohttp_server, tmp_path,
                                                                                           monkeypatch):
    spliced = Spliced(monkeypatch)
    data = os.urandom(splice.MIN_BODY)
    liar = Liar(data)
    stall = asyncio.Event()

    async def download(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD" or len([m for m, *_ in liar.seen if m == "GET"]) > 0:
            return await liar.download(request)
        liar.seen.append((request.method, request.path, request.headers.get("Range"), None))
        resp = web.StreamResponse(status=206, headers={**liar.headers, "Content-Range": f"bytes 0-{len(data) - 1}"
                                                                                        f"/{len(data)}"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:dl.MiB])
        await stall.wait()  # until the test ends: the client must give up on its own
        return resp

    try:
        assert await pull_from(aiohttp_server, tmp_path, download, read_timeout=0.5) == [data]
    finally:
        stall.set()
    ranges = [r for m, _, r, _ in liar.seen if m == "GET"]
    assert ranges[0] == f"bytes=0-{len(data) - 1}" and len(ranges) == 2
    # Asked again from the first byte that had not arrived, not from the start.
    assert ranges[1] == f"bytes={dl.MiB}-{len(data) - 1}"
    assert spliced.all_closed()


async def test_bytes_after_the_body_are_never_read_into_the_file(aiohttp_server, tmp_path, monkeypatch):
    spliced = Spliced(monkeypatch)
    data = os.urandom(splice.MIN_BODY + dl.MiB)
    liar = Liar(data)

    async def download(request: web.Request) -> web.StreamResponse:
        resp = await liar.download(request)
        if request.method == "GET":
            await resp.prepare(request)
            await resp.write_eof()
            # Past Content-Length, straight on the socket: a server that sends more than it said.
            request.transport.write(b"\xff" * dl.MiB)
        return resp

    assert await pull_from(aiohttp_server, tmp_path, download) == [data]
    assert spliced.bytes > 0 and spliced.all_closed()


async def test_a_chunked_body_is_not_spliced(aiohttp_server, tmp_path, monkeypatch):
    """Chunk framing is not the file's bytes: such a body goes through aiohttp's parser."""
    spliced = Spliced(monkeypatch)
    data = os.urandom(splice.MIN_BODY + dl.MiB)
    liar = Liar(data)

    async def download(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return await liar.download(request)
        first, last = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        resp = web.StreamResponse(status=206, headers={**liar.headers,
                                                       "Content-Range": f"bytes {first}-{last}/{len(data)}"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for at in range(first, last + 1, 100_000):
            await resp.write(data[at:min(at + 100_000, last + 1)])
        await resp.write_eof()
        return resp

    assert await pull_from(aiohttp_server, tmp_path, download) == [data]
    assert spliced.bytes == 0 and spliced.opened == []


async def test_a_small_body_goes_through_aiohttp_which_keeps_the_connection(aiohttp_server, tmp_path, monkeypatch):
    spliced = Spliced(monkeypatch)
    data = os.urandom(splice.MIN_BODY - 1)
    liar = Liar(data)
    peers: list[tuple[str, str]] = []

    async def download(request: web.Request) -> web.StreamResponse:
        peers.append((request.method, request.transport.get_extra_info("peername")))
        return await liar.download(request)

    assert await pull_from(aiohttp_server, tmp_path, download, "one.bin", "two.bin") == [data, data]
    # Each download's HEAD and GET, all on one connection.
    assert [m for m, _ in peers] == ["HEAD", "GET"] * 2 and len({p for _, p in peers}) == 1
    assert spliced.bytes == 0 and spliced.opened == []


async def test_short_writes_to_the_part_file_are_finished(aiohttp_server, tmp_path, monkeypatch):
    """``pwrite`` may write less than it is given; the body that aiohttp hands over piece by piece
    still lands whole (write_at goes on with the rest), and the pull's sha256 check passes."""
    data = os.urandom(splice.MIN_BODY - 1)
    real_pwrite = os.pwrite
    calls = []

    def short_pwrite(fd: int, buf, pos: int) -> int:
        calls.append(len(buf))
        return real_pwrite(fd, memoryview(buf)[:1000], pos)

    monkeypatch.setattr(fileio.os, "pwrite", short_pwrite)
    assert await pull_from(aiohttp_server, tmp_path, Liar(data).download) == [data]
    assert len(calls) >= len(data) // 1000


def test_a_file_without_splice_support_is_written_through_memory(tmp_path):
    """splice(2) refuses a file opened for appending (EINVAL), as some file systems refuse any: the pipe's
    bytes are then read and written."""
    path = tmp_path / "appended"
    path.write_bytes(b"head:")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(pipe_in, b"the pipe's bytes")
        with pytest.raises(OSError):
            os.splice(pipe_out, fd, 1, offset_dst=5)
        splice._pipe_to_file(pipe_out, fd, 5, len(b"the pipe's bytes"))
    finally:
        for d in (fd, pipe_out, pipe_in):
            os.close(d)
    assert path.read_bytes() == b"head:the pipe's bytes"


def test_a_write_that_makes_no_progress_raises_instead_of_spinning(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.os, "pwrite", lambda fd, buf, pos: 0)
    fd = os.open(tmp_path / "part", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="wrote nothing of 5 bytes at offset 7"):
            fileio.write_at(fd, b"bytes", 7)
    finally:
        os.close(fd)
