"""Resumable pushes through upload sessions (issue 15), from the client's side.

Two kinds of server: ``Fake`` below speaks the upload-session protocol of
SESSIONS_CONTRACT.md in-process and can be told to fail or lie in each of
its answers; the real service as a process on both backends
(tests/client_helpers.py) proves the whole thing: a ``push`` killed with
SIGKILL mid-upload and run again sends only the rest (counted by the
service's ``model_service_upload_session_bytes_total``), a service restarted
mid-push is survived, a changed file does not reuse a stale session.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from tensorfleet_client import (
    AsyncModelServiceClient,
    ChecksumMismatch,
    ModelServiceClient,
    ProtocolError,
    RetryPolicy,
    sessions,
)

BOUND = 60  # seconds any one fake-server test may take
MiB = 1024 * 1024
FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05)
ONCE = RetryPolicy(attempts=1)
MODEL_ID = "ab" * 12


def write_file(path: Path, size: int, seed: int = 1) -> str:
    """``size`` pseudo-random bytes at ``path`` (written in blocks, never held whole); their sha256 hex."""
    h = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    with open(path, "wb") as f:
        left = size
        n = 0
        while left > 0:
            piece = (n.to_bytes(8, "big") + block)[:min(left, MiB)]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
            n += 1
    return h.hexdigest()


# -- a fake service that speaks the protocol, and lies when told ------------------------------


class Fake:
    """The upload-session protocol (POST/GET/PATCH/PUT/DELETE /api/v1/uploads) and the attach route, in memory.

    ``plan`` maps a request kind ("POST", "GET", "PATCH", "PUT", "ATTACH") to a list of callables; each
    request of that kind pops the first and calls it with the request and its body: it may return a
    ``web.Response`` to send instead of the real answer, or None to answer honestly. ``log`` records
    (method, path, Content-Range) of every request.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, dict] = {}
        self.blobs: dict[str, int] = {}
        self.plan: dict[str, list] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.accepted = 0  # bytes of chunks accepted (the real service's model_service_upload_session_bytes_total)
        self.next_id = 0
        self.location_for = lambda sid: f"/api/v1/uploads/{sid}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=128 * MiB)
        app.router.add_post("/api/v1/uploads", self.post)
        app.router.add_route("*", "/api/v1/uploads/{id}", self.one)
        app.router.add_put("/api/v1/models/{id}/upload", self.attach)
        return app

    def _planned(self, kind: str, request: web.Request, body: bytes):
        steps = self.plan.get(kind)
        if steps:
            return steps.pop(0)(request, body)
        return None

    def answer(self, sid: str, status: int = 200) -> web.Response:
        s = self.sessions[sid]
        headers = {"Location": self.location_for(sid)}
        if len(s["data"]):
            headers["Range"] = f"0-{len(s['data']) - 1}"
        return web.json_response({"id": sid, "offset": len(s["data"]), "size_bytes": s["size"],
                                  "checksum": s["checksum"], "expires_at": "2030-01-01T00:00:00Z"},
                                 status=status, headers=headers)

    @staticmethod
    def error(status: int, code: str, headers: dict | None = None, **details) -> web.Response:
        return web.json_response({"error": {"code": code, "message": code.replace("_", " "), **details}},
                                 status=status, headers=headers)

    async def post(self, request: web.Request) -> web.StreamResponse:
        self.log.append(("POST", request.path, None))
        body = await request.json()
        if (planned := self._planned("POST", request, b"")) is not None:
            return planned
        checksum = body.get("checksum")
        if checksum in self.blobs:
            return web.json_response({"digest": checksum, "size_bytes": self.blobs[checksum]}, status=201)
        sid = f"{self.next_id:024x}"
        self.next_id += 1
        self.sessions[sid] = {"data": bytearray(), "size": body.get("size_bytes"), "checksum": checksum}
        return self.answer(sid, 202)

    async def one(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["id"]
        self.log.append((request.method, request.path, request.headers.get("Content-Range")))
        kind = request.method if request.method in ("GET", "PATCH", "PUT") else "OTHER"
        body = await request.read()
        if (planned := self._planned(kind, request, body)) is not None:
            return planned
        if sid not in self.sessions:
            return self.error(404, "upload_not_found")
        s = self.sessions[sid]
        if request.method == "GET":
            return self.answer(sid)
        if request.method == "DELETE":
            del self.sessions[sid]
            return web.Response(status=204)
        if body:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", request.headers.get("Content-Range", ""))
            assert m, request.headers.get("Content-Range")
            start, end = int(m[1]), int(m[2])
            if start != len(s["data"]):
                return self.error(416, "upload_offset_mismatch", {"Range": f"0-{len(s['data']) - 1}"},
                                  offset=len(s["data"]))
            assert end - start + 1 == len(body)
            digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
            assert request.headers.get("Content-Digest") == digest
            s["data"] += body
            self.accepted += len(body)
        if request.method == "PATCH":
            return self.answer(sid, 202)
        digest = request.query.get("digest")
        if digest != "sha256:" + hashlib.sha256(s["data"]).hexdigest():
            return self.error(422, "digest_mismatch")
        del self.sessions[sid]
        self.blobs[digest] = len(s["data"])
        return web.json_response({"digest": digest, "size_bytes": len(s["data"])}, status=201,
                                 headers={"Location": f"/api/v1/blobs/{digest}"})

    async def attach(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        digest = request.query.get("digest")
        if digest is None:  # the one-request upload of a small file
            self.log.append(("UPLOAD", request.path, None))
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            self.blobs[digest] = len(body)
        else:
            assert not body
            self.log.append(("ATTACH", request.path, None))
        if (planned := self._planned("ATTACH", request, body)) is not None:
            return planned
        if digest not in self.blobs:
            return self.error(422, "missing_blobs", missing=[digest])
        return web.json_response({"model_id": request.match_info["id"], "file_metadata": {
            "filename": request.query.get("filename"), "size_bytes": self.blobs[digest], "checksum": digest}})

    def patches(self) -> list[str]:
        return [rng for method, _, rng in self.log if method == "PATCH"]


async def serve(aiohttp_server, fake: Fake) -> str:
    server = await aiohttp_server(fake.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def big(tmp_path) -> tuple[Path, str]:
    """A 5 MiB + 123 byte file: six 1 MiB chunks, the last one short."""
    path = tmp_path / "model.bin"
    return path, write_file(path, 5 * MiB + 123)


def client_for(url: str, tmp_path: Path, retry: RetryPolicy = FAST, **kw) -> AsyncModelServiceClient:
    return AsyncModelServiceClient(url, retry=retry, session_threshold=MiB, chunk_size=MiB,
                                   cache_dir=tmp_path / "cache", **kw)


def states(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "cache" / "uploads"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


async def test_a_large_file_goes_in_chunks_with_their_digests_then_is_attached(aiohttp_server, tmp_path, big):
    path, sha = big
    fake = Fake()
    url = await serve(aiohttp_server, fake)
    seen = []
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        fm = await client.upload(MODEL_ID, path, progress=lambda done, total: seen.append((done, total)))
    size = path.stat().st_size
    assert fm["checksum"] == f"sha256:{sha}" and fm["filename"] == "model.bin"
    assert fake.patches() == [f"bytes {i * MiB}-{min(size, (i + 1) * MiB) - 1}/{size}" for i in range(6)]
    assert [m for m, *_ in fake.log] == ["POST"] + ["PATCH"] * 6 + ["PUT", "ATTACH"]
    assert fake.accepted == size and fake.blobs == {f"sha256:{sha}": size}
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert states(tmp_path) == []  # removed after success


async def test_a_small_file_is_one_request_as_before(aiohttp_server, tmp_path):
    path = tmp_path / "small.bin"
    sha = write_file(path, MiB)  # not over the threshold
    fake = Fake()
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        fm = await client.upload(MODEL_ID, path)
    assert fm["checksum"] == f"sha256:{sha}" and [m for m, *_ in fake.log] == ["UPLOAD"]


async def test_content_already_stored_sends_nothing(aiohttp_server, tmp_path, big):
    path, sha = big
    fake = Fake()
    fake.blobs[f"sha256:{sha}"] = path.stat().st_size
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        result = await client.upload_blob(path, sha, path.stat().st_size)
    assert result.bytes_sent == 0 and [m for m, *_ in fake.log] == ["POST"]


async def test_an_interrupted_upload_resumes_from_the_services_offset(aiohttp_server, tmp_path, big):
    path, sha = big
    size = path.stat().st_size
    fake = Fake()
    # The fourth chunk fails and the client gives up (one attempt): as if it were killed there.
    fake.plan["PATCH"] = [lambda r, b: None] * 3 + [lambda r, b: Fake.error(500, "internal_error")]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path, retry=ONCE) as client:
        with pytest.raises(Exception):
            await client.upload_blob(path, sha, size)
    [state] = states(tmp_path)
    saved = orjson.loads(state.read_bytes())
    assert saved["sha256"] == sha and saved["size"] == size and saved["session"] == f"{url}/api/v1/uploads/{0:024x}"
    assert fake.accepted == 3 * MiB
    fake.log.clear()
    seen = []
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        result = await client.upload_blob(path, sha, size, progress=lambda done, total: seen.append(done))
    assert [m for m, *_ in fake.log] == ["GET", "PATCH", "PATCH", "PATCH", "PUT"]
    assert fake.patches()[0] == f"bytes {3 * MiB}-{4 * MiB - 1}/{size}"
    assert result.resumed_bytes == 3 * MiB and result.bytes_sent == size - 3 * MiB
    assert seen[0] == 3 * MiB  # the progress bar starts where the service is
    assert fake.blobs == {f"sha256:{sha}": size} and states(tmp_path) == []


@pytest.mark.parametrize("told_by", ["body", "range-header"])
async def test_a_416_tells_the_offset_and_the_upload_continues_from_it(aiohttp_server, tmp_path, big, told_by):
    path, sha = big
    size = path.stat().st_size
    fake = Fake()
    told = []

    def ahead(request, body):
        # Another writer (a run this one does not know of) sent this very chunk first.
        data = fake.sessions[request.match_info["id"]]["data"]
        data += body
        fake.accepted += len(body)
        told.append(len(data))
        details = {"offset": len(data)} if told_by == "body" else {}
        return Fake.error(416, "upload_offset_mismatch", {"Range": f"0-{len(data) - 1}"}, **details)

    fake.plan["PATCH"] = [lambda r, b: None, ahead]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        await client.upload_blob(path, sha, size)
    ranges = fake.patches()
    # The 416 moved the client to 2 MiB: the chunk there follows at once, no GET, nothing sent twice after.
    assert told == [2 * MiB] and "GET" not in [m for m, *_ in fake.log]
    assert ranges[:3] == [f"bytes 0-{MiB - 1}/{size}", f"bytes {MiB}-{2 * MiB - 1}/{size}",
                          f"bytes {2 * MiB}-{3 * MiB - 1}/{size}"], ranges
    assert len(ranges) == 6 and fake.blobs == {f"sha256:{sha}": size} and fake.accepted == size


@pytest.mark.parametrize("status,code,asks_again", [
    (503, "unavailable", True),
    (409, "upload_busy", True),
    (500, "internal_error", True),
    (429, "too_many_requests", False),  # retried by the transport itself, as any 429
])
async def test_a_transient_failure_is_retried_after_asking_for_the_offset(aiohttp_server, tmp_path, big, status,
                                                                           code, asks_again):
    path, sha = big
    size = path.stat().st_size
    fake = Fake()
    fake.plan["PATCH"] = [lambda r, b: None, lambda r, b: Fake.error(status, code, {"Retry-After": "0"})]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        await client.upload_blob(path, sha, size)
    methods = [m for m, *_ in fake.log]
    assert fake.blobs == {f"sha256:{sha}": size} and fake.accepted == size
    assert methods.count("PATCH") == 7 and ("GET" in methods) == asks_again, methods


async def test_a_conflict_that_is_not_busy_is_not_retried(aiohttp_server, tmp_path, big):
    path, sha = big
    fake = Fake()
    fake.plan["PATCH"] = [lambda r, b: Fake.error(409, "something_else")]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        with pytest.raises(Exception, match="something else"):
            await client.upload_blob(path, sha, path.stat().st_size)
    assert [m for m, *_ in fake.log] == ["POST", "PATCH"]


async def test_a_session_the_service_forgot_is_replaced(aiohttp_server, tmp_path, big):
    path, sha = big
    size = path.stat().st_size
    fake = Fake()
    fake.plan["PATCH"] = [lambda r, b: None, lambda r, b: Fake.error(500, "internal_error")]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path, retry=ONCE) as client:
        with pytest.raises(Exception):
            await client.upload_blob(path, sha, size)
    assert len(states(tmp_path)) == 1
    fake.sessions.clear()  # expired, or the service's store was reset
    fake.log.clear()
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        result = await client.upload_blob(path, sha, size)
    assert [m for m, *_ in fake.log][:3] == ["GET", "POST", "PATCH"]
    assert result.resumed_bytes == 0 and fake.blobs == {f"sha256:{sha}": size} and states(tmp_path) == []


@pytest.mark.parametrize("change", ["content-and-mtime", "content-same-mtime"])
async def test_a_changed_file_does_not_reuse_the_stale_state(aiohttp_server, tmp_path, big, change):
    path, sha = big
    size = path.stat().st_size
    fake = Fake()
    fake.plan["PATCH"] = [lambda r, b: None] * 2 + [lambda r, b: Fake.error(500, "internal_error")]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path, retry=ONCE) as client:
        with pytest.raises(Exception):
            await client.upload_blob(path, sha, size)
    [stale] = states(tmp_path)
    st = path.stat()
    new_sha = write_file(path, size, seed=2)  # same size, other bytes
    if change == "content-same-mtime":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the sha256 in the state tells
    fake.log.clear()
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        result = await client.upload_blob(path, new_sha, size)
    assert [m for m, *_ in fake.log][0] == "POST"  # a new session, not a GET of the old one
    assert result.resumed_bytes == 0 and result.bytes_sent == size
    assert f"sha256:{new_sha}" in fake.blobs
    assert stale.exists() == (change == "content-and-mtime")  # another file's state (its key names the mtime)


# -- hostile answers -----------------------------------------------------------------------


class Elsewhere:
    """Another server: nothing may reach it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()

        async def any_(request: web.Request) -> web.Response:
            self.seen.append(f"{request.method} {request.path}")
            return web.json_response({}, status=500)

        app.router.add_route("*", "/{tail:.*}", any_)
        return app


@pytest.mark.parametrize("where", ["other-host", "other-prefix", "not-an-id", "with-query"])
async def test_a_location_elsewhere_is_refused(aiohttp_server, tmp_path, big, where):
    path, sha = big
    other = Elsewhere()
    other_url = str((await aiohttp_server(other.app())).make_url("")).rstrip("/")
    fake = Fake()
    fake.location_for = {
        "other-host": lambda sid: f"{other_url}/api/v1/uploads/{sid}",
        "other-prefix": lambda sid: f"/evil/api/v1/uploads/{sid}",
        "not-an-id": lambda sid: "/api/v1/uploads/../models",
        "with-query": lambda sid: f"/api/v1/uploads/{sid}?x=1",
    }[where]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        with pytest.raises(ProtocolError, match="Location"):
            await client.upload_blob(path, sha, path.stat().st_size)
    assert other.seen == [] and [m for m, *_ in fake.log] == ["POST"] and states(tmp_path) == []


def _answer_with(doc, status: int = 202):
    return lambda request, body: web.Response(body=doc if isinstance(doc, bytes) else orjson.dumps(doc), status=status,
                                        content_type="application/json",
                                        headers={"Location": f"/api/v1/uploads/{request.match_info['id']}"}
                                        if "id" in request.match_info else {})


@pytest.mark.parametrize("kind,lie,message", [
    ("PATCH", {"id": "x", "offset": 10 ** 12}, "not within"),
    ("PATCH", {"id": "x", "offset": -1}, "not within"),
    ("PATCH", {"id": "x", "offset": "1048576"}, "not within"),
    ("PATCH", {"id": "x", "offset": 5}, "the service says the offset is now 5"),
    ("PATCH", b"<html>gateway</html>", "not JSON"),
    ("PATCH", [1, 2], "not an object"),
    ("GET", {"id": "x", "offset": 10 ** 12}, "not within"),
    ("PUT", {"digest": "sha256:" + "0" * 64, "size_bytes": 5 * MiB + 123}, "not sha256:"),
    ("PUT", b"{", "not JSON"),
], ids=["offset-past-file", "negative", "string", "behind", "html", "list", "get-past-file", "other-digest",
        "truncated"])
async def test_a_lying_answer_is_a_clear_error(aiohttp_server, tmp_path, big, kind, lie, message):
    path, sha = big
    fake = Fake()
    status = 201 if kind == "PUT" else (200 if kind == "GET" else 202)
    if kind == "GET":
        # A GET happens after a transient failure.
        fake.plan["PATCH"] = [lambda r, b: Fake.error(503, "unavailable", {"Retry-After": "0"})]
    fake.plan[kind] = fake.plan.get(kind, []) + [_answer_with(lie, status)]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        with pytest.raises(ProtocolError, match=message):
            await client.upload_blob(path, sha, path.stat().st_size)


async def test_a_201_for_another_digest_at_post_is_refused(aiohttp_server, tmp_path, big):
    path, sha = big
    fake = Fake()
    fake.plan["POST"] = [_answer_with({"digest": "sha256:" + "1" * 64, "size_bytes": 1}, 201)]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        with pytest.raises(ProtocolError, match="not sha256:"):
            await client.push(path, name="m", algorithm="a")
    assert [m for m, *_ in fake.log] == ["POST"]  # nothing registered, nothing attached


async def test_a_final_digest_mismatch_cancels_the_session(aiohttp_server, tmp_path, big):
    path, sha = big
    fake = Fake()
    fake.plan["PUT"] = [lambda r, b: Fake.error(422, "digest_mismatch")]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        with pytest.raises(ChecksumMismatch):
            await client.upload_blob(path, sha, path.stat().st_size)
    assert [m for m, *_ in fake.log][-2:] == ["PUT", "DELETE"] and fake.sessions == {}


async def test_a_416_that_does_not_move_is_refused(aiohttp_server, tmp_path, big):
    path, sha = big
    fake = Fake()
    fake.plan["PATCH"] = [lambda r, b: Fake.error(416, "upload_offset_mismatch", offset=0)]
    url = await serve(aiohttp_server, fake)
    async with asyncio.timeout(BOUND), client_for(url, tmp_path) as client:
        with pytest.raises(ProtocolError, match="416 with offset 0"):
            await client.upload_blob(path, sha, path.stat().st_size)


# -- configuration -------------------------------------------------------------------------


def test_sizes_and_limits():
    assert sessions.parse_size("64MiB", "x") == 64 * MiB == sessions.parse_size("64M", "x")
    assert sessions.parse_size("1048576", "x") == MiB and sessions.parse_size("512k", "x") == 512 * 1024
    for bad in ("", "-1", "1.5M", "1X", "M"):
        with pytest.raises(ValueError):
            sessions.parse_size(bad, "x")
    with pytest.raises(ValueError, match="chunk_size"):
        AsyncModelServiceClient("http://127.0.0.1:9", chunk_size=MiB - 1)
    with pytest.raises(ValueError, match="chunk_size"):
        AsyncModelServiceClient("http://127.0.0.1:9", chunk_size=64 * MiB + 1)
    with pytest.raises(ValueError, match="session_threshold"):
        AsyncModelServiceClient("http://127.0.0.1:9", session_threshold=-1)


def test_the_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(sessions.THRESHOLD_ENV, "2MiB")
    assert AsyncModelServiceClient("http://127.0.0.1:9").sessions.threshold == 2 * MiB
    monkeypatch.delenv(sessions.THRESHOLD_ENV)
    assert AsyncModelServiceClient("http://127.0.0.1:9").sessions.threshold == 64 * MiB
    assert AsyncModelServiceClient("http://127.0.0.1:9", session_threshold=5).sessions.threshold == 5


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorfleet_client", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_the_cli_refuses_bad_sizes(tmp_path):
    f = tmp_path / "m.bin"
    f.write_bytes(b"x")
    proc = _cli("push", str(f), "--name", "m", "--algorithm", "a", "--url", "http://127.0.0.1:9",
                MODEL_SERVICE_SESSION_THRESHOLD="lots")
    assert proc.returncode == 2 and "MODEL_SERVICE_SESSION_THRESHOLD: not a size: 'lots'" in proc.stderr, proc.stderr
    proc = _cli("push", str(f), "--name", "m", "--algorithm", "a", "--chunk-size", "8MiB")
    assert proc.returncode == 2 and "--chunk-size: must be from 16 MiB to 64 MiB" in proc.stderr, proc.stderr
    proc = _cli("push", str(f), "--name", "m", "--algorithm", "a", "--session-threshold", "big")
    assert proc.returncode == 2 and "--session-threshold: not a size" in proc.stderr, proc.stderr
