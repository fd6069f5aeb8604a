"""Request-level security: keys that are not text, 100-continue before
authentication, rate limits on failures and open paths, downloads whose model
goes while they wait, weak date validators, numbers and search text the
stores cannot take, and what the open /health tells."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time

import pytest

from app import auth
from app.appkeys import DOWNLOAD_SLOTS, STORAGE
from app.config import Rate
from app.server import create_app
from testkit.live_service import LiveService
from tests.transfer_helpers import (
    MODELS,
    Part,
    content_stored,
    error_code,
    json_of,
    payload,
    post_multipart,
    register,
    sha,
    upload_ok,
)

READ, WRITE, ADMIN = "reader-key-1", "writer-key-2", "admin-key-3"
KEYS = f"{READ}:read:dashboard,{WRITE}:write:trainer,{ADMIN}:admin:ops"


def key(k: str) -> dict[str, str]:
    return {"X-API-Key": k}


async def authed_app(aiohttp_client, settings, **changes):
    s = dataclasses.replace(settings, enable_auth=True, api_keys=KEYS, **changes)
    return await aiohttp_client(create_app(s))


async def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------
# Raw HTTP over a real socket
# ---------------------------------------------------------------------------


def read_head(sock: socket.socket) -> bytes:
    """One response head (status line and headers), read off a blocking socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        piece = sock.recv(65536)
        if not piece:
            break
        buf += piece
    return buf


async def async_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


# ---------------------------------------------------------------------------
# 9. A key that is not UTF-8 is an unknown key: 401, never a 500
# ---------------------------------------------------------------------------


@pytest.fixture
def live_authed(tmp_path):
    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": "", "ENABLE_AUTH": "true",
                           "API_KEYS": KEYS}, tmp_path / "log")
    service.start()
    yield service
    service.stop()


def test_a_key_that_is_not_utf8_is_a_401(live_authed):
    for header in (b"X-API-Key: \xff", b"Authorization: Bearer \xc3\x28", b"X-API-Key: ok\xfe\xfe",
                   b"Authorization: bearer \xed\xa0\x80"):
        with socket.create_connection(("127.0.0.1", live_authed.port), timeout=10) as s:
            s.sendall(b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
            head = read_head(s)
        assert status_of(head) == 401, (header, head)
        assert b"WWW-Authenticate: Bearer" in head
    log = live_authed.log()
    assert "Traceback" not in log and "unhandled error" not in log, log
    # A key with the same bytes, configured, is found: the bytes are what is hashed.
    assert auth.identify(auth.load_keys(None, "ok\udcfe:read:odd"), "ok\udcfe").name == "odd"


# ---------------------------------------------------------------------------
# 10. Expect: 100-continue is answered only once the request is accepted
# ---------------------------------------------------------------------------


async def send_expecting(client, method: str, path: str, headers: dict[str, str], length: int):
    """Send a request head with Expect: 100-continue and no body; the streams and the first answer's head."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Expect: 100-continue", f"Content-Length: {length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer, await async_head(reader)


async def test_100_continue_comes_only_after_the_checks(aiohttp_client, settings):
    client = await authed_app(aiohttp_client, settings, max_file_size=10_000)
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a"}, headers=key(WRITE))
    model_id = (await json_of(resp, 201))["model_id"]
    upload = f"{MODELS}/{model_id}/upload"
    refused = [
        ("PUT", upload, {}, 5000, 401),                                   # no key
        ("PUT", upload, key("wrong"), 5000, 401),                         # unknown key
        ("PUT", upload, key(READ), 5000, 403),                            # scope too small
        ("PUT", f"{MODELS}/{'0' * 24}/upload", key(WRITE), 5000, 404),    # no such model
        ("PUT", upload, key(WRITE), 20_000, 413),                         # larger than MAX_FILE_SIZE
        ("POST", MODELS, {"Content-Type": "application/json"}, 50, 401),  # JSON routes too
        ("PUT", f"{MODELS}/{model_id}", {"Content-Type": "application/json"}, 50, 401),
        ("POST", f"{MODELS}/{model_id}/versions", {"Content-Type": "application/json"}, 50, 401),
        ("POST", f"{MODELS}/batch", key(WRITE), 50, 403),
    ]
    for method, path, headers, length, status in refused:
        reader, writer, head = await send_expecting(client, method, path, headers, length)
        writer.close()
        assert status_of(head) == status, (method, path, headers, head)
        # The body was never asked for, so the connection cannot be reused.
        assert b"Connection: close" in head, head

    data = payload(5000)
    reader, writer, head = await send_expecting(client, "PUT", upload, key(WRITE), len(data))
    assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(data)
    head = await async_head(reader)
    writer.close()
    assert status_of(head) == 201, head
    assert await (await client.get(f"{MODELS}/{model_id}/download", headers=key(READ))).read() == data

    body = b'{"name": "n", "algorithm": "a"}'
    reader, writer, head = await send_expecting(client, "POST", MODELS, {**key(WRITE),
                                                "Content-Type": "application/json"}, len(body))
    assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    head = await async_head(reader)
    writer.close()
    assert status_of(head) == 201, head


async def test_an_unknown_expectation_is_417(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n")
    head = await async_head(reader)
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                 .split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    writer.close()
    assert status_of(head) == 417 and b"Connection: close" in head
    assert b'"code":"expectation_failed"' in body


# ---------------------------------------------------------------------------
# 11. Failed authentications and open paths are rate limited too
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["embedded"])
async def test_failed_keys_and_metrics_are_counted_per_address(aiohttp_client, settings):
    client = await authed_app(aiohttp_client, settings, rate_limit=Rate(5, 60))
    statuses = [(await client.get(MODELS, headers=key(f"guess-{i}"))).status for i in range(20)]
    assert statuses == [401] * 5 + [429] * 15
    resp = await client.get(MODELS, headers=key("guess-21"))
    assert await error_code(resp, 429) == "rate_limited" and int(resp.headers["Retry-After"]) >= 1
    # The address's tokens are gone, also for /metrics and /health/detailed ...
    assert (await client.get("/metrics")).status == 429
    assert (await client.get("/health/detailed")).status == 429
    # ... but not a valid key's, counted under its own name, nor /health's.
    assert (await client.get(MODELS, headers=key(READ))).status == 200
    assert [(await client.get("/health")).status for _ in range(20)] == [200] * 20


@pytest.mark.parametrize("backend", ["embedded"])
async def test_metrics_is_rate_limited(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, rate_limit=Rate(5, 60))))
    statuses = [(await client.get("/metrics")).status for _ in range(20)]
    assert statuses == [200] * 5 + [429] * 15
    assert [(await client.get("/health")).status for _ in range(20)] == [200] * 20


@pytest.mark.parametrize("backend", ["embedded"])
async def test_head_is_not_a_download_for_the_download_rate_limit(aiohttp_client, settings):
    """HEAD moves no file bytes, and every client pull starts with one: only GETs use DOWNLOAD_RATE_LIMIT."""
    client = await aiohttp_client(create_app(dataclasses.replace(settings, download_rate_limit=Rate(1, 60))))
    model_id = await register(client)
    await upload_ok(client, model_id, payload(1000))
    url = f"{MODELS}/{model_id}/download"
    assert [(await client.head(url)).status for _ in range(5)] == [200] * 5
    assert (await client.get(url)).status == 200
    assert (await client.get(url)).status == 429
    assert (await client.head(url)).status == 200


# ---------------------------------------------------------------------------
# 12. A download queued for a slot keeps the file it looked up
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["delete", "replace"])
async def test_a_download_queued_while_its_model_goes_sends_the_whole_file(aiohttp_client, settings, change):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_concurrent_downloads=1,
                                                                 download_queue_seconds=30)))
    storage, slots = client.app[STORAGE], client.app[DOWNLOAD_SLOTS]
    model_id = await register(client)
    data = payload(2_000_000)
    fm = await upload_ok(client, model_id, data)

    async with slots.slot():  # the only slot is busy
        queued = asyncio.create_task(client.get(f"{MODELS}/{model_id}/download"))
        await wait_for(lambda: slots.waiting == 1, "the download to queue")
        if change == "delete":
            assert (await client.delete(f"{MODELS}/{model_id}")).status == 200
        else:
            await upload_ok(client, model_id, payload(1000))
        assert await content_stored(storage, fm["file_id"], sha(data))  # leased by the queued download
    resp = await asyncio.wait_for(queued, 30)
    assert resp.status == 200
    assert resp.headers["ETag"] == f'"{sha(data)}"'
    assert await resp.read() == data
    # Released once the download is done.
    deadline = time.monotonic() + 15
    while await content_stored(storage, fm["file_id"], sha(data)):
        assert time.monotonic() < deadline, "the old file was never released"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------
# 13. If-Range with a date that names two contents
# ---------------------------------------------------------------------------


async def two_uploads_in_one_second(client, model_id: str) -> tuple[str, bytes]:
    """Upload twice within one second (retrying until the clock allows); the first Last-Modified and the new data."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await upload_ok(client, model_id, payload(1000))
        first = (await client.head(f"{MODELS}/{model_id}/download")).headers["Last-Modified"]
        new = payload(1000)
        await upload_ok(client, model_id, new)
        if (await client.head(f"{MODELS}/{model_id}/download")).headers["Last-Modified"] == first:
            return first, new
    raise AssertionError("could not upload twice within one second")


async def test_if_range_date_after_a_replacement_in_the_same_second_sends_everything(client):
    model_id = await register(client)
    last_modified, new = await two_uploads_in_one_second(client, model_id)
    url = f"{MODELS}/{model_id}/download"
    resp = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": last_modified})
    assert resp.status == 200 and "Content-Range" not in resp.headers
    assert await resp.read() == new
    # The ETag still names one content exactly.
    resp = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": f'"{sha(new)}"'})
    assert resp.status == 206 and await resp.read() == new[10:20]
    # The bookkeeping is not part of the API's file_metadata.
    doc = await json_of(await client.get(f"{MODELS}/{model_id}"), 200)
    assert "last_modified_shared" not in doc["file_metadata"]

    # A model's first file has nothing to share its date with: a strong validator.
    other = await register(client)
    data = payload(1000)
    await upload_ok(client, other, data)
    lm = (await client.head(f"{MODELS}/{other}/download")).headers["Last-Modified"]
    resp = await client.get(f"{MODELS}/{other}/download", headers={"Range": "bytes=10-19", "If-Range": lm})
    assert resp.status == 206 and await resp.read() == data[10:20]


async def test_if_range_date_after_racing_uploads_in_one_second_sends_everything(client):
    """Two uploads racing to a new model: the one that lands second replaced the other's content within its
    second, whichever order their reads came in (the mark is decided inside the swap, not before it)."""
    raced = 0
    deadline = time.monotonic() + 60
    while raced < 10 and time.monotonic() < deadline:
        model_id = await register(client)
        started = time.time()
        await asyncio.gather(*(upload_ok(client, model_id, payload(1000)) for _ in range(2)))
        if int(time.time()) != int(started):
            continue  # a second boundary may have fallen between the two: nothing shared then
        url = f"{MODELS}/{model_id}/download"
        head = await client.head(url)
        raced += 1
        resp = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": head.headers["Last-Modified"]})
        assert resp.status == 200 and "Content-Range" not in resp.headers, model_id
    assert raced == 10


async def test_if_range_date_by_name_when_a_new_version_came_in_the_same_second(client):
    name = "same_second"
    url = f"{MODELS}/by-name/{name}/download"
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "could not register two versions within one second"
        first = await register(client, name=name)
        await upload_ok(client, first, payload(1000))
        last_modified = (await client.head(url)).headers["Last-Modified"]
        second = await register(client, name=name)
        new = payload(1000)
        await upload_ok(client, second, new)
        if (await client.head(url)).headers["Last-Modified"] == last_modified:
            break
    resp = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": last_modified})
    assert resp.status == 200 and await resp.read() == new
    # A pinned version names one model: its date is strong.
    pinned = await client.get(url, params={"version": (await json_of(await client.get(f"{MODELS}/{second}"), 200))
                                           ["version"]}, headers={"Range": "bytes=10-19", "If-Range": last_modified})
    assert pinned.status == 206 and await pinned.read() == new[10:20]


# ---------------------------------------------------------------------------
# 16. Integers BSON cannot hold: 400 on both backends
# ---------------------------------------------------------------------------

TOO_BIG = [2**63, 2**64 - 1]


@pytest.mark.parametrize("value", TOO_BIG)
async def test_integers_beyond_64_bits_are_refused(client, value):
    bodies = [
        {"hyperparameters": {"n": value}},
        {"metrics": {"accuracy": value}},
        {"dataset_info": {"rows": value}},
        {"hyperparameters": {"layers": [{"units": [1, 2, value]}]}},
    ]
    for extra in bodies:
        resp = await client.post(MODELS, json={"name": "big", "algorithm": "a", **extra})
        assert await error_code(resp, 400) == "validation_error", extra
    model_id = await register(client)
    for extra in bodies:
        resp = await client.put(f"{MODELS}/{model_id}", json=extra)
        assert await error_code(resp, 400) == "validation_error", extra
        resp = await client.post(f"{MODELS}/{model_id}/versions", json=extra)
        assert await error_code(resp, 400) == "validation_error", extra
    resp = await post_multipart(client, MODELS, [
        Part("metadata", b'{"name": "big", "algorithm": "a", "hyperparameters": {"n": %d}}' % value),
        Part("file", b"x" * 100, filename="m.bin")])
    assert await error_code(resp, 400) == "validation_error"
    # The batch endpoint takes ids, not numbers: a huge one is just an invalid id.
    resp = await client.post(f"{MODELS}/batch", json={"operation": "add_tags", "ids": [value], "tags": ["t"]})
    assert (await json_of(resp, 200))["results"] == [{"id": str(value), "result": "invalid_id"}]
    listed = await json_of(await client.get(MODELS), 200)
    assert listed["pagination"]["total"] == 1  # only the model registered above


async def test_the_64_bit_extremes_are_kept_exactly(client):
    extremes = {"max": 2**63 - 1, "min": -(2**63), "nested": [{"v": 2**63 - 1}]}
    model_id = await register(client, hyperparameters=extremes, metrics={"big": 2**63 - 1})
    doc = await json_of(await client.get(f"{MODELS}/{model_id}"), 200)
    assert doc["hyperparameters"] == extremes and doc["metrics"] == {"big": 2**63 - 1}


# ---------------------------------------------------------------------------
# 17. Search text with a NUL: 400 on both backends
# ---------------------------------------------------------------------------


async def test_q_with_a_nul_is_refused(client):
    await register(client, name="a_b")
    for q in ("\x00", "a\x00b", "a_b\x00"):
        resp = await client.get(MODELS, params={"q": q})
        assert await error_code(resp, 400) == "invalid_parameter", q
        resp = await client.get(f"{MODELS}/search", params={"q": q})
        assert await error_code(resp, 400) == "invalid_parameter", q
    # Other control characters are searched for, alike on both backends.
    assert (await json_of(await client.get(MODELS, params={"q": "a\tb"}), 200))["pagination"]["total"] == 0
    assert (await json_of(await client.get(MODELS, params={"q": "a_b"}), 200))["pagination"]["total"] == 1


# ---------------------------------------------------------------------------
# 18. The open /health says "unhealthy", not why
# ---------------------------------------------------------------------------


async def test_open_health_does_not_tell_the_storage_error(aiohttp_client, settings, backend, request, caplog):
    client = await authed_app(aiohttp_client, settings)
    if backend == "mongodb":
        mongo = request.getfixturevalue("mongo")
        if mongo.server is None:
            pytest.skip("needs the repo's own test server to stop (MONGODB_URL is set)")
        request.addfinalizer(mongo.server.start)
        mongo.server.stop()
        secret = mongo.url.split("//", 1)[1].split("/", 1)[0]  # host:port
    else:
        await client.app[STORAGE].close()
        secret = "embedded storage is closed"

    with caplog.at_level(logging.WARNING, logger="app.health"):
        resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "unhealthy"
    assert "error" not in body and secret not in await resp.text()
    assert any(secret in r.getMessage() for r in caplog.records if r.name == "app.health")

    # The reason is for those with a key.
    assert (await client.get("/health/detailed")).status == 401
    resp = await client.get("/health/detailed", headers=key(READ))
    assert resp.status == 503
    assert (await resp.json())["checks"]["storage"] != "healthy"


async def test_a_value_the_store_cannot_hold_is_a_400_not_a_500(client, backend):
    """A list directly inside a list: MongoDB and the embedded store keep it; FerretDB refuses it.

    Either it is stored and reads back exactly, or it is a 400 saying the store
    cannot hold it, with nothing stored; never a 500.
    """
    nested = {"kernel": [[1, 0], [0, 1]]}
    model_id = await register(client)
    answers = [
        await client.post(MODELS, json={"name": "nested", "algorithm": "a", "hyperparameters": nested}),
        await client.put(f"{MODELS}/{model_id}", json={"hyperparameters": nested}),
        await client.post(f"{MODELS}/{model_id}/versions", json={"hyperparameters": nested}),
    ]
    statuses = {resp.status for resp in answers}
    if backend == "embedded":
        assert statuses <= {200, 201}, statuses
    assert statuses <= {200, 201} or statuses == {400}, statuses
    for resp in answers:
        body = await resp.json()
        if resp.status == 400:
            assert body["error"]["code"] == "validation_error"
            assert "cannot hold this value" in body["error"]["message"], body
    listed = await json_of(await client.get(MODELS), 200)
    if statuses == {400}:
        assert listed["pagination"]["total"] == 1  # only the model registered above, unchanged
        assert (await json_of(await client.get(f"{MODELS}/{model_id}"), 200))["hyperparameters"] != nested
    else:
        assert all(m["id"] for m in listed["models"])
        doc = await json_of(await client.get(f"{MODELS}/{model_id}"), 200)
        assert doc["hyperparameters"] == nested
