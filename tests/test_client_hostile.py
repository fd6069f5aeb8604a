"""The client against a fake Model Service that lies, on 127.0.0.1.

Whatever a server says (headers, JSON, Content-Disposition, sizes, ranges,
redirects), the client writes only under the folder it was given, replaces
nothing it was not asked to, sends its API key only to the origin it was
configured with, and allocates nothing in proportion to a declared size.
Every test checks the folders around its target too: nothing appeared there,
nothing vanished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import resource
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from tensorfleet_client import AsyncModelServiceClient, ModelServiceError, ProtocolError, RetryPolicy, transport
from tensorfleet_client import download as dl

from testkit.mongo_server import REPO

FAST = RetryPolicy(attempts=2, backoff=0.01)
DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
ID = "c0ffee" * 4
KEY = "secret-key-1"
BOUND = 30  # seconds any one test may take


def served_headers(data: bytes = DATA, **changes: str | None) -> dict[str, str]:
    """What the real service sends with a file, with ``changes`` (None drops a header)."""
    sha = hashlib.sha256(data).hexdigest()
    headers = {"ETag": f'"{sha}"', "X-File-Checksum": f"sha256:{sha}", "X-Model-Id": ID,
               "X-Model-Name": "lying", "X-Model-Version": "v1.0", "Accept-Ranges": "bytes",
               "Content-Disposition": 'attachment; filename="model.bin"'}
    for k, v in changes.items():
        k = k.replace("_", "-")
        if v is None:
            headers.pop(k, None)
        else:
            headers[k] = v
    return headers


class Liar:
    """Serves ``data`` at the download routes, lying as configured; records what it was asked."""

    def __init__(self, data: bytes = DATA, headers: dict[str, str] | None = None) -> None:
        self.data = data
        self.headers = headers or served_headers(data)
        self.declared_size: int | None = None  # Content-Length of the HEAD, if not the true one
        self.content_range = None  # (first, last, size) -> the Content-Range to answer with
        self.seen: list[tuple[str, str, str | None, str | None]] = []  # method, path, Range, X-API-Key

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/api/v1/models/{id}/download", "/api/v1/models/by-name/{name}/download"):
            app.router.add_get(path, self.download)  # GET routes answer HEAD too
        return app

    async def download(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Range"),
                          request.headers.get("X-API-Key")))
        if request.method == "HEAD":
            if request.headers.get("If-None-Match") == self.headers["ETag"]:
                return web.Response(status=304, headers={k: v for k, v in self.headers.items()
                                                         if k in ("ETag", "X-Model-Id", "X-Model-Version")})
            resp = web.StreamResponse(headers=self.headers)
            resp.content_length = len(self.data) if self.declared_size is None else self.declared_size
            await resp.prepare(request)
            return resp
        size = len(self.data)
        rng = request.headers.get("Range")
        if rng is None:
            return web.Response(body=self.data, headers=self.headers)
        first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        honest = (first, last, size)
        answered = self.content_range(*honest) if self.content_range else honest
        a, b, _ = answered
        return web.Response(status=206, body=self.data[a:b + 1],
                            headers={**self.headers, "Content-Range": "bytes %d-%d/%d" % answered})


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def place(tmp_path):
    """tmp_path with a victim folder of files that must survive, an empty cache and an output folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (victim / "notes.md").write_text("also mine")
    (tmp_path / "cache").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


async def serve(aiohttp_server, app) -> str:
    """Run ``app`` (an Application, or an object with ``app()``) on 127.0.0.1; its URL."""
    server = await aiohttp_server(app if isinstance(app, web.Application) else app.app())
    return str(server.make_url("")).rstrip("/")


# -- 1. names, versions, ids and file names from the server -----------------

# Values a lying server puts in X-Model-Version / X-Model-Id / X-Model-Name.
HOSTILE = {
    "absolute": lambda tmp: str(tmp / "victim"),
    "dotdot": lambda tmp: "../../victim",
    "hidden-dotdot": lambda tmp: "v1.0/../../../victim",
    "dots": lambda tmp: "..",
    "slash": lambda tmp: "/",
    "empty": lambda tmp: "",
}


@pytest.mark.parametrize("header", ["X-Model-Version", "X-Model-Id", "X-Model-Name"])
@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_fetch_refuses_a_hostile_header_and_writes_nothing(aiohttp_server, place, header, kind):
    bad = HOSTILE[kind](place)
    liar = Liar(headers=served_headers(**{header: bad}))
    url = await serve(aiohttp_server, liar)
    before = tree(place)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, KEY, retry=FAST) as client:
        with pytest.raises(ProtocolError) as e:
            await client.fetch("lying", cache_dir=place / "cache")
    assert repr(bad) in str(e.value) and header in str(e.value)
    # Only the name's lock, taken before anything was asked: no version folder, no file, no deletion.
    assert tree(place) == {**before, "cache/lying": None, "cache/lying/.lock": b""}
    assert [m for m, *_ in liar.seen] == ["HEAD"]


@pytest.mark.parametrize("header", ["X-Model-Version", "X-Model-Name"])
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "hidden-dotdot", "slash"])
async def test_download_into_a_folder_refuses_a_hostile_name_or_version(aiohttp_server, place, header, kind):
    # No Content-Disposition: the file would be named after the model's name and version.
    bad = HOSTILE[kind](place)
    liar = Liar(headers=served_headers(**{header: bad, "Content-Disposition": None}))
    url = await serve(aiohttp_server, liar)
    before = tree(place)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(ProtocolError) as e:
            await client.download(ID, place / "out")
    assert repr(bad) in str(e.value)
    assert tree(place) == before


async def test_a_nul_in_a_header_is_a_protocol_error(place):
    # aiohttp's server will not send a NUL, so this liar writes its answer by hand.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\nETag: \"x\"\r\nX-Model-Id: " + ID.encode()
                     + b"\r\nX-File-Checksum: sha256:" + SHA.encode()
                     + b"\r\nX-Model-Name: lying\r\nX-Model-Version: v1.0\x00/../../victim\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    before = tree(place)
    try:
        async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
            with pytest.raises(ProtocolError) as e:
                await client.fetch("lying", cache_dir=place / "cache")
    finally:
        server.close()
    assert "Invalid HTTP header" in str(e.value) and "v1.0\\x00" in str(e.value), str(e.value)
    assert tree(place) == {**before, "cache/lying": None, "cache/lying/.lock": b""}


# Content-Disposition file names that are not a plain, visible file name.
NOT_PLAIN = {
    "absolute": 'attachment; filename="/etc/victim.bin"',
    "dotdot": 'attachment; filename="../../victim/keep.txt"',
    "backslash": 'attachment; filename="..\\\\..\\\\victim\\\\keep.txt"',
    "slash": 'attachment; filename="/"',
    "nul": "attachment; filename*=UTF-8''model%00.bin",
    "encoded-dotdot": "attachment; filename*=UTF-8''..%2F..%2Fvictim%2Fkeep.txt",
    "hidden": 'attachment; filename=".bashrc"',
    "empty": 'attachment; filename=""',
    "dot": 'attachment; filename="."',
}


@pytest.mark.parametrize("kind", list(NOT_PLAIN))
async def test_a_file_name_that_is_not_plain_falls_back_to_name_and_version(aiohttp_server, place, kind):
    liar = Liar(headers=served_headers(Content_Disposition=NOT_PLAIN[kind]))
    url = await serve(aiohttp_server, liar)
    before = tree(place)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        result = await client.download(ID, place / "out")
        cached = await client.fetch("lying", cache_dir=place / "cache")
    assert result.path == place / "out" / "lying-v1.0"
    assert cached == place / "cache" / "lying" / "v1.0" / "lying-v1.0"
    after = tree(place)
    assert after.pop("out/lying-v1.0") == DATA and after.pop("cache/lying/v1.0/lying-v1.0") == DATA
    assert {k: v for k, v in after.items() if not k.startswith("cache/lying")} == before


async def test_a_cached_version_refreshed_removes_only_its_own_old_file(aiohttp_server, place):
    liar = Liar()
    url = await serve(aiohttp_server, liar)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        first = await client.fetch("lying", cache_dir=place / "cache")
        folder = first.parent
        (folder / "README").write_text("someone else's")  # not the client's
        # The same version, re-uploaded under another file name with other bytes.
        liar.data = DATA[::-1]
        liar.headers = served_headers(liar.data, Content_Disposition='attachment; filename="new.bin"')
        second = await client.fetch("lying", cache_dir=place / "cache")
    assert second == folder / "new.bin" and second.read_bytes() == DATA[::-1]
    assert sorted(p.name for p in folder.iterdir()) == ["README", "new.bin"]


async def test_a_hostile_ref_in_the_cache_is_not_followed(aiohttp_server, place):
    """A ref written by an older client from a lying server's headers is ignored, not trusted."""
    liar = Liar()
    url = await serve(aiohttp_server, liar)
    root = place / "cache" / "lying"
    (root / "refs").mkdir(parents=True)
    victim = place / "victim" / "keep.txt"
    st = victim.stat()
    ref = {"model_id": ID, "name": "lying", "version": "../../victim", "etag": f'"{SHA}"', "sha256": SHA,
           "size": st.st_size, "filename": "keep.txt", "mtime_ns": st.st_mtime_ns}
    (root / "refs" / "latest.json").write_bytes(orjson.dumps(ref))
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        result = await client.fetch_result("lying", cache_dir=place / "cache")
    assert not result.cached and result.path == root / "v1.0" / "model.bin" and result.path.read_bytes() == DATA
    assert victim.read_text() == "mine"


async def test_a_304_naming_a_hostile_version_is_refused(aiohttp_server, place):
    liar = Liar()
    url = await serve(aiohttp_server, liar)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        first = await client.fetch("lying", cache_dir=place / "cache")
        before = tree(place)
        # Same file (so a 304), "now served by" a version that is a path.
        liar.headers = served_headers(X_Model_Version="../../victim")
        with pytest.raises(ProtocolError) as e:
            await client.fetch("lying", cache_dir=place / "cache")
    assert "'../../victim'" in str(e.value) and first.read_bytes() == DATA
    assert tree(place) == before


async def test_a_hostile_model_id_in_json_is_refused_before_it_becomes_a_path(aiohttp_server, place):
    seen: list[tuple[str, str]] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        return web.json_response({"model_id": "../../admin"}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    url = await serve(aiohttp_server, app)
    src = place / "out" / "m.bin"
    src.write_bytes(b"weights")
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(ProtocolError) as e:
            await client.push(src, name="x", algorithm="y")
    assert "'../../admin'" in str(e.value)
    assert seen == [("POST", "/api/v1/models")]  # no upload to, or delete of, a path it made up


async def test_pull_into_a_cache_refuses_a_hostile_name_in_json(aiohttp_server, place):
    liar = Liar()
    app = liar.app()

    async def model(request: web.Request) -> web.Response:
        return web.json_response({"id": ID, "name": "..", "version": "v1.0"})

    app.router.add_get("/api/v1/models/{id}", model)
    url = await serve(aiohttp_server, app)
    before = tree(place)
    code, out, err = await run_cli(url, "pull", ID, "--cache-dir", str(place / "cache"), cwd=place / "out")
    assert code == 1 and "'..'" in err, (code, err)
    assert tree(place) == before
    assert [m for m, *_ in liar.seen] == []


# -- 2. the API key stays with the configured origin ------------------------


class Recorder:
    """A second origin (another port) that records whether an API key reached it."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    def app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.keys.append(request.headers.get("X-API-Key"))
            return web.json_response({"id": ID, "name": "lying", "version": "v1.0"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


async def test_a_redirect_to_another_port_is_refused_and_the_key_stays(aiohttp_server):
    recorder = Recorder()
    other = await serve(aiohttp_server, recorder)
    own_keys: list[str | None] = []

    async def redirect(request: web.Request) -> web.Response:
        own_keys.append(request.headers.get("X-API-Key"))
        if request.path.endswith("/moved"):
            raise web.HTTPFound(f"/api/v1/models/{ID}")  # same origin: followed, with the key
        raise web.HTTPFound(other + request.path_qs)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    url = await serve(aiohttp_server, app)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, KEY, retry=FAST) as client:
        with pytest.raises(ProtocolError) as e:
            await client.get_model(ID)
        assert other in str(e.value)
        with pytest.raises(ProtocolError):
            await client.probe(ID)
        with pytest.raises(ProtocolError):
            await client.get_model("moved")  # same origin, then another
    assert recorder.keys == []  # refused: nothing at all went to the other origin
    assert own_keys and all(k == KEY for k in own_keys)


async def test_a_same_origin_redirect_is_followed_with_the_key(aiohttp_server):
    keys: list[str | None] = []

    async def model(request: web.Request) -> web.Response:
        keys.append(request.headers.get("X-API-Key"))
        if request.path.endswith("/old"):
            raise web.HTTPFound(f"/api/v1/models/{ID}")
        return web.json_response({"id": ID})

    app = web.Application()
    app.router.add_get("/api/v1/models/{id}", model)
    url = await serve(aiohttp_server, app)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, KEY, retry=FAST) as client:
        assert (await client.get_model("old")) == {"id": ID}
    assert keys == [KEY, KEY]


async def test_an_absolute_url_on_another_origin_is_refused(aiohttp_server, place):
    recorder = Recorder()
    other = await serve(aiohttp_server, recorder)
    liar = Liar()
    url = await serve(aiohttp_server, liar)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, KEY, retry=FAST) as client:
        _, remote = await client.probe(ID)
        elsewhere = dataclasses.replace(remote, url=f"{other}/api/v1/models/{ID}/download")
        with pytest.raises(ProtocolError) as e:
            await dl.download_file(client.transport, elsewhere, place / "out" / "m.bin")
    assert other in str(e.value)
    assert recorder.keys == []
    assert list((place / "out").iterdir()) == []


# -- 3. nothing is replaced unless asked --------------------------------------


async def run_cli(url: str, *args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, cwd=cwd,
        env={**os.environ, "MODEL_SERVICE_URL": url, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client'}"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def test_pull_without_output_never_replaces_bashrc_or_any_file(aiohttp_server, place):
    liar = Liar(headers=served_headers(Content_Disposition='attachment; filename=".bashrc"'))
    url = await serve(aiohttp_server, liar)
    home = place / "out"
    (home / ".bashrc").write_text("export PS1=mine\n")

    code, out, err = await run_cli(url, "pull", "lying", cwd=home)
    assert code == 0, err
    assert (home / ".bashrc").read_text() == "export PS1=mine\n"
    assert (home / "lying-v1.0").read_bytes() == DATA

    # The fallback name exists now: not replaced without --force.
    (home / "lying-v1.0").write_text("edited by hand")
    code, out, err = await run_cli(url, "pull", "lying", cwd=home)
    assert code == 1 and "lying-v1.0" in err and "--force" in err, (code, err)
    assert (home / "lying-v1.0").read_text() == "edited by hand"
    code, out, err = await run_cli(url, "pull", "lying", "-o", "lying-v1.0", cwd=home)
    assert code == 1 and "--force" in err, (code, err)
    assert (home / "lying-v1.0").read_text() == "edited by hand"
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", "lying-v1.0"]  # no .part left behind

    code, out, err = await run_cli(url, "pull", "lying", "--force", cwd=home)
    assert code == 0, err
    assert (home / "lying-v1.0").read_bytes() == DATA
    assert (home / ".bashrc").read_text() == "export PS1=mine\n"


async def test_download_replaces_an_existing_file_only_with_overwrite(aiohttp_server, place):
    url = await serve(aiohttp_server, Liar())
    target = place / "out" / "model.bin"
    target.write_text("mine")
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(FileExistsError) as e:
            await client.download(ID, target)
        assert str(target) in str(e.value)
        with pytest.raises(FileExistsError):
            await client.download(ID, place / "out")  # into the folder, under the server's name
        assert target.read_text() == "mine" and sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]
        result = await client.download(ID, target, overwrite=True)
    assert result.path == target and target.read_bytes() == DATA


# -- 4. a declared size allocates nothing -----------------------------------


@pytest.mark.parametrize("how", ["download", "fetch"])
async def test_a_petabyte_content_length_is_refused_before_downloading(aiohttp_server, place, how):
    liar = Liar()
    liar.declared_size = 10 ** 15
    url = await serve(aiohttp_server, liar)
    before = tree(place)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(ModelServiceError) as e:
            if how == "download":
                await client.download(ID, place / "out")
            else:
                await client.fetch("lying", cache_dir=place / "cache")
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert e.value.code == "insufficient_space" and "1000000000000000" in str(e.value), str(e.value)
    assert [m for m, *_ in liar.seen] == ["HEAD"]  # refused before any GET
    assert grew < 100 * 1024, f"peak RSS grew by {grew} KiB"
    expected = before if how == "download" else {**before, "cache/lying": None, "cache/lying/.lock": b""}
    assert tree(place) == expected


def test_the_pieces_of_a_huge_download_are_bounded_in_number():
    pieces = dl.split(10 ** 12, 4)
    assert len(pieces) <= dl.MAX_PIECES
    assert pieces[0].start == 0 and pieces[-1].end == 10 ** 12
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))


# -- item 8: a 206 must be the part asked for; a resume state must be of this file


def seed_half(target: Path, data: bytes, etag: str) -> int:
    """The state an interrupted single-range download of ``data`` (ETag ``etag``) leaves behind."""
    half = len(data) // 2
    target.with_name(target.name + ".part").write_bytes(data[:half])
    target.with_name(target.name + ".part.json").write_bytes(orjson.dumps(
        {"format": dl.STATE_FORMAT, "etag": etag, "size": len(data), "segments": [[0, len(data), half]]}))
    return half


@pytest.mark.parametrize("lie", ["from-zero", "short", "other-total"])
async def test_a_206_with_a_content_range_not_asked_for_is_refused(aiohttp_server, place, lie):
    liar = Liar()
    # Each lie is a well-formed Content-Range with a body that matches it.
    liar.content_range = {
        "from-zero": lambda first, last, size: (0, last - first, size),
        "short": lambda first, last, size: (first, last - 1000, size),
        "other-total": lambda first, last, size: (first, last, size + 1),
    }[lie]
    url = await serve(aiohttp_server, liar)
    target = place / "out" / "model.bin"
    half = seed_half(target, DATA, f'"{SHA}"')
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(ProtocolError) as e:
            await client.download(ID, target)
    assert f"{half}-{len(DATA) - 1}" in str(e.value) and "Content-Range" in str(e.value)
    assert [r for m, _, r, _ in liar.seen if m == "GET"] == [f"bytes={half}-{len(DATA) - 1}"]
    assert not target.exists()


@pytest.mark.parametrize("parallel", [1, 2])
async def test_a_206_body_longer_than_its_range_writes_nothing_past_the_range(aiohttp_server, place, parallel):
    """The body is read as the socket delivers it: bytes past the range asked for are not written."""
    tail = os.urandom(200_000)

    class Longer(Liar):
        async def download(self, request: web.Request) -> web.StreamResponse:
            resp = await super().download(request)
            if resp.status == 206:
                resp.body = resp.body + tail  # Content-Length follows the body: the server sends it all
            return resp

    data = os.urandom(3 * dl.MiB)  # pieces of at least 1 MiB: 2 ranges need a file this large
    liar = Longer(data)
    url = await serve(aiohttp_server, liar)
    target = place / "out" / "model.bin"
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        result = await client.download(ID, target, parallel=parallel)
    assert result.size == len(data) and target.read_bytes() == data
    assert len([m for m, *_ in liar.seen if m == "GET"]) == len(dl.split(len(data), parallel)) >= parallel


async def test_a_part_file_of_another_file_of_the_same_size_is_not_resumed(aiohttp_server, place):
    old = os.urandom(len(DATA))
    liar = Liar()  # now serves DATA: same size as ``old``, another ETag
    url = await serve(aiohttp_server, liar)
    target = place / "out" / "model.bin"
    seed_half(target, old, f'"{hashlib.sha256(old).hexdigest()}"')
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        result = await client.download(ID, target)
    # One request for the whole file: the other file's bytes were neither resumed nor fetched to be thrown away.
    assert [r for m, _, r, _ in liar.seen if m == "GET"] == [f"bytes=0-{len(DATA) - 1}"]
    assert result.resumed_bytes == 0 and result.bytes_transferred == len(DATA)
    assert target.read_bytes() == DATA
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]


async def endless(request: web.Request, sent: list[int], headers: dict[str, str] | None = None) -> web.StreamResponse:
    """A chunked body that goes on until the client hangs up (or, at the latest, 512 MiB); counts into ``sent``."""
    resp = web.StreamResponse(headers=headers or {"Content-Type": "application/json"})
    await resp.prepare(request)
    block = b" " * (1 << 20)
    try:
        for _ in range(512):
            await resp.write(block)
            sent.append(len(block))
    except (ConnectionError, RuntimeError):
        pass  # the client hung up: what the test waits for
    return resp


async def test_an_endless_json_answer_is_cut_off(aiohttp_server):
    sent: list[int] = []

    async def model(request: web.Request) -> web.StreamResponse:
        return await endless(request, sent)

    app = web.Application()
    app.router.add_get("/api/v1/models/{id}", model)
    url = await serve(aiohttp_server, app)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(ProtocolError) as e:
            await client.get_model(ID)
    assert "larger than" in str(e.value)
    # The client stopped reading soon after its limit (what the sockets buffer comes on top).
    assert sum(sent) < 2 * transport.MAX_JSON


async def test_an_empty_file_with_an_endless_body_is_not_read_to_the_end(aiohttp_server, place):
    empty = hashlib.sha256(b"").hexdigest()
    liar = Liar(data=b"")
    sent: list[int] = []

    async def get(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return await liar.download(request)
        return await endless(request, sent, liar.headers)

    app = web.Application()
    app.router.add_get("/api/v1/models/{id}/download", get)
    url = await serve(aiohttp_server, app)
    async with asyncio.timeout(BOUND), AsyncModelServiceClient(url, retry=FAST) as client:
        with pytest.raises(ModelServiceError) as e:
            await client.download(ID, place / "out")
    assert e.value.code == "content_changed" and liar.headers["ETag"] == f'"{empty}"'
    # Four attempts, each hanging up after its first byte: a few MiB in socket buffers, not 4 x 512 MiB.
    assert sum(sent) < 64 * 1024 * 1024, sum(sent)
    assert not (place / "out" / "model.bin").exists()
