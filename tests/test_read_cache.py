"""The in-process read cache (app/read_cache.py): never a stale answer.

What a model read answered is kept while the store's read stamp stays put
(embedded: counters that triggers bump in every transaction that changes a
model). These tests change models every way there is (through this app,
straight through storage, through a raw SQLite connection, through another
service process on the same DATA_DIR) and check that the next read sees it;
and that MongoDB, which has no cheap stamp, keeps nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from datetime import datetime, timezone

import aiohttp
import pytest

from app import downloads
from app.appkeys import READ_CACHE, STORAGE
from app.downloads import file_headers
from app.errors import ApiError
from app.read_cache import ReadCache, freeze, weight
from app.server import create_app
from app.storage.base import StoredFile
from app.storage.embedded import EmbeddedStorage
from app.storage.wal_index import open_header
from testkit.live_service import processes_on_one_data_dir
from tests.api_helpers import MODELS, get_model, json_of, listing, model_url, register

TIMEOUT = aiohttp.ClientTimeout(total=60)


async def _upload(client, model_id: str, data: bytes, filename: str = "m.bin") -> None:
    resp = await client.put(model_url(model_id, f"/upload?filename={filename}"), data=data)
    await json_of(resp, 201)


async def _download(client, path: str) -> bytes:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return await resp.read()


# -- through this app and straight through its storage, both backends ------------------------------------------


async def test_get_by_id_sees_every_change(client, backend):
    model_id = (await register(client, "cached-get", description="one"))["model_id"]
    assert (await get_model(client, model_id))["description"] == "one"
    assert (await get_model(client, model_id))["description"] == "one"  # a hit on embedded
    resp = await client.put(model_url(model_id), json={"description": "two"})
    await json_of(resp, 200)
    assert (await get_model(client, model_id))["description"] == "two"
    # Straight through storage, as gc or a migration would: no handler to tell the cache.
    await client.app[STORAGE].update_model(model_id, {"description": "three"})
    assert (await get_model(client, model_id))["description"] == "three"
    await client.app[STORAGE].delete_model(model_id)
    assert (await client.get(model_url(model_id))).status == 404


async def test_download_count_shows_in_get_by_id_and_listing(client, backend):
    model_id = (await register(client, "cached-count"))["model_id"]
    await _upload(client, model_id, b"counted")
    assert (await get_model(client, model_id))["download_count"] == 0
    assert [m["download_count"] for m in (await listing(client))["models"] if m["id"] == model_id] == [0]
    assert await _download(client, model_url(model_id, "/download")) == b"counted"
    assert (await get_model(client, model_id))["download_count"] == 1
    assert [m["download_count"] for m in (await listing(client))["models"] if m["id"] == model_id] == [1]


async def test_conditional_get_after_a_hit_and_after_a_change(client, backend):
    model_id = (await register(client, "cached-etag"))["model_id"]
    first = await client.get(model_url(model_id))
    etag = first.headers["ETag"]
    again = await client.get(model_url(model_id), headers={"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag
    assert again.headers["Cache-Control"] == "no-cache"
    await client.app[STORAGE].update_model(model_id, {"status": "deprecated"})
    changed = await client.get(model_url(model_id), headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert (await changed.json())["status"] == "deprecated"
    by_name = await client.get(f"{MODELS}/by-name/cached-etag")
    assert by_name.status == 200 and by_name.headers["ETag"] == changed.headers["ETag"]


async def test_listing_sees_new_and_deleted_models(client, backend):
    before = await listing(client, limit=20)
    a = (await register(client, "cached-list-a"))["model_id"]
    after = await listing(client, limit=20)
    assert after["pagination"]["total"] == before["pagination"]["total"] + 1
    assert after["models"][0]["id"] == a
    await client.app[STORAGE].delete_model(a)
    assert await listing(client, limit=20) == before


async def test_listing_is_kept_per_query_string_and_a_refused_one_never(client, backend):
    for name in ("cached-q-a", "cached-q-b"):
        await register(client, name)
    one, two = await listing(client, limit=1), await listing(client, limit=2)
    assert len(one["models"]) == 1 and len(two["models"]) == 2
    assert await listing(client, limit=1) == one and await listing(client, limit=2) == two
    # Another spelling of the same query: its own entry, the same answer.
    assert await json_of(await client.get(f"{MODELS}?limit=%31"), 200) == one
    for _ in range(2):
        resp = await client.get(f"{MODELS}?limit=1&sort=bogus")
        assert (await json_of(resp, 400))["error"]["code"] == "invalid_parameter"


async def test_download_lookups_follow_replacements_and_deletes(client, backend):
    model_id = (await register(client, "cached-dl"))["model_id"]
    await _upload(client, model_id, b"first content")
    by_id, by_name = model_url(model_id, "/download"), f"{MODELS}/by-name/cached-dl/download"
    for _ in range(2):
        assert await _download(client, by_id) == b"first content"
        assert await _download(client, by_name) == b"first content"
        assert await _download(client, model_url(model_id, "/files/m.bin")) == b"first content"
    await _upload(client, model_id, b"second content", "n.bin")
    assert await _download(client, by_id) == b"second content"
    assert await _download(client, by_name) == b"second content"
    assert (await client.get(model_url(model_id, "/files/m.bin"))).status == 404
    assert await _download(client, model_url(model_id, "/files/n.bin")) == b"second content"
    # A newer version of the name: the by-name URL now names it.
    newer = (await register(client, "cached-dl"))["model_id"]
    await _upload(client, newer, b"newer version")
    assert await _download(client, by_name) == b"newer version"
    resp = await client.delete(model_url(model_id))
    await json_of(resp, 200)
    assert (await client.get(by_id)).status == 404
    assert (await client.get(f"{MODELS}/by-name/cached-dl/download?version=v1.0")).status == 404


async def test_download_headers_follow_the_model(client, backend):
    model_id = (await register(client, "cached-headers", algorithm="first-algo"))["model_id"]
    await _upload(client, model_id, b"headers")
    resp = await client.get(model_url(model_id, "/download"))
    assert resp.status == 200 and resp.headers["X-Model-Algorithm"] == "first-algo"
    # The API never changes a model's algorithm; storage can (a migration).
    await client.app[STORAGE].update_model(model_id, {"algorithm": "second-algo"})
    resp = await client.get(model_url(model_id, "/download"))
    assert resp.status == 200 and resp.headers["X-Model-Algorithm"] == "second-algo"
    assert resp.headers["X-Model-Id"] == model_id and resp.headers["Content-Disposition"].endswith('"m.bin"')


def _file_doc(model_id: str, algorithm: str = "x") -> dict:
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    return {**_doc(model_id, "kept-repr"), "algorithm": algorithm, "file_metadata": {
        "file_id": "f" * 24, "size_bytes": 7, "checksum": "sha256:" + "ab" * 32, "chunk_size": 1024,
        "uploaded_at": at, "filename": "m.bin", "content_type": "application/octet-stream"}}


@pytest.mark.parametrize("backend", ["embedded"])
async def test_a_download_representation_is_kept_with_its_own_document_object_only(storage, monkeypatch):
    monkeypatch.setattr(downloads, "_built", {})

    def whole(doc, others=()):
        return downloads._representation(storage, doc, others, None, downloads._whole_file)[0]

    def one(doc, path):
        return downloads._representation(storage, doc, (), path, downloads._one_file)[0]

    doc = freeze(_file_doc("a" * 24))
    first = whole(doc)
    assert first.path == storage.local_path(downloads.stored_file(doc))
    assert whole(doc) is first
    # /files/{path} of the same document is another representation (its own headers), kept beside it.
    as_file = one(doc, "m.bin")
    assert as_file is not first and as_file.headers["X-Content-Type-Options"] == "nosniff"
    assert one(doc, "m.bin") is as_file and whole(doc) is first
    # The model read again after a change is another object, even where nothing shown changed.
    assert whole(freeze(_file_doc("a" * 24, algorithm="y"))).headers["X-Model-Algorithm"] == "y"
    assert whole(freeze(_file_doc("a" * 24))) is not first
    # Beside other versions (by name, the latest) its date's strength depends on them: built each time.
    named = freeze(_file_doc("b" * 24))
    assert whole(named, (doc,)) is not whole(named, (doc,))
    # A path it does not have is refused each time, and nothing is kept for it.
    kept = len(downloads._built)
    with pytest.raises(ApiError):
        one(doc, "other.bin")
    assert len(downloads._built) == kept
    # A version of many files keeps nothing: its document may be megabytes.
    many = freeze({**_file_doc("c" * 24), "files": [{"path": f"f{i}"} for i in range(downloads._MAX_BUILT_FILES + 1)]})
    monkeypatch.setattr(downloads, "_one_file", lambda storage, doc, others, path: (object(), None))
    assert one(many, "f1") is not one(many, "f1")
    # Bounded, oldest first out.
    monkeypatch.setattr(downloads, "_MAX_BUILT", 2)
    docs = [freeze(_file_doc(c * 24)) for c in "def"]
    for d in docs:
        whole(d)
    assert [entry[0] for entry in downloads._built.values()] == docs[1:]
    # A store without read stamps hands out a new object per read: nothing is kept for it.
    monkeypatch.setattr(storage, "read_stamp", lambda counts=True: None)
    whole(freeze(_file_doc("9" * 24)))
    assert [entry[0] for entry in downloads._built.values()] == docs[1:]


def test_file_headers_are_each_callers_own():
    doc = {"id": "d" * 24, "name": "n", "algorithm": "a", "version": "v1.0"}
    f = StoredFile("f", 1, "ab" * 32, 1024, datetime(2026, 1, 2, tzinfo=timezone.utc))
    first = file_headers(doc, f, "m.bin")
    first["X-Changed"] = "by one response"
    assert "X-Changed" not in file_headers(doc, f, "m.bin")
    assert file_headers(doc, f, "m.bin") == {k: v for k, v in first.items() if k != "X-Changed"}


async def test_a_kept_answer_still_asks_for_a_key(aiohttp_client, settings, backend):
    app = create_app(dataclasses.replace(settings, enable_auth=True, api_keys="reader-key-1:read:dash"))
    authed = await aiohttp_client(app)
    await app[STORAGE].insert_model(_doc("c" * 24, "cached-auth"))
    key = {"X-API-Key": "reader-key-1"}
    for path in (model_url("c" * 24), MODELS, f"{MODELS}/by-name/cached-auth"):
        for _ in range(2):
            assert (await authed.get(path, headers=key)).status == 200
        assert (await authed.get(path)).status == 401
        assert (await authed.get(path, headers={"X-API-Key": "wrong"})).status == 401


async def test_only_embedded_keeps_anything(client, backend):
    model_id = (await register(client, "cached-kept"))["model_id"]
    await get_model(client, model_id)
    await listing(client)
    assert (len(client.app[READ_CACHE]) > 0) == (backend == "embedded")
    assert (client.app[STORAGE].read_stamp() is None) == (backend == "mongodb")


# -- the stamp itself, embedded ---------------------------------------------------------------------------


def _doc(model_id: str, name: str) -> dict:
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    return {"id": model_id, "name": name, "version": "v1.0", "algorithm": "x", "status": "active",
            "created_at": at, "updated_at": at, "download_count": 0}


@pytest.mark.parametrize("backend", ["embedded"])
async def test_stamp_moves_with_every_change_by_any_connection(storage, settings):
    other = EmbeddedStorage(settings.data_dir)  # another process's connections, as far as SQLite can tell
    await other.open()
    try:
        seen = [storage.read_stamp()]

        def moved() -> bool:
            seen.append(storage.read_stamp())
            return seen[-1] != seen[-2]

        await storage.insert_model(_doc("a" * 24, "stamp-a"))
        assert moved()
        assert not moved()
        await other.insert_model(_doc("b" * 24, "stamp-b"))
        assert moved()
        await other.update_model("b" * 24, {"description": "changed"})
        assert moved()
        quiet = storage.read_stamp(counts=False)
        await other.record_download("b" * 24, datetime.now(timezone.utc))
        assert moved()
        # A count moves only the stamp of reads that show counts.
        assert storage.read_stamp(counts=False) == quiet
        async with other.file_writer() as writer:
            await writer.write(b"leased")
            stored = await writer.commit()
        assert not moved()  # content, not a model
        leased = await other.lease_files([stored.file_id], "owner", datetime.now(timezone.utc))
        assert leased and not moved()  # a download's lease leaves every entry valid
        with sqlite3.connect(storage.db_path) as raw:  # anything else writing to the database
            raw.execute("UPDATE models SET doc = json_set(doc, '$.description', 'raw') WHERE id = ?", ("a" * 24,))
        assert moved()
        assert storage.read_stamp(counts=False) != quiet
        await other.delete_model("a" * 24)
        assert moved()
    finally:
        await other.close()


@pytest.mark.parametrize("backend", ["embedded"])
async def test_stamp_row_is_read_again_only_after_a_commit(storage, monkeypatch):
    """Between commits the WAL-index header stays the same, and the stamp's row is not read again;
    any connection's commit changes the header, and the row is read at once."""
    reads = []
    real = storage._read_stamp
    monkeypatch.setattr(storage, "_read_stamp", lambda: reads.append(1) or real())
    first = storage.read_stamp()
    for _ in range(3):
        assert storage.read_stamp() == first and storage.read_stamp(counts=False) == first[0]
    assert len(reads) == 1
    with sqlite3.connect(storage.db_path) as raw:
        raw.execute("INSERT INTO download_hours (hour, count) VALUES ('2026-01-01T00:00:00.000Z', 1)")
    assert storage.read_stamp() == first  # a commit that changed no model: read, and the same
    assert len(reads) == 2
    with sqlite3.connect(storage.db_path) as raw:
        raw.execute("UPDATE read_generation SET models = models + 1")
    second = storage.read_stamp()
    assert second != first and len(reads) == 3
    # This store's own commits, through the SQLite thread and on the loop's own connection.
    await storage.insert_model(_doc("c" * 24, "stamp-c"))
    third = storage.read_stamp()
    assert third != second and len(reads) == 4
    await storage.record_downloads({("c" * 24, datetime.now(timezone.utc)): 1})
    assert storage.read_stamp() != third and storage.read_stamp(counts=False) == third[0]


def test_wal_index_header_is_read_only_whole(tmp_path):
    db = tmp_path / "x.sqlite3"
    assert open_header(str(db)) is None  # no index to map
    shm = tmp_path / "x.sqlite3-shm"
    header = bytes(12) + b"\x01" + bytes(35)
    shm.write_bytes(header + header + bytes(100))
    watch = open_header(str(db))
    assert watch.current() == header
    shm.write_bytes(header + b"\x02" + header[1:] + bytes(100))  # a commit half written
    assert watch.current() is None
    shm.write_bytes(bytes(96 + 100))  # not built yet
    assert watch.current() is None
    watch.close()
    assert watch.current() is None


@pytest.mark.parametrize("backend", ["embedded"])
async def test_every_models_column_but_the_count_moves_the_stamp(storage):
    """A column added to models later must be added to the models_updated trigger too."""
    with sqlite3.connect(storage.db_path) as raw:
        columns = {row[1] for row in raw.execute("PRAGMA table_info(models)")}
        trigger = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'models_updated'").fetchone()[0]
    watched = {c.strip() for c in trigger.split("UPDATE OF", 1)[1].split("ON models", 1)[0].split(",")}
    assert watched == columns - {"download_count"}


# -- the cache itself ---------------------------------------------------------------------------------------


class _Stamped:
    def __init__(self) -> None:
        self.stamp: object = 1

    def read_stamp(self, counts: bool = True) -> object:
        return self.stamp


async def test_cache_uses_an_entry_only_under_its_stamp_and_stays_bounded():
    store = _Stamped()
    cache = ReadCache(store, max_entries=3)
    computed = []

    async def compute(value):
        computed.append(value)
        return value

    assert await cache.get("k", lambda: compute("v1")) == "v1"
    assert await cache.get("k", lambda: compute("v2")) == "v1"
    store.stamp = 2
    assert await cache.get("k", lambda: compute("v3")) == "v3"
    store.stamp = None  # no stamp: nothing used, nothing kept
    assert await cache.get("k", lambda: compute("v4")) == "v4"
    assert computed == ["v1", "v3", "v4"]
    store.stamp = 3
    for key in "abcd":
        await cache.get(key, lambda: compute(key))
    assert len(cache) == 3

    async def missing():
        raise LookupError("404")

    with pytest.raises(LookupError):
        await cache.get("gone", missing)
    assert await cache.get("gone", lambda: compute("now")) == "now"


async def test_cache_stamp_is_read_before_the_value():
    """A change landing while a value is computed must not be labelled with the stamp after it."""
    store = _Stamped()
    cache = ReadCache(store)

    async def racing():
        store.stamp = 2  # a commit elsewhere, after this read
        return "old"

    assert await cache.get("k", racing) == "old"
    assert await cache.get("k", lambda: asyncio.sleep(0, "new")) == "new"


async def test_cache_is_bounded_in_bytes():
    store = _Stamped()
    cache = ReadCache(store, max_bytes=1600)

    async def body(size):
        return b"x" * size

    for i in range(40, 80):  # keys of two characters' repr: 88 + 2 bytes each
        await cache.get(i, lambda: body(88))
    assert len(cache) == 17  # 17 * 90 <= 1600 < 18 * 90
    assert await cache.get("big", lambda: body(96)) == b"x" * 96  # with its key over max_bytes / 16: not kept
    assert len(cache) == 17 and cache._bytes == 17 * 90
    snapshot = freeze({"id": "s", "files": [{"path": str(i)} for i in range(100)]})
    assert weight(snapshot) > 100 * 512  # documents are weighed by their files


def test_frozen_documents_cannot_be_changed():
    doc = {"id": "x", "tags": ["a"], "file_metadata": {"filename": "m.bin"}, "files": [{"path": "p"}]}
    frozen = freeze(doc)
    assert frozen == {"id": "x", "tags": ("a",), "file_metadata": {"filename": "m.bin"}, "files": ({"path": "p"},)}
    for change in (lambda: frozen.__setitem__("id", "y"), lambda: frozen["file_metadata"].__setitem__("x", 1),
                   lambda: frozen["files"][0].__setitem__("path", "q"), lambda: frozen["tags"].append("b")):
        with pytest.raises((TypeError, AttributeError)):
            change()
    doc["file_metadata"]["filename"] = "changed"  # nor does the original reach it
    assert frozen["file_metadata"]["filename"] == "m.bin"


# -- another service process on the same DATA_DIR -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_services(tmp_path_factory):
    with processes_on_one_data_dir(tmp_path_factory.mktemp("cache-shared"), 2, BLOB_GRACE="0") as started:
        yield [s.url for s in started]


async def _get(session, url: str, status: int = 200):
    async with session.get(url) as resp:
        body = await resp.read()
        assert resp.status == status, body
        return body


def test_a_change_through_another_process_is_seen_at_once(two_services):
    a, b = two_services

    async def scenario():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.post(f"{a}{MODELS}", json={"name": "across", "algorithm": "x"}) as resp:
                model_id = (await resp.json())["model_id"]
            async with s.put(f"{a}{MODELS}/{model_id}/upload?filename=m.bin", data=b"from a") as resp:
                assert resp.status == 201
            for _ in range(2):  # warm a's entries: body, listing, lookups
                await _get(s, f"{a}{MODELS}/{model_id}")
                await _get(s, f"{a}{MODELS}?limit=20")
                assert await _get(s, f"{a}{MODELS}/{model_id}/download") == b"from a"
                assert await _get(s, f"{a}{MODELS}/by-name/across/download") == b"from a"
            async with s.put(f"{b}{MODELS}/{model_id}", json={"description": "by b"}) as resp:
                assert resp.status == 200
            assert b'"description":"by b"' in await _get(s, f"{a}{MODELS}/{model_id}")
            async with s.put(f"{b}{MODELS}/{model_id}/upload?filename=m.bin", data=b"from b") as resp:
                assert resp.status == 201
            assert await _get(s, f"{a}{MODELS}/{model_id}/download") == b"from b"
            assert await _get(s, f"{a}{MODELS}/by-name/across/download") == b"from b"
            async with s.post(f"{b}{MODELS}", json={"name": "across-2", "algorithm": "x"}) as resp:
                second = (await resp.json())["model_id"]
            assert second.encode() in await _get(s, f"{a}{MODELS}?limit=20")
            async with s.delete(f"{b}{MODELS}/{model_id}") as resp:
                assert resp.status == 200
            await _get(s, f"{a}{MODELS}/{model_id}", 404)
            await _get(s, f"{a}{MODELS}/{model_id}/download", 404)
            await _get(s, f"{a}{MODELS}/by-name/across/download", 404)
            assert model_id.encode() not in await _get(s, f"{a}{MODELS}?limit=20")

    asyncio.run(scenario())
