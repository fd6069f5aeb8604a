"""Resumable upload sessions (/api/v1/uploads) through HTTP, on both backends.

In-process (the ``client`` fixture) for the protocol; a raw socket for a client
that leaves mid-chunk; live service processes (testkit.live_service) for a
restart mid-session and for a second process continuing a session.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import re
import socket
import time
from datetime import timedelta

import aiohttp
import pytest
from bson import ObjectId
from pymongo import MongoClient

from app import maintenance
from app.appkeys import SETTINGS, STORAGE
from app.server import create_app
from testkit.live_service import LiveService, service_on
from tests.api_helpers import expect_error, json_of, model_url, parse_ts, register

UPLOADS = "/api/v1/uploads"
BLOBS = "/api/v1/blobs"
KEY_A, KEY_B = "session-key-a", "session-key-b"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def chunk_headers(start: int, data: bytes, total: int | str = "*", digest: bool = True) -> dict[str, str]:
    headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
    if digest:
        headers["Content-Digest"] = content_digest(data)
    return headers


async def open_session(client, headers: dict | None = None, **body) -> dict:
    resp = await client.post(UPLOADS, json=body, headers=headers) if body else await client.post(UPLOADS,
                                                                                                  headers=headers)
    answer = await json_of(resp, 202)
    assert re.fullmatch(r"[0-9a-f]{24}", answer["id"]), answer
    assert resp.headers["Location"] == f"{UPLOADS}/{answer['id']}"
    assert "Range" not in resp.headers
    assert answer["offset"] == 0
    parse_ts(answer["expires_at"])
    return answer


async def patch(client, session_id: str, start: int, data: bytes, status: int = 202, **kw) -> dict:
    resp = await client.patch(f"{UPLOADS}/{session_id}", data=data, headers=chunk_headers(start, data, **kw))
    body = await json_of(resp, status)
    if status == 202:
        assert body["offset"] == start + len(data)
        assert resp.headers["Range"] == f"0-{start + len(data) - 1}"
        assert resp.headers["Location"] == f"{UPLOADS}/{session_id}"
    return body


async def offset_of(client, session_id: str, headers: dict | None = None) -> int:
    resp = await client.get(f"{UPLOADS}/{session_id}", headers=headers)
    body = await json_of(resp, 200)
    assert resp.headers.get("Range") == (f"0-{body['offset'] - 1}" if body["offset"] else None)
    return body["offset"]


async def metric(client) -> float:
    text = await (await client.get("/metrics")).text()
    m = re.search(r"^model_service_upload_session_bytes_total ([0-9.e+]+)$", text, re.M)
    assert m, "model_service_upload_session_bytes_total is not exported"
    return float(m[1])


def held_bytes(storage, settings, session_id: str) -> int:
    """Bytes the store holds for a session that is not completed: its file, or its chunks and tail."""
    if storage.kind == "embedded":
        path = storage.session_path(session_id)
        return path.stat().st_size if path.exists() else 0
    with MongoClient(settings.mongodb_url, serverSelectionTimeoutMS=5000) as c:
        db = c[settings.mongodb_db]
        chunks = db[f"{settings.gridfs_bucket}.chunks"].find({"files_id": ObjectId(session_id)})
        held = sum(len(d["data"]) for d in chunks)
        doc = db["upload_sessions"].find_one({"_id": ObjectId(session_id)})
        return held + (len(doc.get("tail") or b"") if doc else 0)


def lock_held(storage, settings, session_id: str) -> bool:
    """Whether a request holds the session's write lock (read from the store, without taking it)."""
    if storage.kind == "embedded":
        import sqlite3

        with sqlite3.connect(storage.db_path) as db:
            row = db.execute("SELECT lock_token FROM upload_sessions WHERE id = ?", (session_id,)).fetchone()
        return bool(row and row[0])
    with MongoClient(settings.mongodb_url, serverSelectionTimeoutMS=5000) as c:
        return c[settings.mongodb_db]["upload_session_locks"].find_one({"key": ObjectId(session_id)}) is not None


async def wait_for(condition, what: str, timeout: float = 20.0):
    """Poll an async condition until it holds (a deadline, never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def download(client, model_id: str) -> bytes:
    resp = await client.get(model_url(model_id, "/download"))
    assert resp.status == 200, await resp.text()
    return await resp.read()


# --------------------------------------------------------------------------- the protocol

async def test_chunks_complete_attach_and_download_byte_identical(client):
    data = os.urandom(700_000)
    before = await metric(client)
    session = await open_session(client, size_bytes=len(data), checksum=f"sha256:{sha(data)}")
    assert session["size_bytes"] == len(data) and session["checksum"] == f"sha256:{sha(data)}"
    sid = session["id"]
    await patch(client, sid, 0, data[:300_000], total=len(data))
    # OCI's bare range, without unit or total.
    resp = await client.patch(f"{UPLOADS}/{sid}", data=data[300_000:500_000],
                              headers={"Content-Range": "300000-499999"})
    assert (await json_of(resp, 202))["offset"] == 500_000
    assert await offset_of(client, sid) == 500_000
    head = await client.head(f"{UPLOADS}/{sid}")
    assert head.status == 200 and head.headers["Range"] == "0-499999"
    # The last chunk rides on the PUT.
    resp = await client.put(f"{UPLOADS}/{sid}", params={"digest": f"sha256:{sha(data)}"}, data=data[500_000:],
                            headers=chunk_headers(500_000, data[500_000:], total=len(data)))
    assert await json_of(resp, 201) == {"digest": f"sha256:{sha(data)}", "size_bytes": len(data)}
    assert resp.headers["Location"] == f"{BLOBS}/sha256:{sha(data)}"
    assert await metric(client) - before == len(data)
    # The session is gone; the blob is stored.
    await expect_error(await client.get(f"{UPLOADS}/{sid}"), 404, sid)
    assert (await client.head(f"{BLOBS}/sha256:{sha(data)}")).headers["Content-Length"] == str(len(data))

    model_id = (await register(client, "session-model"))["model_id"]
    resp = await client.post(model_url(model_id, "/upload"), params={"digest": f"sha256:{sha(data)}"})
    fm = (await json_of(resp, 201))["file_metadata"]
    assert fm["checksum"] == f"sha256:{sha(data)}" and fm["size_bytes"] == len(data)
    assert fm["filename"] == "session-model-v1.0" and fm["content_type"] == "application/octet-stream"
    assert await download(client, model_id) == data
    # PUT works too, with a file name; a body beside ?digest= is refused.
    resp = await client.put(model_url(model_id, "/upload"),
                            params={"digest": f"sha256:{sha(data)}", "filename": "weights.bin"})
    assert (await json_of(resp, 201))["file_metadata"]["filename"] == "weights.bin"
    err = await expect_error(await client.put(model_url(model_id, "/upload"), data=b"x",
                                              params={"digest": f"sha256:{sha(data)}"}), 400, "no body")
    assert err["code"] == "invalid_parameter"


async def test_streamed_chunks_without_content_range_append_at_the_offset(client):
    data = os.urandom(50_000)
    sid = (await open_session(client))["id"]
    for part in (data[:20_000], data[20_000:]):
        resp = await client.patch(f"{UPLOADS}/{sid}", data=part)
        await json_of(resp, 202)
    resp = await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}")
    assert (await json_of(resp, 201))["size_bytes"] == len(data)


async def test_out_of_order_chunk_is_416_with_the_offset_and_changes_nothing(client):
    data = os.urandom(4000)
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, data[:1000])
    for start in (0, 500, 2000):
        resp = await client.patch(f"{UPLOADS}/{sid}", data=data[start:start + 1000],
                                  headers=chunk_headers(start, data[start:start + 1000]))
        body = await json_of(resp, 416)
        assert body["error"]["code"] == "upload_offset_mismatch" and body["error"]["offset"] == 1000
        assert resp.headers["Range"] == "0-999"
        assert resp.headers["Location"] == f"{UPLOADS}/{sid}"
    assert await offset_of(client, sid) == 1000
    # A session with no bytes yet says so without a Range.
    other = (await open_session(client))["id"]
    resp = await client.patch(f"{UPLOADS}/{other}", data=b"abc", headers=chunk_headers(5, b"abc"))
    assert (await json_of(resp, 416))["error"]["offset"] == 0 and "Range" not in resp.headers
    await patch(client, sid, 1000, data[1000:])
    resp = await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}")
    await json_of(resp, 201)


async def test_a_chunk_whose_content_digest_lies_is_422_and_does_not_count(client):
    data = os.urandom(3000)
    before = await metric(client)
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, data[:1000])
    headers = chunk_headers(1000, data[1000:2000])
    headers["Content-Digest"] = content_digest(b"other bytes")
    err = await expect_error(await client.patch(f"{UPLOADS}/{sid}", data=data[1000:2000], headers=headers), 422)
    assert err["code"] == "digest_mismatch"
    assert await offset_of(client, sid) == 1000
    assert held_bytes(client.app[STORAGE], client.app[SETTINGS], sid) == 1000
    # Other algorithms are ignored; sha-256 beside them is checked.
    headers = chunk_headers(1000, data[1000:])
    headers["Content-Digest"] = "sha-512=:AAAA:, " + headers["Content-Digest"]
    await json_of(await client.patch(f"{UPLOADS}/{sid}", data=data[1000:], headers=headers), 202)
    assert await metric(client) - before == len(data)  # the refused chunk was not counted
    await json_of(await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}"), 201)


async def test_a_final_digest_that_lies_is_422_and_the_session_stays(client):
    data = os.urandom(5000)
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, data[:2000])
    # With a last chunk that passes its own checks: the chunk counts, the completion does not.
    resp = await client.put(f"{UPLOADS}/{sid}", params={"digest": f"sha256:{sha(b'lie')}"}, data=data[2000:],
                            headers=chunk_headers(2000, data[2000:]))
    err = await expect_error(resp, 422, "session stays")
    assert err["code"] == "digest_mismatch"
    assert await offset_of(client, sid) == 5000
    assert await client.app[STORAGE].find_blob(sha(data)) is None
    await json_of(await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}"), 201)


async def test_completion_checks_the_size_and_checksum_announced(client):
    data = os.urandom(2000)
    sid = (await open_session(client, size_bytes=3000))["id"]
    await patch(client, sid, 0, data, total=3000)
    err = await expect_error(await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}"), 422, "3000")
    assert err["code"] == "size_mismatch"
    # A chunk past the size announced, or whose total disagrees, is refused before its body counts.
    err = await expect_error(await client.patch(f"{UPLOADS}/{sid}", data=b"x" * 1001,
                                                headers=chunk_headers(2000, b"x" * 1001)), 400)
    assert err["code"] == "invalid_content_range"
    err = await expect_error(await client.patch(f"{UPLOADS}/{sid}", data=b"x",
                                                headers=chunk_headers(2000, b"x", total=2001)), 400, "3000")
    assert err["code"] == "invalid_content_range"
    assert await offset_of(client, sid) == 2000

    sid = (await open_session(client, checksum=f"sha256:{sha(b'announced')}"))["id"]
    await patch(client, sid, 0, data)
    err = await expect_error(await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}"), 422, "announced")
    assert err["code"] == "digest_mismatch"
    assert await offset_of(client, sid) == 2000


async def test_post_with_the_checksum_of_a_stored_blob_is_201_at_once(client):
    data = os.urandom(1234)
    await json_of(await client.put(f"{BLOBS}/sha256:{sha(data)}", data=data), 201)
    for body in ({"checksum": f"sha256:{sha(data)}"}, {"checksum": f"sha256:{sha(data)}", "size_bytes": 1234}):
        resp = await client.post(UPLOADS, json=body)
        assert await json_of(resp, 201) == {"digest": f"sha256:{sha(data)}", "size_bytes": 1234}
        assert resp.headers["Location"] == f"{BLOBS}/sha256:{sha(data)}"
    # Another size: not that blob, so a session opens.
    await open_session(client, checksum=f"sha256:{sha(data)}", size_bytes=99)


async def test_delete_frees_the_bytes(client):
    storage, settings = client.app[STORAGE], client.app[SETTINGS]
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, os.urandom(600_000))
    assert await asyncio.to_thread(held_bytes, storage, settings, sid) == 600_000
    resp = await client.delete(f"{UPLOADS}/{sid}")
    assert resp.status == 204
    assert await asyncio.to_thread(held_bytes, storage, settings, sid) == 0
    assert await storage.get_session(sid) is None
    await expect_error(await client.get(f"{UPLOADS}/{sid}"), 404)
    await expect_error(await client.delete(f"{UPLOADS}/{sid}"), 404)


async def test_max_file_size_applies_across_chunks(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_file_size=1000)))
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, b"a" * 600)
    # Refused from Content-Range before the body is read...
    err = await expect_error(await client.patch(f"{UPLOADS}/{sid}", data=b"b" * 600,
                                                headers=chunk_headers(600, b"b" * 600)), 413)
    assert err["code"] == "file_too_large"

    # ...and while reading a chunked body that has no length.
    async def body():
        for _ in range(6):
            yield b"c" * 100

    err = await expect_error(await client.patch(f"{UPLOADS}/{sid}", data=body()), 413)
    assert err["code"] == "file_too_large"
    assert await offset_of(client, sid) == 600
    err = await expect_error(await client.post(UPLOADS, json={"size_bytes": 1001}), 413)
    assert err["code"] == "file_too_large"
    await patch(client, sid, 600, b"d" * 400)


async def test_a_second_writer_gets_409_while_a_patch_holds_the_session(client):
    sid = (await open_session(client))["id"]
    gate = asyncio.Event()

    async def slow_body():
        yield b"x" * 1000
        await gate.wait()
        yield b"y" * 1000

    first = asyncio.ensure_future(client.patch(f"{UPLOADS}/{sid}", data=slow_body(),
                                               headers={"Content-Range": "bytes 0-1999/*"}))

    async def held():
        return await asyncio.to_thread(lock_held, client.app[STORAGE], client.app[SETTINGS], sid)

    try:
        await wait_for(held, "the first PATCH to hold the session")
        # Starts at 5, so it would be a 416 (and change nothing) if it got the lock.
        resp = await client.patch(f"{UPLOADS}/{sid}", data=b"z", headers={"Content-Range": "bytes 5-5/*"})
        err = await expect_error(resp, 409)
        assert err["code"] == "upload_busy" and resp.headers["Retry-After"] == "1"
        err = await expect_error(await client.delete(f"{UPLOADS}/{sid}"), 409)
        assert err["code"] == "upload_busy"
        err = await expect_error(await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(b'x')}"), 409)
        assert err["code"] == "upload_busy"
    finally:
        gate.set()
    assert (await json_of(await first, 202))["offset"] == 2000
    assert (await client.delete(f"{UPLOADS}/{sid}")).status == 204


async def test_a_client_cut_mid_patch_leaves_an_exact_offset_and_the_content_verifies(client):
    storage, settings = client.app[STORAGE], client.app[SETTINGS]
    # 12 MiB: half of it passes the MongoDB writer's 4 MiB batches.
    data = os.urandom(14 * 2**20)
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, data[:2**20])
    chunk = data[2**20:13 * 2**20]
    head = (f"PATCH {UPLOADS}/{sid} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(chunk)}\r\n"
            f"Content-Range: bytes {2**20}-{13 * 2**20 - 1}/*\r\n\r\n").encode()
    sock = socket.create_connection((client.server.host, client.server.port))
    try:
        # From a thread: the server runs on this event loop and must read while we send.
        await asyncio.to_thread(sock.sendall, head + chunk[:len(chunk) // 2])

        async def partial_stored():
            return await asyncio.to_thread(held_bytes, storage, settings, sid) > 2**20

        # The cut must happen with some of the chunk already in the store.
        await wait_for(partial_stored, "half the chunk to reach the store")
    finally:
        sock.close()
    assert await offset_of(client, sid) == 2**20

    async def released():
        return not await asyncio.to_thread(lock_held, storage, settings, sid)

    await wait_for(released, "the cut request to end")
    # Its bytes are gone, not merely uncounted.
    assert await offset_of(client, sid) == 2**20
    assert await asyncio.to_thread(held_bytes, storage, settings, sid) == 2**20
    await patch(client, sid, 2**20, data[2**20:2 * 2**20])
    await patch(client, sid, 2 * 2**20, data[2 * 2**20:])
    resp = await client.put(f"{UPLOADS}/{sid}?digest=sha256:{sha(data)}")
    await json_of(resp, 201)
    blob = await storage.find_blob(sha(data))
    assert b"".join([piece async for piece in storage.read_file(blob)]) == data


def _exchange(host: str, port: int, head: bytes, body: bytes | None) -> list[bytes]:
    """Send a request head with Expect: 100-continue; the body only if invited. The status lines seen."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head)
        first = sock.recv(65536)
        seen = [first.split(b"\r\n", 1)[0]]
        if first.startswith(b"HTTP/1.1 100") and body is not None:
            sock.sendall(body)
            seen.append(sock.recv(65536).split(b"\r\n", 1)[0])
        return seen


async def test_expect_100_continue_invites_the_chunk_only_once_it_would_be_accepted(client):
    sid = (await open_session(client))["id"]
    host, port = client.server.host, client.server.port

    def head(start: int) -> bytes:
        return (f"PATCH {UPLOADS}/{sid} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                f"Content-Range: bytes {start}-{start + 4}/*\r\n\r\n").encode()

    # A chunk at the wrong offset is refused before its body is sent.
    refused = await asyncio.to_thread(_exchange, host, port, head(5), b"abcde")
    assert [line[:12] for line in refused] == [b"HTTP/1.1 416"]
    accepted = await asyncio.to_thread(_exchange, host, port, head(0), b"abcde")
    assert [line[:12] for line in accepted] == [b"HTTP/1.1 100", b"HTTP/1.1 202"]
    assert await offset_of(client, sid) == 5


async def test_expired_sessions_are_404_and_gc_removes_their_bytes_but_never_a_live_ones(
        aiohttp_client, settings, capsys):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, upload_session_ttl=timedelta(seconds=1))))
    storage = client.app[STORAGE]
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, os.urandom(300_000))
    # While it lives, gc (even with --min-age 0s) leaves its bytes alone.
    await maintenance._gc(storage, timedelta(0), False, timedelta(hours=1))
    assert await asyncio.to_thread(held_bytes, storage, settings, sid) == 300_000
    assert await storage.get_session(sid) is not None

    async def expired():
        return (await client.get(f"{UPLOADS}/{sid}")).status == 404

    await wait_for(expired, "the session to expire")
    err = await expect_error(await client.patch(f"{UPLOADS}/{sid}", data=b"x", headers=chunk_headers(300_000, b"x")),
                             404, sid)
    assert err["code"] == "upload_not_found"
    capsys.readouterr()
    await maintenance._gc(storage, timedelta(hours=1), False, timedelta(seconds=1))
    assert f"removed upload session {sid} 300000 bytes" in capsys.readouterr().out
    assert await storage.get_session(sid) is None
    assert await asyncio.to_thread(held_bytes, storage, settings, sid) == 0


@pytest.fixture
async def keyed(aiohttp_client, settings):
    """Two write keys, at most 2 sessions each and 3 in all."""
    s = dataclasses.replace(settings, enable_auth=True, api_keys=f"{KEY_A}:write:a,{KEY_B}:write:b",
                            max_upload_sessions=2, max_upload_sessions_total=3)
    return await aiohttp_client(create_app(s))


async def test_session_caps_and_another_keys_session(keyed):
    a, b = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
    first = (await open_session(keyed, a))["id"]
    await open_session(keyed, a)
    resp = await keyed.post(UPLOADS, headers=a)
    err = await expect_error(resp, 429, "MAX_UPLOAD_SESSIONS")
    assert err["code"] == "too_many_upload_sessions" and int(resp.headers["Retry-After"]) > 0
    await open_session(keyed, b)
    resp = await keyed.post(UPLOADS, headers=b)
    err = await expect_error(resp, 503, "MAX_UPLOAD_SESSIONS_TOTAL")
    assert err["code"] == "upload_sessions_full" and int(resp.headers["Retry-After"]) > 0
    # Another key's session does not exist for it, whatever the method.
    resp = await keyed.patch(f"{UPLOADS}/{first}", data=b"mine", headers={**a, **chunk_headers(0, b"mine")})
    await json_of(resp, 202)
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        resp = await keyed.request(method, f"{UPLOADS}/{first}", headers=b,
                                   params={"digest": f"sha256:{sha(b'mine')}"} if method == "PUT" else None,
                                   data=b"x" if method == "PATCH" else None)
        err = await expect_error(resp, 404, first)
        assert err["code"] == "upload_not_found", method
    assert await offset_of(keyed, first, a) == 4
    # Finishing one frees a place under both caps.
    assert (await keyed.delete(f"{UPLOADS}/{first}", headers=a)).status == 204
    await open_session(keyed, b)


# --------------------------------------------------------------------------- hostile inputs

async def test_malformed_and_unknown_ids_are_404(client):
    for bad in ("x", "0" * 23, "0" * 25, "A" * 24, "g" * 24, "%00" * 8, str(ObjectId())):
        for method in ("GET", "PATCH", "DELETE"):
            resp = await client.request(method, f"{UPLOADS}/{bad}", data=b"x" if method == "PATCH" else None)
            err = await expect_error(resp, 404)
            assert err["code"] == "upload_not_found", (method, bad)
        resp = await client.put(f"{UPLOADS}/{bad}?digest=sha256:{'0' * 64}")
        assert (await expect_error(resp, 404))["code"] == "upload_not_found"


async def test_garbage_headers_and_bodies_are_400_and_change_nothing(client):
    sid = (await open_session(client))["id"]
    await patch(client, sid, 0, b"0123456789")
    url = f"{UPLOADS}/{sid}"
    for value in ("bytes=10-19/*", "bytes 10-19", "bytes 10-19/", "bytes 19-10/*", "bytes -1-8/*", "10-",
                  "-10-19", "bytes 10-19/5", "bytes 1O-19/*", "bytes 10 - 19/*", "items 10-19/*",
                  "bytes 10-99999999999999999999/*", "bytes ١٠-19/*", "", "bytes 10-19/*, bytes 20-29/*"):
        resp = await client.patch(url, data=b"x" * 10, headers={"Content-Range": value})
        err = await expect_error(resp, 400)
        assert err["code"] == "invalid_content_range", value
    # Content-Length and Content-Range disagree; an empty chunk.
    resp = await client.patch(url, data=b"x" * 9, headers={"Content-Range": "bytes 10-19/*"})
    assert (await expect_error(resp, 400))["code"] == "invalid_content_range"
    resp = await client.patch(url, data=b"", headers={"Content-Range": "bytes 10-19/*"})
    assert (await expect_error(resp, 400))["code"] == "invalid_content_range"
    assert (await expect_error(await client.patch(url, data=b""), 400))["code"] == "invalid_content_range"
    # A number that fits but is beyond MAX_FILE_SIZE is 413, from the header alone.
    huge = 999_999_999_999_999_998
    resp = await client.patch(url, data=b"x", headers={"Content-Range": f"bytes {huge}-{huge}/*"})
    assert (await expect_error(resp, 413))["code"] == "file_too_large"
    for value in ("sha-256=abc", "sha-256=:not base64!:", "sha-256=:AAAA:", "sha-256", "=:AAAA:", "sha-256=:",
                  "sha-256=:" + "A" * 44 + ":;;", "ünïcode=:AAAA:", "sha-256=(1 2)"):
        headers = {**chunk_headers(10, b"x" * 10, digest=False), "Content-Digest": value}
        resp = await client.patch(url, data=b"x" * 10, headers=headers)
        assert (await expect_error(resp, 400))["code"] == "invalid_digest", value
    for value in (None, "", "sha256:", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "md5:" + "0" * 32,
                  "sha256:" + "0" * 65):
        resp = await client.put(url, params={} if value is None else {"digest": value})
        assert (await expect_error(resp, 400))["code"] == "invalid_digest", value
    assert await offset_of(client, sid) == 10
    for body, code in (({"size_bytes": -1}, "validation_error"), ({"size_bytes": "10"}, "validation_error"),
                       ({"size_bytes": 1.5}, "validation_error"), ({"size_bytes": 10**30}, "validation_error"),
                       ({"checksum": "abc"}, "validation_error"), ({"checksum": None, "extra": 1}, "unknown_field")):
        resp = await client.post(UPLOADS, json=body)
        assert (await expect_error(resp, 400))["code"] == code, body
    for raw in (b"[]", b"{", b'"x"'):
        resp = await client.post(UPLOADS, data=raw, headers={"Content-Type": "application/json"})
        assert (await expect_error(resp, 400))["code"] == "invalid_json", raw
    assert held_bytes(client.app[STORAGE], client.app[SETTINGS], sid) == 10


# --------------------------------------------------------------------------- live processes

@pytest.fixture
def live(request, backend, tmp_path):
    with service_on(request, backend, tmp_path, "t_sessions", LOG_LEVEL="WARNING") as (service, *_):
        yield service


def _same_store(service: LiveService, log) -> LiveService:
    """Another service process on the store ``service`` uses."""
    keep = ("DATA_DIR", "MONGODB_URL", "MONGODB_DB", "MONGODB_TIMEOUT_MS")
    return LiveService({k: service._env[k] for k in keep if k in service._env}, log)


async def _live_patch(http: aiohttp.ClientSession, base: str, sid: str, start: int, data: bytes) -> int:
    async with http.patch(f"{base}{UPLOADS}/{sid}", data=data, headers=chunk_headers(start, data)) as r:
        assert r.status == 202, await r.text()
        return (await r.json())["offset"]


async def _live_finish_and_check(http: aiohttp.ClientSession, base: str, sid: str, data: bytes) -> None:
    async with http.put(f"{base}{UPLOADS}/{sid}", params={"digest": f"sha256:{sha(data)}"}) as r:
        assert r.status == 201, await r.text()
    async with http.post(f"{base}/api/v1/models", json={"name": f"live-{sid}", "algorithm": "x"}) as r:
        model_id = (await r.json())["model_id"]
    async with http.post(f"{base}/api/v1/models/{model_id}/upload", params={"digest": f"sha256:{sha(data)}"}) as r:
        assert r.status == 201, await r.text()
    async with http.get(f"{base}/api/v1/models/{model_id}/download") as r:
        assert await r.read() == data


async def test_a_session_survives_a_service_restart(live):
    data = os.urandom(3 * 2**20 + 17)
    async with aiohttp.ClientSession() as http:
        async with http.post(live.url + UPLOADS) as r:
            sid = (await r.json())["id"]
        assert await _live_patch(http, live.url, sid, 0, data[:2**20]) == 2**20
    live.stop()
    live.start()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{live.url}{UPLOADS}/{sid}") as r:
            assert (await r.json())["offset"] == 2**20
        assert await _live_patch(http, live.url, sid, 2**20, data[2**20:]) == len(data)
        await _live_finish_and_check(http, live.url, sid, data)


async def test_a_second_process_continues_a_session(live, tmp_path):
    other = _same_store(live, tmp_path / "other.log")
    await asyncio.to_thread(other.start)
    try:
        data = os.urandom(5 * 2**20 + 3)
        async with aiohttp.ClientSession() as http:
            async with http.post(live.url + UPLOADS) as r:
                sid = (await r.json())["id"]
            assert await _live_patch(http, live.url, sid, 0, data[:3 * 2**20]) == 3 * 2**20
            # The other process has no running hash: it re-reads the 3 MiB prefix.
            assert await _live_patch(http, other.url, sid, 3 * 2**20, data[3 * 2**20:4 * 2**20]) == 4 * 2**20
            # And back: the first one's hash is at an older offset, so it re-reads too.
            assert await _live_patch(http, live.url, sid, 4 * 2**20, data[4 * 2**20:]) == len(data)
            await _live_finish_and_check(http, other.url, sid, data)
    finally:
        other.stop()
