"""HTTP contract of model file transfers: upload, download, ranges, conditionals, info.

Every test runs against the real app on both storage backends (the ``client``
fixture is parametrized over "embedded" and "mongodb"). Files are compared
byte for byte and by sha256; failures are shown to leave nothing behind by
counting what the store holds (GridFS documents and chunks, or temp files and
blobs) before and after.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import math
import re
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import unquote

import aiohttp
import pytest
from bson import ObjectId

from app.appkeys import STORAGE
from app.http import sendfile
from app.server import create_app
from app.storage import pipeline
from tests.transfer_helpers import (
    CS,
    FILE_METADATA_FIELDS,
    HEX24,
    MODELS,
    TIMEOUT,
    Part,
    check_ranges_response,
    check_upload_answer,
    content_stored,
    download_count,
    error_code,
    get_model,
    json_of,
    leftovers,
    parse_byteranges,
    payload,
    post_multipart,
    register,
    sha,
    upload_ok,
    upload_raw,
)

SIZES = [0, 1, CS - 1, CS, CS + 1, 3 * CS + 17]
# The file the range and conditional tests read: three whole chunks and a bit.
SIZE = 3 * CS + 17
LAST = SIZE - 1
# MAX_FILE_SIZE of the apps the size-limit tests build: over 1 MiB, so a refused
# body has reached the embedded backend's temp file before it is refused.
LIMIT = 6 * CS + 1000
# Failing uploads send this much, for the same reason.
FAILING = 2_000_000


def dl(model_id: str) -> str:
    return f"{MODELS}/{model_id}/download"


async def storage_of(client):
    return client.app[STORAGE]


async def gridfs_bytes(storage, file_id: str) -> bytes:
    """Read a file with PyMongo's own GridFS implementation, not the app's reader."""
    from gridfs import AsyncGridFSBucket

    bucket = AsyncGridFSBucket(storage.db, bucket_name="models")
    stream = await bucket.open_download_stream(ObjectId(file_id))
    return await stream.read()


async def total_models(client) -> int:
    return (await json_of(await client.get(MODELS, params={"limit": "1"}), 200))["pagination"]["total"]


async def model_with_file(client, size: int = SIZE, filename: str = "model.pkl", **fields):
    """A registered model with a random file uploaded; returns (id, data, file_metadata)."""
    model_id = await register(client, **fields)
    data = payload(size)
    fm = await upload_ok(client, model_id, data, filename=filename)
    return model_id, data, fm


async def get_full(client, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    resp = await client.request(method, path, headers=headers or {}, timeout=TIMEOUT)
    body = await resp.read()
    return resp, body


async def assert_download(client, model_id: str, data: bytes) -> None:
    resp, body = await get_full(client, dl(model_id))
    assert resp.status == 200, body[:300]
    assert int(resp.headers["Content-Length"]) == len(data)
    assert len(body) == len(data) and sha(body) == sha(data)
    assert body == data


def http_date(t: datetime) -> str:
    return format_datetime(t.astimezone(timezone.utc), usegmt=True)


async def chunked(data: bytes, piece: int):
    """An async generator body: aiohttp sends it with Transfer-Encoding: chunked."""
    for i in range(0, len(data), piece):
        await asyncio.sleep(0)
        yield data[i:i + piece]


@pytest.fixture
async def limited(aiohttp_client, settings):
    """A client of an app whose MAX_FILE_SIZE is LIMIT bytes (same backend and store as ``settings``)."""
    return await aiohttp_client(create_app(dataclasses.replace(settings, max_file_size=LIMIT)))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


async def test_empty_bodies_one_after_another_are_each_stored(client):
    """aiohttp gives every empty body the same reader object, with state left by the
    previous one: reading an empty body must end however often it happens."""
    for _ in range(3):
        model_id = await register(client)
        resp = await asyncio.wait_for(upload_raw(client, model_id, b""), 10)
        check_upload_answer(await json_of(resp, 201), model_id, b"")


@pytest.mark.parametrize("size", SIZES)
async def test_raw_upload_round_trip_is_byte_exact(client, size):
    storage = await storage_of(client)
    model_id = await register(client)
    data = payload(size)
    resp = await upload_raw(client, model_id, data, filename="weights.bin")
    fm = check_upload_answer(await json_of(resp, 201), model_id, data)
    assert fm["filename"] == "weights.bin"
    assert fm["content_type"] == "application/octet-stream"
    await assert_download(client, model_id, data)
    if storage.kind == "mongodb":
        assert await gridfs_bytes(storage, fm["file_id"]) == data
        files_doc = await storage.files.find_one({"_id": ObjectId(fm["file_id"])})
        assert files_doc["length"] == size and files_doc["chunkSize"] == CS
        n = await storage.chunks.count_documents({"files_id": ObjectId(fm["file_id"])})
        assert n == math.ceil(size / CS)
    else:
        assert storage.blob_path(sha(data)).read_bytes() == data
        assert (await leftovers(storage))["tmp"] == []


@pytest.mark.parametrize("size", SIZES)
async def test_multipart_upload_round_trip_is_byte_exact(client, size):
    storage = await storage_of(client)
    model_id = await register(client)
    data = payload(size)
    resp = await post_multipart(client, f"{MODELS}/{model_id}/upload",
                                [Part("file", data, "weights.pkl", "application/octet-stream")])
    fm = check_upload_answer(await json_of(resp, 201), model_id, data)
    assert fm["filename"] == "weights.pkl"
    await assert_download(client, model_id, data)
    if storage.kind == "mongodb":
        assert await gridfs_bytes(storage, fm["file_id"]) == data


async def test_multipart_upload_skips_other_fields_before_the_file(client):
    model_id = await register(client)
    data = payload(CS + 5)
    resp = await post_multipart(client, f"{MODELS}/{model_id}/upload",
                                [Part("comment", b"not the file"), Part("file", data, "m.onnx")])
    fm = check_upload_answer(await json_of(resp, 201), model_id, data)
    assert fm["filename"] == "m.onnx"
    await assert_download(client, model_id, data)


async def test_put_upload_with_aiohttp_formdata(client):
    model_id = await register(client)
    data = payload(2 * CS + 3)
    form = aiohttp.FormData()
    form.add_field("file", data, filename="clf.joblib", content_type="application/octet-stream")
    resp = await client.put(f"{MODELS}/{model_id}/upload", data=form)
    fm = check_upload_answer(await json_of(resp, 201), model_id, data)
    assert fm["filename"] == "clf.joblib"
    await assert_download(client, model_id, data)


@pytest.mark.parametrize("size", [0, CS - 1, CS, 2 * CS + 1])
async def test_put_raw_upload_round_trip(client, size):
    model_id = await register(client)
    data = payload(size)
    fm = await upload_ok(client, model_id, data, filename="put.bin", method="PUT")
    assert fm["filename"] == "put.bin"
    await assert_download(client, model_id, data)


@pytest.mark.parametrize("piece", [1000, CS, CS + 7])
async def test_chunked_raw_upload_round_trip(client, piece):
    model_id = await register(client)
    data = payload(2 * CS + 11)
    resp = await upload_raw(client, model_id, chunked(data, piece), filename="streamed.bin")
    fm = check_upload_answer(await json_of(resp, 201), model_id, data)
    assert fm["size_bytes"] == len(data)
    await assert_download(client, model_id, data)


async def test_filename_from_content_disposition_request_header(client):
    model_id = await register(client)
    data = payload(100)
    fm = await upload_ok(client, model_id, data, filename=None,
                         headers={"Content-Disposition": 'attachment; filename="from-header.pt"'})
    assert fm["filename"] == "from-header.pt"
    resp, _ = await get_full(client, dl(model_id))
    assert resp.headers["Content-Disposition"] == 'attachment; filename="from-header.pt"'


async def test_non_ascii_filename_from_content_disposition_request_header(client):
    model_id = await register(client)
    data = payload(100)
    fm = await upload_ok(client, model_id, data, filename=None,
                         headers={"Content-Disposition": "attachment; filename*=UTF-8''mod%C3%A8le.pt"})
    assert fm["filename"] == "modèle.pt"


@pytest.mark.parametrize("backend", ["mongodb"])
async def test_uploaded_file_is_readable_by_pymongo_gridfs(client):
    storage = await storage_of(client)
    assert storage.kind == "mongodb"
    data = payload(3 * CS + 1)
    model_id = await register(client)
    fm = await upload_ok(client, model_id, data)
    assert await gridfs_bytes(storage, fm["file_id"]) == data
    # The same through a multipart registration.
    body = await json_of(await post_multipart(client, MODELS, [
        Part("metadata", b'{"name": "gridfs_reg", "algorithm": "svm"}', content_type="application/json"),
        Part("file", data[::-1], "r.bin")]), 201)
    fm2 = (await get_model(client, body["model_id"]))["file_metadata"]
    assert await gridfs_bytes(storage, fm2["file_id"]) == data[::-1]


# ---------------------------------------------------------------------------
# Client checksums
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "query", "header-uppercase"])
async def test_matching_checksum_is_accepted(client, where):
    model_id = await register(client)
    data = payload(CS + 1)
    kw = {
        "header": {"headers": {"X-Checksum-Sha256": sha(data)}},
        "header-uppercase": {"headers": {"X-Checksum-Sha256": sha(data).upper()}},
        "query": {"params": {"sha256": sha(data)}},
    }[where]
    fm = await upload_ok(client, model_id, data, **kw)
    assert fm["checksum"] == "sha256:" + sha(data)


@pytest.mark.parametrize("form", ["raw-header", "raw-query", "multipart-header", "chunked-header"])
async def test_checksum_mismatch_is_422_and_leaves_nothing(client, form):
    storage = await storage_of(client)
    model_id = await register(client)
    before_model = await get_model(client, model_id)
    before = await leftovers(storage)
    data = payload(FAILING)
    wrong = sha(data + b"x")
    if form == "raw-header":
        resp = await upload_raw(client, model_id, data, headers={"X-Checksum-Sha256": wrong})
    elif form == "raw-query":
        resp = await upload_raw(client, model_id, data, params={"sha256": wrong})
    elif form == "chunked-header":
        resp = await upload_raw(client, model_id, chunked(data, 50_000), headers={"X-Checksum-Sha256": wrong})
    else:
        resp = await post_multipart(client, f"{MODELS}/{model_id}/upload", [Part("file", data, "m.bin")],
                                    headers={"X-Checksum-Sha256": wrong})
    await error_code(resp, 422)
    assert await leftovers(storage) == before
    assert await get_model(client, model_id) == before_model


@pytest.mark.parametrize("value", ["abc", "g" * 64, "a" * 63, "a" * 65, "sha1:" + "a" * 40, "-"])
@pytest.mark.parametrize("where", ["header", "query"])
async def test_malformed_checksum_is_400_and_leaves_nothing(client, value, where):
    storage = await storage_of(client)
    model_id = await register(client)
    before_model = await get_model(client, model_id)
    before = await leftovers(storage)
    kw = {"headers": {"X-Checksum-Sha256": value}} if where == "header" else {"params": {"sha256": value}}
    resp = await upload_raw(client, model_id, payload(CS + 3), **kw)
    await error_code(resp, 400)
    assert await leftovers(storage) == before
    assert await get_model(client, model_id) == before_model


# ---------------------------------------------------------------------------
# MAX_FILE_SIZE
# ---------------------------------------------------------------------------


async def _refused_413(limited, send) -> None:
    """Run ``send(model_id)``; it must answer 413 and change nothing."""
    storage = limited.app[STORAGE]
    model_id = await register(limited)
    before_model = await get_model(limited, model_id)
    before = await leftovers(storage)
    resp = await send(model_id)
    await error_code(resp, 413)
    assert await leftovers(storage) == before
    assert await get_model(limited, model_id) == before_model


async def test_file_of_exactly_max_file_size_is_accepted(limited):
    for send_as in ("raw", "chunked", "multipart"):
        model_id = await register(limited)
        data = payload(LIMIT)
        if send_as == "raw":
            resp = await upload_raw(limited, model_id, data)
        elif send_as == "chunked":
            resp = await upload_raw(limited, model_id, chunked(data, 10_000))
        else:
            resp = await post_multipart(limited, f"{MODELS}/{model_id}/upload", [Part("file", data, "m.bin")])
        check_upload_answer(await json_of(resp, 201), model_id, data)
        await assert_download(limited, model_id, data)


async def test_declared_content_length_over_limit_is_413(limited):
    await _refused_413(limited, lambda mid: upload_raw(limited, mid, payload(LIMIT + 1)))


async def test_chunked_body_over_limit_is_413(limited):
    await _refused_413(limited, lambda mid: upload_raw(limited, mid, chunked(payload(LIMIT + 300_000), 20_000)))


async def test_chunked_body_one_byte_over_limit_is_413(limited):
    await _refused_413(limited, lambda mid: upload_raw(limited, mid, chunked(payload(LIMIT + 1), 4096)))


async def test_multipart_file_over_limit_is_413(limited):
    await _refused_413(limited, lambda mid: post_multipart(
        limited, f"{MODELS}/{mid}/upload", [Part("file", payload(LIMIT + 1), "big.bin")]))


async def test_content_length_over_limit_is_refused_before_the_body_is_read(limited):
    """The limit is checked up front: the answer comes although the body never arrives."""
    release = asyncio.Event()

    async def stalled():
        yield b"x" * 100
        await release.wait()  # the rest of the declared body is never sent

    async def send(mid):
        return await asyncio.wait_for(
            upload_raw(limited, mid, stalled(), headers={"Content-Length": str(LIMIT * 1000)}), timeout=10)

    try:
        await _refused_413(limited, send)
    finally:
        release.set()


async def test_registration_with_file_over_limit_is_413_and_registers_nothing(limited):
    storage = limited.app[STORAGE]
    before = await leftovers(storage)
    resp = await post_multipart(limited, MODELS, [
        Part("metadata", b'{"name": "too_big", "algorithm": "svm"}', content_type="application/json"),
        Part("file", payload(LIMIT + 1), "big.bin")])
    await error_code(resp, 413)
    assert await total_models(limited) == 0
    assert await leftovers(storage) == before


async def test_failed_replacement_keeps_the_previous_file(limited):
    """A too-large or mismatching upload to a model with a file leaves the old file in place."""
    storage = limited.app[STORAGE]
    model_id = await register(limited)
    old = payload(CS + 2)
    await upload_ok(limited, model_id, old)
    before_model = await get_model(limited, model_id)
    before = await leftovers(storage)
    attempts = [
        lambda: upload_raw(limited, model_id, payload(LIMIT + 1)),
        lambda: upload_raw(limited, model_id, chunked(payload(LIMIT + 5000), 8192)),
        lambda: upload_raw(limited, model_id, payload(100), headers={"X-Checksum-Sha256": "0" * 64}),
    ]
    for attempt, status in zip(attempts, (413, 413, 422)):
        await error_code(await attempt(), status)
        assert await leftovers(storage) == before
        assert await get_model(limited, model_id) == before_model
    await assert_download(limited, model_id, old)


async def test_abandoned_upload_leaves_nothing(client):
    """A client that goes away mid-body is a failure too: nothing stays behind."""
    storage = await storage_of(client)
    model_id = await register(client)
    before_model = await get_model(client, model_id)
    before = await leftovers(storage)
    sent, never = asyncio.Event(), asyncio.Event()

    async def body():
        # More than a batch: the writer keeps up to one in memory before its threads store it.
        for _ in range(pipeline.BATCH // 100_000 + 5):
            yield payload(100_000)
        sent.set()
        await never.wait()

    task = asyncio.create_task(upload_raw(client, model_id, body()))
    await asyncio.wait_for(sent.wait(), 10)
    if storage.kind == "embedded":
        # The partial upload is on disk now, so the check below is not vacuous.
        for _ in range(500):
            if (await leftovers(storage))["tmp"]:
                break
            await asyncio.sleep(0.01)
        assert (await leftovers(storage))["tmp"], "the upload never reached the temp directory"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if await leftovers(storage) == before:
            break
        await asyncio.sleep(0.01)
    assert await leftovers(storage) == before
    assert await get_model(client, model_id) == before_model


async def test_model_deleted_during_its_upload_is_404_and_leaves_nothing(client):
    storage = await storage_of(client)
    model_id = await register(client)
    before = await leftovers(storage)
    sent, go_on = asyncio.Event(), asyncio.Event()

    async def body():
        yield payload(CS + 1)
        sent.set()
        await go_on.wait()
        yield payload(CS)

    task = asyncio.create_task(upload_raw(client, model_id, body()))
    await asyncio.wait_for(sent.wait(), 10)
    await json_of(await client.delete(f"{MODELS}/{model_id}"), 200)
    go_on.set()
    resp = await asyncio.wait_for(task, 30)
    await error_code(resp, 404)
    assert await leftovers(storage) == before
    assert await total_models(client) == 0


# ---------------------------------------------------------------------------
# Replacing, sharing and releasing content
# ---------------------------------------------------------------------------


async def test_upload_replaces_the_file_and_removes_the_old_content(client):
    storage = await storage_of(client)
    model_id = await register(client)
    old, new = payload(2 * CS + 1), payload(CS + 77)
    fm_old = await upload_ok(client, model_id, old, filename="old.bin")
    resp, _ = await get_full(client, dl(model_id))
    old_etag = resp.headers["ETag"]
    fm_new = await upload_ok(client, model_id, new, filename="new.bin")
    assert fm_new["file_id"] != fm_old["file_id"]
    await assert_download(client, model_id, new)
    resp, _ = await get_full(client, dl(model_id))
    assert resp.headers["ETag"] != old_etag
    assert resp.headers["Content-Disposition"] == 'attachment; filename="new.bin"'
    assert (await get_model(client, model_id))["file_metadata"] == fm_new
    assert not await content_stored(storage, fm_old["file_id"], sha(old))
    if storage.kind == "mongodb":
        assert await leftovers(storage) == {"files": 1, "chunks": 2}
    else:
        assert await leftovers(storage) == {"tmp": [], "blobs": [sha(new)]}


async def test_reuploading_the_same_content_keeps_it(client):
    storage = await storage_of(client)
    model_id = await register(client)
    data = payload(CS + 1)
    fm1 = await upload_ok(client, model_id, data, filename="a.bin")
    fm2 = await upload_ok(client, model_id, data, filename="b.bin", method="PUT")
    assert fm2["file_id"] == fm1["file_id"]
    assert fm2["filename"] == "b.bin"
    assert await content_stored(storage, fm1["file_id"], sha(data))
    await assert_download(client, model_id, data)


async def test_identical_content_is_stored_once_and_released_with_the_last_model(client):
    storage = await storage_of(client)
    data = payload(2 * CS + 5)
    a, b = await register(client), await register(client)
    fa = await upload_ok(client, a, data, filename="a.bin")
    fb = await upload_ok(client, b, data, filename="b.bin")
    assert fa["file_id"] == fb["file_id"]
    # A third model registered together with the same file shares it too.
    reg = await json_of(await post_multipart(client, MODELS, [
        Part("metadata", b'{"name": "shared_c", "algorithm": "svm"}', content_type="application/json"),
        Part("file", data, "c.bin")]), 201)
    c = reg["model_id"]
    assert (await get_model(client, c))["file_metadata"]["file_id"] == fa["file_id"]
    if storage.kind == "mongodb":
        assert await leftovers(storage) == {"files": 1, "chunks": 3}
    else:
        assert await leftovers(storage) == {"tmp": [], "blobs": [sha(data)]}

    for gone, remaining in ((a, [b, c]), (b, [c])):
        assert (await json_of(await client.delete(f"{MODELS}/{gone}"), 200))["success"] is True
        assert await content_stored(storage, fa["file_id"], sha(data))
        for m in remaining:
            await assert_download(client, m, data)
    await json_of(await client.delete(f"{MODELS}/{c}"), 200)
    assert not await content_stored(storage, fa["file_id"], sha(data))
    if storage.kind == "mongodb":
        assert await leftovers(storage) == {"files": 0, "chunks": 0}
    else:
        assert await leftovers(storage) == {"tmp": [], "blobs": []}


async def test_replacing_shared_content_keeps_it_for_the_other_model(client):
    storage = await storage_of(client)
    shared, other = payload(CS + 9), payload(500)
    a, b = await register(client), await register(client)
    fa = await upload_ok(client, a, shared)
    await upload_ok(client, b, shared)
    await upload_ok(client, a, other)
    assert await content_stored(storage, fa["file_id"], sha(shared))
    await assert_download(client, b, shared)
    await assert_download(client, a, other)
    # Once b moves on too, the shared content has no owner left.
    await upload_ok(client, b, other)
    assert not await content_stored(storage, fa["file_id"], sha(shared))
    await assert_download(client, b, other)


async def test_concurrent_uploads_to_one_model_leave_only_the_winner(client):
    """Racing replacements: the model keeps one of them and every other file is released."""
    storage = await storage_of(client)
    model_id = await register(client)
    for _ in range(3):
        datas = [payload(1000 + i) for i in range(6)]
        resps = await asyncio.gather(*(upload_raw(client, model_id, d) for d in datas))
        for r in resps:
            assert r.status == 201, await r.text()
        fm = (await get_model(client, model_id))["file_metadata"]
        winner = next(d for d in datas if "sha256:" + sha(d) == fm["checksum"])
        await assert_download(client, model_id, winner)
        # Exactly the winner's content is left: every replaced file was released.
        if storage.kind == "mongodb":
            assert await leftovers(storage) == {"files": 1, "chunks": 1}
        else:
            assert await leftovers(storage) == {"tmp": [], "blobs": [sha(winner)]}


async def test_concurrent_identical_uploads_share_one_file(client):
    storage = await storage_of(client)
    data = payload(2 * CS + 1)
    ids = [await register(client) for _ in range(4)]
    resps = await asyncio.gather(*(upload_raw(client, m, data) for m in ids))
    fms = [check_upload_answer(await json_of(r, 201), m, data) for r, m in zip(resps, ids)]
    assert len({fm["file_id"] for fm in fms}) == 1
    if storage.kind == "mongodb":
        assert await leftovers(storage) == {"files": 1, "chunks": 3}
    else:
        assert await leftovers(storage) == {"tmp": [], "blobs": [sha(data)]}
    for m in ids:
        await assert_download(client, m, data)


async def test_deleting_a_model_while_another_uploads_the_same_content_keeps_it(client):
    """Content shared by a model that is being deleted and one that is uploading it must survive."""
    lost = []
    for round_ in range(20):
        data = payload(CS + 1)
        a, b = await register(client), await register(client)
        await upload_ok(client, a, data)
        deleted, uploaded = await asyncio.gather(client.delete(f"{MODELS}/{a}"), upload_raw(client, b, data))
        assert deleted.status == 200
        check_upload_answer(await json_of(uploaded, 201), b, data)
        try:
            resp, body = await get_full(client, dl(b))
            ok = resp.status == 200 and body == data
        except aiohttp.ClientPayloadError:
            ok = False  # the body was cut short: the content is gone
        if not ok:
            lost.append(round_)
    assert lost == [], f"model b lost its (shared) file in rounds {lost}"


# ---------------------------------------------------------------------------
# Registration and upload in one request
# ---------------------------------------------------------------------------

META = b'{"name": "reg_with_file", "algorithm": "xgboost", "tags": ["t"], "metrics": {"accuracy": 0.9}}'


@pytest.mark.parametrize("order", ["metadata-first", "file-first"])
@pytest.mark.parametrize("size", [0, CS, CS + 1])
async def test_register_with_file_in_one_request(client, order, size):
    data = payload(size)
    meta = Part("metadata", META, content_type="application/json")
    file = Part("file", data, "reg.pkl", "application/octet-stream")
    resp = await post_multipart(client, MODELS, [meta, file] if order == "metadata-first" else [file, meta])
    answer = await json_of(resp, 201)
    model_id = answer["model_id"]
    assert HEX24.match(model_id)
    doc = await get_model(client, model_id)
    assert doc["name"] == "reg_with_file" and doc["algorithm"] == "xgboost" and doc["tags"] == ["t"]
    fm = doc["file_metadata"]
    assert FILE_METADATA_FIELDS <= set(fm)
    assert fm["filename"] == "reg.pkl"
    assert fm["size_bytes"] == size and fm["checksum"] == "sha256:" + sha(data)
    await assert_download(client, model_id, data)


@pytest.mark.parametrize("order", ["metadata-first", "file-first"])
@pytest.mark.parametrize("metadata", [
    b"{not json",
    b"[1, 2]",
    b"",
    b'{"name": "no_algorithm"}',
    b'{"algorithm": "svm"}',
    b'{"name": "bad name!", "algorithm": "svm"}',
    b'{"name": "x", "algorithm": "svm", "metrics": {"accuracy": "high"}}',
    b'{"name": "x", "algorithm": "svm", "file_metadata": {}}',
], ids=["malformed", "array", "empty", "no-algorithm", "no-name", "bad-name", "bad-metric", "immutable"])
async def test_register_with_invalid_metadata_is_400_and_stores_nothing(client, order, metadata):
    storage = await storage_of(client)
    before = await leftovers(storage)
    meta = Part("metadata", metadata, content_type="application/json")
    file = Part("file", payload(2 * CS + 1), "m.bin")
    resp = await post_multipart(client, MODELS, [meta, file] if order == "metadata-first" else [file, meta])
    await error_code(resp, 400)
    assert await total_models(client) == 0
    assert await leftovers(storage) == before


async def test_register_without_file_part_is_400(client):
    storage = await storage_of(client)
    before = await leftovers(storage)
    resp = await post_multipart(client, MODELS, [
        Part("metadata", b'{"name": "no_file", "algorithm": "svm"}', content_type="application/json"),
        Part("other", b"data", "x.bin")])
    await error_code(resp, 400)
    assert await total_models(client) == 0
    assert await leftovers(storage) == before


async def test_register_without_metadata_part_is_400_and_stores_nothing(client):
    storage = await storage_of(client)
    before = await leftovers(storage)
    resp = await post_multipart(client, MODELS, [Part("file", payload(CS + 1), "m.bin")])
    await error_code(resp, 400)
    assert await total_models(client) == 0
    assert await leftovers(storage) == before


async def test_register_with_mismatching_checksum_is_422_and_stores_nothing(client):
    storage = await storage_of(client)
    before = await leftovers(storage)
    data = payload(FAILING)
    resp = await post_multipart(client, MODELS, [
        Part("metadata", b'{"name": "bad_sum", "algorithm": "svm"}', content_type="application/json"),
        Part("file", data, "m.bin")], headers={"X-Checksum-Sha256": sha(b"other")})
    await error_code(resp, 422)
    assert await total_models(client) == 0
    assert await leftovers(storage) == before


# ---------------------------------------------------------------------------
# Upload refusals and file names
# ---------------------------------------------------------------------------


async def test_upload_to_unknown_model_is_404_and_stores_nothing(client):
    storage = await storage_of(client)
    before = await leftovers(storage)
    resp = await upload_raw(client, str(ObjectId()), payload(CS + 1))
    await error_code(resp, 404)
    resp = await post_multipart(client, f"{MODELS}/{ObjectId()}/upload", [Part("file", payload(10), "m.bin")])
    await error_code(resp, 404)
    assert await leftovers(storage) == before
    assert await total_models(client) == 0


@pytest.mark.parametrize("bad_id", ["123", "zzzzzzzzzzzzzzzzzzzzzzzz", "0" * 25, "not-an-id"])
async def test_malformed_id_is_400_for_every_file_endpoint(client, bad_id):
    storage = await storage_of(client)
    before = await leftovers(storage)
    await error_code(await upload_raw(client, bad_id, b"data"), 400)
    await error_code(await upload_raw(client, bad_id, b"data", method="PUT"), 400)
    await error_code(await client.get(dl(bad_id)), 400)
    await error_code(await client.get(f"{MODELS}/{bad_id}/info"), 400)
    resp = await client.head(dl(bad_id))
    assert resp.status == 400
    assert await leftovers(storage) == before


@pytest.mark.parametrize("how,value", [
    ("query", "evil\r\nname.bin"),
    ("query", "evil\nname.bin"),
    ("query", "evil\rname.bin"),
    ("header", "attachment; filename*=UTF-8''evil%0D%0Aname.bin"),
    ("header", "attachment; filename*=UTF-8''evil%0Aname.bin"),
    ("multipart", "UTF-8''evil%0D%0Aname.bin"),
    ("multipart", "UTF-8''evil%0Aname.bin"),
])
async def test_filename_with_cr_or_lf_is_400_and_stores_nothing(client, how, value):
    storage = await storage_of(client)
    model_id = await register(client)
    before_model = await get_model(client, model_id)
    before = await leftovers(storage)
    data = payload(CS + 1)
    if how == "query":
        resp = await upload_raw(client, model_id, data, filename=value)
    elif how == "header":
        resp = await upload_raw(client, model_id, data, filename=None, headers={"Content-Disposition": value})
    else:
        resp = await post_multipart(client, f"{MODELS}/{model_id}/upload",
                                    [Part("file", data, disposition_extra=f"; filename*={value}")])
    await error_code(resp, 400)
    assert await leftovers(storage) == before
    assert await get_model(client, model_id) == before_model


@pytest.mark.parametrize("how", ["query", "header", "multipart", "registration"])
@pytest.mark.parametrize("name,stored", [
    ("../../etc/passwd", "passwd"),
    ("/var/lib/models/m.pkl", "m.pkl"),
    ("dir/sub/weights.onnx", "weights.onnx"),
    ("..\\..\\windows\\model.bin", "model.bin"),
])
async def test_filename_with_a_path_keeps_only_its_last_component(client, how, name, stored):
    data = payload(300)
    if how == "registration":
        answer = await json_of(await post_multipart(client, MODELS, [
            Part("metadata", b'{"name": "pathy", "algorithm": "svm"}', content_type="application/json"),
            Part("file", data, name.replace("\\", "\\\\"))]), 201)
        model_id = answer["model_id"]
    else:
        model_id = await register(client)
        if how == "query":
            resp = await upload_raw(client, model_id, data, filename=name)
        elif how == "header":
            escaped = name.replace("\\", "\\\\")
            resp = await upload_raw(client, model_id, data, filename=None,
                                    headers={"Content-Disposition": f'attachment; filename="{escaped}"'})
        else:
            resp = await post_multipart(client, f"{MODELS}/{model_id}/upload",
                                        [Part("file", data, name.replace("\\", "\\\\"))])
        check_upload_answer(await json_of(resp, 201), model_id, data)
    assert (await get_model(client, model_id))["file_metadata"]["filename"] == stored
    resp, body = await get_full(client, dl(model_id))
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{stored}"'
    assert body == data


async def test_upload_without_file_part_is_400_and_changes_nothing(client):
    storage = await storage_of(client)
    model_id = await register(client)
    before_model = await get_model(client, model_id)
    before = await leftovers(storage)
    resp = await post_multipart(client, f"{MODELS}/{model_id}/upload", [Part("notfile", b"abc", "x.bin")])
    await error_code(resp, 400)
    assert await leftovers(storage) == before
    assert await get_model(client, model_id) == before_model


# ---------------------------------------------------------------------------
# Download headers, HEAD, by name
# ---------------------------------------------------------------------------


def check_file_headers(headers, doc: dict, data: bytes, filename: str) -> None:
    digest = hashlib.sha256(data).digest()
    assert headers["Content-Type"] == "application/octet-stream"
    assert int(headers["Content-Length"]) == len(data)
    assert headers["Content-Disposition"] == f'attachment; filename="{filename}"'
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"] == f'"{digest.hex()}"'
    assert headers["X-Model-Id"] == doc["id"]
    assert headers["X-Model-Name"] == doc["name"]
    assert headers["X-Model-Algorithm"] == doc["algorithm"]
    assert headers["X-Model-Version"] == doc["version"]
    assert headers["X-File-Checksum"] == f"sha256:{digest.hex()}"
    assert headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    uploaded = datetime.fromisoformat(doc["file_metadata"]["uploaded_at"].replace("Z", "+00:00"))
    assert parsedate_to_datetime(headers["Last-Modified"]) == uploaded.replace(microsecond=0)
    assert headers["Last-Modified"].endswith(" GMT")


async def test_download_carries_every_specified_header(client):
    model_id, data, fm = await model_with_file(client, SIZE, filename="churn_model.pkl")
    doc = await get_model(client, model_id)
    resp, body = await get_full(client, dl(model_id))
    assert resp.status == 200
    check_file_headers(resp.headers, doc, data, "churn_model.pkl")
    assert "Content-Range" not in resp.headers
    assert body == data


async def test_download_content_type_is_octet_stream_whatever_was_uploaded(client):
    model_id = await register(client)
    data = payload(1000)
    resp = await post_multipart(client, f"{MODELS}/{model_id}/upload",
                                [Part("file", data, "weights.h5", "application/x-hdf5")])
    check_upload_answer(await json_of(resp, 201), model_id, data)
    resp, body = await get_full(client, dl(model_id))
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert body == data


async def test_head_answers_the_get_headers_without_a_body_and_is_not_counted(client):
    model_id, data, _ = await model_with_file(client, CS + 1)
    doc = await get_model(client, model_id)
    head, head_body = await get_full(client, dl(model_id), method="HEAD")
    get, _ = await get_full(client, dl(model_id))
    assert head.status == 200 and head_body == b""
    check_file_headers(head.headers, doc, data, "model.pkl")
    skip = {"date", "x-request-id"}  # per response, not per representation
    assert {k.lower(): v for k, v in head.headers.items() if k.lower() not in skip} == \
           {k.lower(): v for k, v in get.headers.items() if k.lower() not in skip}
    assert await download_count(client, model_id) == 1  # the GET only
    for _ in range(3):
        await get_full(client, dl(model_id), method="HEAD")
    assert await download_count(client, model_id) == 1


@pytest.mark.parametrize("filename", ["modèle_ü.pkl", "模型.onnx", "Ωmega weights.bin"])
async def test_non_ascii_filename_gets_an_rfc_5987_parameter(client, filename):
    model_id = await register(client)
    data = payload(10)
    fm = await upload_ok(client, model_id, data, filename=filename)
    assert fm["filename"] == filename
    resp, body = await get_full(client, dl(model_id))
    assert body == data
    value = resp.headers["Content-Disposition"]
    assert value.isascii()
    m = re.fullmatch(r'attachment; filename="([^"]*)"; filename\*=UTF-8\'\'(\S+)', value)
    assert m, value
    assert unquote(m.group(2), encoding="utf-8", errors="strict") == filename
    assert m.group(1).isascii() and m.group(1)


async def test_download_by_name_serves_the_latest_or_the_requested_version(client):
    v1 = await register(client, "by_name_model")
    v2 = await register(client, "by_name_model")
    d1, d2 = payload(CS + 3), payload(CS - 3)
    await upload_ok(client, v1, d1, filename="one.bin")
    await upload_ok(client, v2, d2, filename="two.bin")
    doc1, doc2 = await get_model(client, v1), await get_model(client, v2)
    assert (doc1["version"], doc2["version"]) == ("v1.0", "v1.1")

    path = f"{MODELS}/by-name/by_name_model/download"
    resp, body = await get_full(client, path)
    assert resp.status == 200 and body == d2
    check_file_headers(resp.headers, doc2, d2, "two.bin")
    resp, body = await get_full(client, path, method="HEAD")
    assert resp.status == 200 and body == b""
    check_file_headers(resp.headers, doc2, d2, "two.bin")
    resp = await client.get(path, params={"version": "v1.0"}, timeout=TIMEOUT)
    body = await resp.read()
    assert resp.status == 200 and body == d1
    check_file_headers(resp.headers, doc1, d1, "one.bin")
    resp = await client.get(path, params={"version": "v1.1"}, headers={"Range": f"bytes={CS - 5}-"},
                            timeout=TIMEOUT)
    assert resp.status == 206 and await resp.read() == d2[CS - 5:]

    # The full GET counts; the HEAD and the range from byte CS-5 do not.
    assert await download_count(client, v2) == 1
    assert await download_count(client, v1) == 1

    assert await error_code(await client.get(f"{MODELS}/by-name/nobody/download"), 404) != "no_file"
    code = await error_code(await client.get(path, params={"version": "v9.9"}), 404)
    assert code != "no_file"


async def test_download_by_name_latest_without_file_is_no_file(client):
    v1 = await register(client, "half_uploaded")
    await upload_ok(client, v1, payload(10))
    await register(client, "half_uploaded")  # v1.1, no file yet
    path = f"{MODELS}/by-name/half_uploaded/download"
    assert await error_code(await client.get(path), 404) == "no_file"
    resp = await client.get(path, params={"version": "v1.0"}, timeout=TIMEOUT)
    assert resp.status == 200


# ---------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------

SINGLE_RANGES = [
    ("bytes=0-0", 0, 0),
    ("bytes=0-1", 0, 1),
    (f"bytes=0-{CS - 2}", 0, CS - 2),
    (f"bytes=0-{CS - 1}", 0, CS - 1),
    (f"bytes=0-{CS}", 0, CS),
    (f"bytes={CS - 1}-{CS - 1}", CS - 1, CS - 1),
    (f"bytes={CS - 1}-{CS}", CS - 1, CS),
    (f"bytes={CS}-{CS}", CS, CS),
    (f"bytes={CS}-{CS + 1}", CS, CS + 1),
    (f"bytes={CS + 1}-{CS + 1}", CS + 1, CS + 1),
    (f"bytes={CS}-{2 * CS - 1}", CS, 2 * CS - 1),
    (f"bytes={CS - 1}-{2 * CS}", CS - 1, 2 * CS),
    (f"bytes={CS + 1}-{3 * CS - 1}", CS + 1, 3 * CS - 1),
    (f"bytes={CS - 1}-", CS - 1, LAST),
    (f"bytes={CS}-", CS, LAST),
    (f"bytes={CS + 1}-", CS + 1, LAST),
    (f"bytes={3 * CS}-", 3 * CS, LAST),
    (f"bytes={3 * CS - 1}-{3 * CS}", 3 * CS - 1, 3 * CS),
    (f"bytes={LAST}-{LAST}", LAST, LAST),
    (f"bytes={LAST}-", LAST, LAST),
    (f"bytes={LAST - 5}-{LAST + 1000}", LAST - 5, LAST),
    (f"bytes=0-{LAST}", 0, LAST),
    ("bytes=0-", 0, LAST),
    ("bytes=0-99999999999999", 0, LAST),
    ("bytes=-1", LAST, LAST),
    (f"bytes=-{CS - 1}", SIZE - CS + 1, LAST),
    (f"bytes=-{CS}", SIZE - CS, LAST),
    (f"bytes=-{CS + 1}", SIZE - CS - 1, LAST),
    ("bytes=-17", 3 * CS, LAST),
    ("bytes=-18", 3 * CS - 1, LAST),
    (f"bytes=-{SIZE}", 0, LAST),
    (f"bytes=-{SIZE + 1}", 0, LAST),
    (f"bytes=-{10 * SIZE}", 0, LAST),
    ("BYTES=5-9", 5, 9),
]


@pytest.fixture
async def ranged(client):
    """A model holding a SIZE-byte file: (client, model id, data, model document)."""
    model_id, data, _ = await model_with_file(client, SIZE)
    return client, model_id, data, await get_model(client, model_id)


@pytest.mark.parametrize("header,first,last", SINGLE_RANGES, ids=[r[0] for r in SINGLE_RANGES])
async def test_single_range_is_206_with_exact_bytes(ranged, header, first, last):
    client, model_id, data, doc = ranged
    resp, body = await get_full(client, dl(model_id), {"Range": header})
    assert resp.status == 206, (resp.status, body[:200])
    assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert int(resp.headers["Content-Length"]) == last - first + 1
    assert body == data[first:last + 1]
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["ETag"] == f'"{sha(data)}"'
    assert resp.headers["Accept-Ranges"] == "bytes"


MULTI_RANGES = [
    (f"bytes=0-0,{CS - 1}-{CS},{LAST}-{LAST}", [(0, 0), (CS - 1, CS), (LAST, LAST)]),
    (f"bytes={CS}-{CS + 9},-5", [(CS, CS + 9), (SIZE - 5, LAST)]),
    (f"bytes=0-9,{2 * CS}-", [(0, 9), (2 * CS, LAST)]),
    (f"bytes={2 * CS}-{2 * CS + 1},0-1", [(2 * CS, 2 * CS + 1), (0, 1)]),
    (f"bytes={CS - 1}-{CS - 1},{2 * CS - 1}-{2 * CS},{3 * CS + 1}-{3 * CS + 1}",
     [(CS - 1, CS - 1), (2 * CS - 1, 2 * CS), (3 * CS + 1, 3 * CS + 1)]),
    (f"bytes=0-{CS - 1}, {2 * CS}-{3 * CS - 1}", [(0, CS - 1), (2 * CS, 3 * CS - 1)]),
]


@pytest.mark.parametrize("header,spans", MULTI_RANGES, ids=[m[0] for m in MULTI_RANGES])
async def test_several_ranges_are_multipart_byteranges(ranged, header, spans):
    client, model_id, data, _ = ranged
    resp, body = await get_full(client, dl(model_id), {"Range": header})
    assert resp.status == 206
    assert resp.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    # Well-separated ranges each get their own part, in the order asked.
    check_ranges_response(resp.status, resp.headers, body, data, spans)
    for part_headers, _ in parse_byteranges(body, resp.headers["Content-Type"]):
        assert part_headers.get("content-type") == "application/octet-stream"


# (header, the exact spans served): overlapping and adjacent ranges are merged
# (RFC 9110 14.2 allows it), keeping the first one's place; a gap of even one
# byte keeps them apart, so no byte is sent that was not asked for.
OVERLAPPING_RANGES = [
    ("bytes=0-99,50-149", [(0, 149)]),
    ("bytes=0-99,100-199", [(0, 199)]),
    ("bytes=0-99,101-199", [(0, 99), (101, 199)]),
    ("bytes=101-199,0-99", [(101, 199), (0, 99)]),
    (f"bytes={CS - 10}-{CS},{CS}-{CS + 10}", [(CS - 10, CS + 10)]),
    (f"bytes={CS - 10}-{CS},{CS + 2}-{CS + 10}", [(CS - 10, CS), (CS + 2, CS + 10)]),
    (f"bytes=-100,{LAST - 150}-", [(LAST - 150, LAST)]),
    ("bytes=0-10,5-6,9-20", [(0, 20)]),
    ("bytes=0-1,4-5,2-3", [(0, 5)]),  # the last one joins the first two
    ("bytes=30-40,0-10,12-20,11-11", [(30, 40), (0, 20)]),
    (f"bytes=0-0,{SIZE}-", [(0, 0)]),  # the second one is unsatisfiable; the first is served
]


@pytest.mark.parametrize("header,spans", OVERLAPPING_RANGES, ids=[m[0] for m in OVERLAPPING_RANGES])
async def test_overlapping_or_partly_unsatisfiable_ranges(ranged, header, spans):
    client, model_id, data, _ = ranged
    resp, body = await get_full(client, dl(model_id), {"Range": header})
    check_ranges_response(resp.status, resp.headers, body, data, spans)


# Ranges longer than one sendfile step (the embedded backend sends a range in
# steps of this many bytes) that end before the end of the file: the last step
# must stop where the range does, not at the end of a step.
STEP = sendfile._STEP
BIG = 8 * 1024 * 1024
BIG_RANGES = [
    ([(0, 3 * 1024 * 1024 - 1)], "bytes=0-3145727"),
    ([(1000, 1000 + STEP)], f"bytes=1000-{1000 + STEP}"),
    ([(STEP - 1, 3 * STEP + 5)], f"bytes={STEP - 1}-{3 * STEP + 5}"),
    ([(0, 3 * 1024 * 1024 - 1), (5_000_000, 5_000_009)], "bytes=0-3145727,5000000-5000009"),
    ([(5_000_000, 5_000_009), (7, STEP + 99)], f"bytes=5000000-5000009,7-{STEP + 99}"),
    ([(10, STEP + 10), (STEP + 12, 3 * STEP + 11), (BIG - 5, BIG - 1)],
     f"bytes=10-{STEP + 10},{STEP + 12}-{3 * STEP + 11},-5"),
]


async def test_ranges_longer_than_a_send_step_stop_where_asked(client):
    for spans, header in BIG_RANGES:
        assert any(last - first + 1 > STEP and last < BIG - 1 for first, last in spans), \
            f"{header} has no range longer than one send step ending mid-file"
    model_id, data, _ = await model_with_file(client, BIG)
    for spans, header in BIG_RANGES:
        resp, body = await get_full(client, dl(model_id), {"Range": header})
        check_ranges_response(resp.status, resp.headers, body, data, spans)


UNSATISFIABLE = [f"bytes={SIZE}-", f"bytes={SIZE}-{SIZE + 10}", f"bytes={SIZE + 1000}-", "bytes=-0",
                 f"bytes={SIZE}-,{SIZE + 5}-{SIZE + 9}", "bytes=-0,-0"]


@pytest.mark.parametrize("header", UNSATISFIABLE)
async def test_unsatisfiable_range_is_416(ranged, header):
    client, model_id, _, _ = ranged
    resp, body = await get_full(client, dl(model_id), {"Range": header})
    assert resp.status == 416, body[:200]
    assert resp.headers["Content-Range"] == f"bytes */{SIZE}"
    assert await download_count(client, model_id) == 0


MALFORMED = ["bytes=abc", "bytes=5-2", "items=0-5", "bytes=", "0-5", "bytes=1-2-3", "bytes=--1", "bytes=-",
             "bytes=x-5", "bytes=0-1,abc", "bytes 0-5", "bytes=0x10-0x20", "bytes=1.5-3"]


@pytest.mark.parametrize("header", MALFORMED)
async def test_malformed_range_is_ignored(ranged, header):
    client, model_id, data, _ = ranged
    resp, body = await get_full(client, dl(model_id), {"Range": header})
    assert resp.status == 200
    assert "Content-Range" not in resp.headers
    assert body == data


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=0-0", "bytes=-5", "bytes=5-"])
async def test_range_on_an_empty_file(client, header):
    model_id, _, _ = await model_with_file(client, 0)
    resp, body = await get_full(client, dl(model_id), {"Range": header})
    # No 206 can describe a range of an empty file ("bytes 0--1/0" is not a
    # Content-Range): the answer is 416, or the whole (empty) file.
    assert resp.status in (200, 416), (resp.status, resp.headers.get("Content-Range"))
    if resp.status == 416:
        assert resp.headers["Content-Range"] == "bytes */0"
    else:
        assert "Content-Range" not in resp.headers
        assert resp.headers["Content-Length"] == "0" and body == b""


@pytest.mark.parametrize("if_range,honoured", [
    ("etag", True),
    ("last-modified", True),
    ("other-etag", False),
    ("weak-etag", False),
    ("earlier-date", False),
    ("later-date", False),
    ("garbage", False),
])
async def test_if_range(ranged, if_range, honoured):
    client, model_id, data, doc = ranged
    head, _ = await get_full(client, dl(model_id), method="HEAD")
    etag, lm = head.headers["ETag"], head.headers["Last-Modified"]
    lm_time = parsedate_to_datetime(lm)
    value = {
        "etag": etag,
        "last-modified": lm,
        "other-etag": '"' + "0" * 64 + '"',
        "weak-etag": "W/" + etag,
        "earlier-date": http_date(lm_time - timedelta(days=1)),
        "later-date": http_date(lm_time + timedelta(days=1)),
        "garbage": "not a validator",
    }[if_range]
    resp, body = await get_full(client, dl(model_id), {"Range": f"bytes={CS - 1}-{CS + 1}", "If-Range": value})
    if honoured:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {CS - 1}-{CS + 1}/{SIZE}"
        assert body == data[CS - 1:CS + 2]
    else:
        assert resp.status == 200
        assert "Content-Range" not in resp.headers
        assert body == data


# ---------------------------------------------------------------------------
# Conditional requests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("header,value,status", [
    ("If-None-Match", "{etag}", 304),
    ("If-None-Match", "*", 304),
    ("If-None-Match", '"abc", {etag}, "def"', 304),
    ("If-None-Match", "W/{etag}", 304),
    ("If-None-Match", '"abc"', 200),
    ("If-None-Match", '"abc", "def"', 200),
    ("If-Modified-Since", "{lm}", 304),
    ("If-Modified-Since", "{lm+1h}", 304),
    ("If-Modified-Since", "{lm-1s}", 200),
    ("If-Modified-Since", "not a date", 200),
    ("If-Match", "{etag}", 200),
    ("If-Match", "*", 200),
    ("If-Match", '"abc", {etag}', 200),
    ("If-Match", '"abc"', 412),
    ("If-Match", "W/{etag}", 412),
])
async def test_conditional_requests(ranged, method, header, value, status):
    client, model_id, data, _ = ranged
    head, _ = await get_full(client, dl(model_id), method="HEAD")
    etag, lm = head.headers["ETag"], head.headers["Last-Modified"]
    lm_time = parsedate_to_datetime(lm)
    value = (value.replace("{etag}", etag).replace("{lm}", lm)
             .replace("{lm+1h}", http_date(lm_time + timedelta(hours=1)))
             .replace("{lm-1s}", http_date(lm_time - timedelta(seconds=1))))
    resp, body = await get_full(client, dl(model_id), {header: value}, method=method)
    assert resp.status == status, (header, value, resp.status, body[:200])
    if status == 304:
        assert body == b""
        assert resp.headers["ETag"] == etag
    elif status == 200:
        assert body == (data if method == "GET" else b"")
        assert int(resp.headers["Content-Length"]) == SIZE
    # Only a GET that sends the file (from byte 0) is a download.
    expected = 1 if (status == 200 and method == "GET") else 0
    assert await download_count(client, model_id) == expected


async def test_if_none_match_takes_precedence_over_if_modified_since(ranged):
    client, model_id, data, _ = ranged
    head, _ = await get_full(client, dl(model_id), method="HEAD")
    future = http_date(parsedate_to_datetime(head.headers["Last-Modified"]) + timedelta(days=1))
    resp, body = await get_full(client, dl(model_id), {"If-None-Match": '"abc"', "If-Modified-Since": future})
    assert resp.status == 200 and body == data


async def test_conditionals_apply_to_download_by_name(client):
    model_id, data, _ = await model_with_file(client, 1000, name="cond_by_name")
    path = f"{MODELS}/by-name/cond_by_name/download"
    resp, _ = await get_full(client, path)
    etag = resp.headers["ETag"]
    resp, body = await get_full(client, path, {"If-None-Match": etag})
    assert resp.status == 304 and body == b""
    resp, _ = await get_full(client, path, {"If-Match": '"nope"'})
    assert resp.status == 412


# ---------------------------------------------------------------------------
# No file, unknown model
# ---------------------------------------------------------------------------


async def test_model_without_file_is_404_no_file(client):
    model_id = await register(client, "fileless")
    assert await error_code(await client.get(dl(model_id)), 404) == "no_file"
    assert await error_code(await client.get(f"{MODELS}/{model_id}/info"), 404) == "no_file"
    assert await error_code(await client.get(f"{MODELS}/by-name/fileless/download"), 404) == "no_file"
    resp = await client.head(dl(model_id))
    assert resp.status == 404 and await resp.read() == b""
    doc = await get_model(client, model_id)
    assert doc.get("file_metadata") is None and doc.get("model_size") is None
    assert doc["download_count"] == 0


async def test_unknown_model_is_404_with_a_different_code(client):
    unknown = str(ObjectId())
    for path in (dl(unknown), f"{MODELS}/{unknown}/info"):
        code = await error_code(await client.get(path), 404)
        assert code != "no_file", path
    resp = await client.head(dl(unknown))
    assert resp.status == 404


async def test_deleted_model_download_is_404(client):
    model_id, _, _ = await model_with_file(client, 100)
    await json_of(await client.delete(f"{MODELS}/{model_id}"), 200)
    assert await error_code(await client.get(dl(model_id)), 404) != "no_file"


# ---------------------------------------------------------------------------
# Download counting
# ---------------------------------------------------------------------------


async def test_only_responses_carrying_byte_zero_count_as_downloads(ranged):
    client, model_id, data, _ = ranged
    head, _ = await get_full(client, dl(model_id), method="HEAD")
    etag = head.headers["ETag"]
    steps = [
        ({}, "GET", 200, 1),
        ({"Range": "bytes=0-10"}, "GET", 206, 1),
        ({"Range": "bytes=0-0"}, "GET", 206, 1),
        ({"Range": "bytes=1-10"}, "GET", 206, 0),
        ({"Range": f"bytes={CS}-"}, "GET", 206, 0),
        ({"Range": "bytes=-10"}, "GET", 206, 0),
        ({"Range": f"bytes=-{SIZE + 5}"}, "GET", 206, 1),
        ({"Range": f"bytes=5-9,{CS}-{CS + 1}"}, "GET", 206, 0),
        ({"Range": f"bytes={CS}-{CS + 1},0-3"}, "GET", 206, 1),
        ({"Range": f"bytes={SIZE}-"}, "GET", 416, 0),
        ({"Range": "bytes=abc"}, "GET", 200, 1),
        ({"Range": "bytes=10-20", "If-Range": '"stale"'}, "GET", 200, 1),
        ({"Range": "bytes=10-20", "If-Range": etag}, "GET", 206, 0),
        ({"If-None-Match": etag}, "GET", 304, 0),
        ({"If-Match": '"stale"'}, "GET", 412, 0),
        ({}, "HEAD", 200, 0),
        ({"Range": "bytes=0-10"}, "HEAD", 200, 0),
    ]
    count = 0
    for headers, method, status, delta in steps:
        resp, _ = await get_full(client, dl(model_id), headers, method=method)
        assert resp.status == status, (headers, method, resp.status)
        count += delta
        assert await download_count(client, model_id) == count, (headers, method)
    await json_of(await client.get(f"{MODELS}/{model_id}/info"), 200)
    assert await download_count(client, model_id) == count


# ---------------------------------------------------------------------------
# The model document and /info
# ---------------------------------------------------------------------------


async def test_model_document_gains_file_metadata_and_model_size(client):
    model_id = await register(client)
    doc = await get_model(client, model_id)
    assert doc.get("file_metadata") is None and doc.get("model_size") is None
    data = payload(1_500_000)
    fm = await upload_ok(client, model_id, data, filename="big.safetensors")
    doc = await get_model(client, model_id)
    assert doc["file_metadata"] == fm
    m = re.fullmatch(r"(\d+(?:\.\d+)?) (B|KB|MB|GB|KiB|MiB|GiB)", doc["model_size"])
    assert m, doc["model_size"]
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    assert m.group(2) in ("MB", "MiB"), doc["model_size"]
    approx = float(m.group(1)) * units[m.group(2)]
    assert abs(approx - len(data)) / len(data) < 0.1, doc["model_size"]


@pytest.mark.parametrize("size", [0, 1, CS, CS + 1, 3 * CS + 17])
async def test_info_describes_the_file_without_sending_it(client, size):
    storage = await storage_of(client)
    model_id, data, fm = await model_with_file(client, size, filename="info.onnx")
    resp = await client.get(f"{MODELS}/{model_id}/info")
    info = await json_of(resp, 200)
    assert len(await resp.read()) < 4096
    assert info["size_bytes"] == size
    assert info["checksum"] == "sha256:" + sha(data)
    assert info["filename"] == "info.onnx"
    assert info["content_type"] == "application/octet-stream"
    assert info["chunk_size"] == CS
    assert info["chunk_count"] == math.ceil(size / CS)
    assert info["uploaded_at"] == fm["uploaded_at"]
    assert info["format"] == fm["format"]
    if storage.kind == "mongodb":
        chunks = await storage.chunks.count_documents({"files_id": ObjectId(fm["file_id"])})
        assert info["chunk_count"] == chunks
    assert await download_count(client, model_id) == 0



async def test_failed_upload_after_chunks_reached_the_database_leaves_nothing(client):
    """Big enough that the writer has flushed chunk batches before the checksum is found wrong."""
    storage = await storage_of(client)
    model_id = await register(client)
    before = await leftovers(storage)
    data = payload(9 * 1024 * 1024 + 3)  # past two 4 MiB write batches
    resp = await upload_raw(client, model_id, data, headers={"X-Checksum-Sha256": "0" * 64})
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "checksum_mismatch"
    assert await leftovers(storage) == before
    assert "file_metadata" not in (await get_model(client, model_id))
