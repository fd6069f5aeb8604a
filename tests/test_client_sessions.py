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

from testkit.live_service import service_on
from tests.client_helpers import live  # noqa: F401  (a fixture)
from tests.conftest import BACKENDS

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
    # Decimal with a B, as the service's MAX_FILE_SIZE reads them.
    assert sessions.parse_size("64MB", "x") == 64 * 10**6 and sessions.parse_size("1GB", "x") == 10**9
    assert sessions.parse_size("100B", "x") == 100 and sessions.parse_size("2KiB", "x") == 2048
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


# -- against the real service -----------------------------------------------------------------

LIVE_BOUND = 180  # seconds any one process of a live test may take
CHUNK = 16 * MiB  # the CLI's smallest chunk
METRIC = "model_service_upload_session_bytes_total"


def session_bytes(url: str) -> float:
    """The service's count of upload-session bytes accepted, from GET /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = re.findall(rf"^{METRIC}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert values, f"no {METRIC} in /metrics"
    return sum(float(v) for v in values)


def wait_for(condition, what: str, timeout: float = LIVE_BOUND, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
    return value


class SlowProxy:
    """A TCP proxy to 127.0.0.1:``port`` that lets at most ``rate`` bytes/s through towards the service, so a
    push is slow enough to be killed (or its service restarted) mid-upload. The service down, it closes the
    client's connection (as a refused one looks to an HTTP client: no answer)."""

    def __init__(self, port: int, rate: float) -> None:
        self.port, self.rate = port, rate
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.listen_port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.listen_port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: float | None) -> None:
            try:
                while data := await src.read(64 * 1024):
                    dst.write(data)
                    await dst.drain()
                    if rate:
                        await asyncio.sleep(len(data) / rate)  # the throttle, not a synchronisation
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, self.rate), pipe(up_reader, writer, None))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def proxy(live):
    p = SlowProxy(live.service.port, rate=12 * MiB)
    yield p
    p.close()


def push_args(path: Path, name: str, *extra: str) -> list[str]:
    return ["push", str(path), "--name", name, "--algorithm", "xgboost", "--chunk-size", "16MiB", "--json",
            "--no-progress", *extra]


def checksum_of(url: str, model_id: str) -> str:
    with urllib.request.urlopen(f"{url}/api/v1/models/{model_id}", timeout=10) as r:
        return orjson.loads(r.read())["file_metadata"]["checksum"]


def test_a_push_killed_mid_upload_sends_only_the_rest_when_run_again(live, proxy, tmp_path):
    path = tmp_path / "model.bin"
    size = 40 * MiB + 7
    sha = write_file(path, size)
    env = {"MODEL_SERVICE_URL": proxy.url, "MODEL_SERVICE_CACHE_DIR": str(tmp_path / "cache"),
           "MODEL_SERVICE_SESSION_THRESHOLD": "1MiB"}
    name = f"killed-{os.getpid()}-{time.monotonic_ns()}"
    before = session_bytes(live.url)
    proc = live.cli_popen(*push_args(path, name), **env)
    try:
        # The first chunk is in: kill the push while the rest is on its way (12 MiB/s through the proxy).
        wait_for(lambda: session_bytes(live.url) >= before + CHUNK or proc.poll() is not None, "the first chunk")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(LIVE_BOUND)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    first = session_bytes(live.url) - before
    assert CHUNK <= first < size
    assert len(states(tmp_path)) == 1  # where the rerun finds the session
    done = live.cli(*push_args(path, name), timeout=LIVE_BOUND, **env)
    assert done.returncode == 0, done.stderr
    second = session_bytes(live.url) - before - first
    print(f"\n[{live.backend}] {size} bytes: first run {first:.0f} accepted before SIGKILL, rerun sent {second:.0f}")
    assert second < size and first + second == size  # the rerun sent exactly what the service lacked
    answer = json.loads(done.stdout)
    assert answer["checksum"] == f"sha256:{sha}" == checksum_of(live.url, answer["model_id"])
    assert answer["size"] == size and states(tmp_path) == []
    assert f"resuming model.bin: {first / 1e6:.1f} MB of {size / 1e6:.1f} MB already on the service" in done.stderr


def test_a_changed_file_is_pushed_whole_despite_a_stale_state(live, proxy, tmp_path):
    path = tmp_path / "model.bin"
    size = 40 * MiB
    write_file(path, size)
    env = {"MODEL_SERVICE_URL": proxy.url, "MODEL_SERVICE_CACHE_DIR": str(tmp_path / "cache"),
           "MODEL_SERVICE_SESSION_THRESHOLD": "1MiB"}
    name = f"changed-{os.getpid()}-{time.monotonic_ns()}"
    before = session_bytes(live.url)
    proc = live.cli_popen(*push_args(path, name), **env)
    try:
        wait_for(lambda: session_bytes(live.url) >= before + CHUNK or proc.poll() is not None, "the first chunk")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(LIVE_BOUND)
    [stale] = states(tmp_path)
    new_sha = write_file(path, size, seed=2)  # same size, other bytes, a new mtime
    at_rerun = session_bytes(live.url)
    done = live.cli(*push_args(path, name), timeout=LIVE_BOUND, **env)
    assert done.returncode == 0, done.stderr
    assert session_bytes(live.url) - at_rerun == size  # all of it, in a new session
    answer = json.loads(done.stdout)
    assert answer["checksum"] == f"sha256:{new_sha}" == checksum_of(live.url, answer["model_id"])
    assert states(tmp_path) == [stale]  # the old file's state: not used, not this push's to remove


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_service_restarted_mid_push_is_survived(request, backend, tmp_path):
    path = tmp_path / "model.bin"
    size = 56 * MiB + 3
    sha = write_file(path, size)
    (tmp_path / "svc").mkdir()
    with service_on(request, backend, tmp_path / "svc", "t_client_sessions", MAX_FILE_SIZE="1GB",
                    WORKERS="1") as (service, *_):
        p = SlowProxy(service.port, rate=12 * MiB)
        try:
            env = {**os.environ, "MODEL_SERVICE_URL": p.url, "MODEL_SERVICE_CACHE_DIR": str(tmp_path / "cache"),
                   "MODEL_SERVICE_SESSION_THRESHOLD": "1MiB"}
            proc = subprocess.Popen([sys.executable, "-m", "tensorfleet_client", *push_args(path, "restarted"),
                                     "--retries", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            try:
                wait_for(lambda: session_bytes(service.url) >= CHUNK or proc.poll() is not None, "the first chunk")
                assert proc.poll() is None
                service.stop()
                before_restart = session_bytes_or_none(service.url)
                assert before_restart is None  # really down
                accepted_before = CHUNK  # at least; the exact figure died with the process's metrics
                service.start()
                out, err = proc.communicate(timeout=LIVE_BOUND)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 0, err
            after = session_bytes(service.url)
            print(f"\n[{backend}] {size} bytes; after the restart the service accepted {after:.0f}")
            assert after <= size - accepted_before  # what was stored before the restart was not sent again
            answer = json.loads(out)
            assert answer["checksum"] == f"sha256:{sha}" == checksum_of(service.url, answer["model_id"])
        finally:
            p.close()


def session_bytes_or_none(url: str) -> float | None:
    try:
        return session_bytes(url)
    except OSError:
        return None


def test_a_snapshot_blob_over_the_threshold_goes_through_a_session(live, tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    big_sha = write_file(folder / "weights.bin", 3 * MiB + 5)
    (folder / "config.json").write_text('{"layers": 2}')
    before = session_bytes(live.url)
    seen = []
    with ModelServiceClient(live.url, session_threshold=MiB, chunk_size=MiB, cache_dir=tmp_path / "cache") as c:
        result = c.push_folder(folder, name=f"snap-{time.monotonic_ns()}", algorithm="transformer",
                               progress=lambda done, total: seen.append((done, total)))
        manifest = c.manifest(result.model_id)
    assert session_bytes(live.url) - before == 3 * MiB + 5  # the large file in a session, the small one not
    assert result.bytes_sent == 3 * MiB + 5 + len('{"layers": 2}')
    assert {f.path: f.sha256 for f in manifest.files}["weights.bin"] == big_sha
    assert seen[-1] == (3 * MiB + 5 + 13, 3 * MiB + 5 + 13) and states(tmp_path) == []


def test_the_progress_bar_starts_at_the_resumed_offset(monkeypatch):
    import io

    from tensorfleet_client import cli

    monkeypatch.setattr(cli.sys, "stderr", io.StringIO())
    bar = cli._Bar("push model.bin")
    bar(30 * MiB, 100 * MiB)  # the first report: where the service is
    bar(31 * MiB, 100 * MiB)
    shown = bar._bar.format_dict
    bar.close()
    # Resumed bytes are done already, not bytes sent now: the rate counts only the 1 MiB since.
    assert shown["initial"] == 30 * MiB and shown["n"] == 31 * MiB and shown["total"] == 100 * MiB
