"""Multi-file versions (issue 14), the storing half: blobs, the atomic commit, path rules, dedup, gc.

Everything through HTTP on both backends, except where a test ages a blob or
runs gc (which are storage-side by nature).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import unicodedata
from datetime import timedelta

import pytest

from app import clock, snapshots
from app.appkeys import STORAGE
from app.config import Settings
from app.server import create_app
from app.storage.mongo_leases import KEEP_OWNER
from tests.api_helpers import MODELS, expect_error, get_model, json_of, listing, model_url, register, snapshot

BLOBS = "/api/v1/blobs"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry(path: str, data: bytes, **extra) -> dict:
    return {"path": path, "checksum": digest(data), "size_bytes": len(data), **extra}


async def put_blob(client, data: bytes, status: int = 201) -> dict:
    body = await json_of(await client.put(f"{BLOBS}/{digest(data)}", data=data), status)
    assert body == {"digest": digest(data), "size_bytes": len(data)}
    return body


async def missing(client, *digests: str) -> list[str]:
    return (await json_of(await client.post(f"{BLOBS}/missing", json={"digests": list(digests)}), 200))["missing"]


async def commit(client, name: str, files: dict[str, bytes], status: int = 201, upload: bool = True,
                 **fields) -> dict:
    """PUT the blobs (unless told not to) and commit a version of ``name`` with these files."""
    if upload:
        for data in files.values():
            if await missing(client, digest(data)):
                await put_blob(client, data)
    resp = await client.post(MODELS, json={"name": name, "algorithm": "xgboost",
                                           "files": [entry(p, d) for p, d in files.items()], **fields})
    return await json_of(resp, status)


async def stats(client) -> dict:
    return await json_of(await client.get("/api/v1/models/statistics"), 200)


async def blob_exists(client, data: bytes) -> bool:
    resp = await client.head(f"{BLOBS}/{digest(data)}")
    assert resp.status in (200, 404), resp.status
    if resp.status == 200:
        assert resp.headers["Content-Length"] == str(len(data))
    return resp.status == 200


async def gc(client, min_age=timedelta(0)) -> list[str]:
    return await client.app[STORAGE].collect_garbage(min_age, dry_run=False)


# --------------------------------------------------------------------------- blobs


async def test_put_blob_201_then_200_and_head(client):
    data = os.urandom(300_000)
    assert await missing(client, digest(data)) == [digest(data)]
    assert not await blob_exists(client, data)
    await put_blob(client, data, 201)
    await put_blob(client, data, 200)
    assert await blob_exists(client, data)
    assert await missing(client, digest(data)) == []


async def test_put_blob_already_stored_answers_before_the_body(client):
    data = os.urandom(1000)
    await put_blob(client, data)
    # A body that does not even hash to the digest: it is never read, the answer is 200.
    resp = await client.put(f"{BLOBS}/{digest(data)}", data=b"x" * 5000)
    assert await json_of(resp, 200) == {"digest": digest(data), "size_bytes": 1000}
    assert resp.headers.get("Connection", "").lower() == "close"


async def test_put_blob_mismatch_is_422_and_keeps_nothing(client):
    data = os.urandom(200_000)
    wrong = digest(b"something else")
    err = await expect_error(await client.put(f"{BLOBS}/{wrong}", data=data), 422, digest(data))
    assert err["code"] == "digest_mismatch"
    assert await missing(client, wrong, digest(data)) == [wrong, digest(data)]
    storage = client.app[STORAGE]
    assert await storage.find_blob(hashlib.sha256(data).hexdigest()) is None
    if storage.kind == "embedded":
        assert list(storage.tmp_dir.iterdir()) == [] and list(storage.blob_dir.glob("*/*")) == []
    else:
        assert await storage.chunks.count_documents({}) == 0 and await storage.files.count_documents({}) == 0


@pytest.mark.parametrize("bad", ["sha256:" + "A" * 64, "sha256:abc", "md5:" + "0" * 64, "0" * 64, "missing2"])
async def test_blob_digest_in_the_url_is_checked(client, bad):
    err = await expect_error(await client.put(f"{BLOBS}/{bad}", data=b"x"), 400)
    assert err["code"] == "invalid_digest"
    assert (await client.head(f"{BLOBS}/{bad}")).status == 400


async def test_blobs_missing_answers_in_order_once_each(client):
    a, b, c = os.urandom(10), os.urandom(11), os.urandom(12)
    await put_blob(client, b)
    assert await missing(client, digest(c), digest(a), digest(b), digest(c)) == [digest(c), digest(a)]


@pytest.mark.parametrize("body, mentions", [
    ({}, "digests: is required"),
    ({"digests": []}, "digests"),
    ({"digests": "sha256:" + "0" * 64}, "digests"),
    ({"digests": ["sha256:" + "0" * 64, "nope"]}, "digests[1]"),
    ({"digests": ["sha256:" + "0" * 64], "more": 1}, "more"),
])
async def test_blobs_missing_refuses_bad_bodies(client, body, mentions):
    err = await expect_error(await client.post(f"{BLOBS}/missing", json=body), 400, mentions)
    assert err["code"] in ("validation_error", "unknown_field")


async def test_blobs_missing_takes_at_most_10000(client):
    many = ["sha256:" + f"{i:064x}" for i in range(10_001)]
    await expect_error(await client.post(f"{BLOBS}/missing", json={"digests": many}), 400, "digests")
    assert len(await missing(client, *many[:10_000])) == 10_000


# --------------------------------------------------------------------------- the commit


async def test_commit_creates_a_version_with_every_file(client):
    files = {"config.json": b'{"a": 1}', "weights/model-00001-of-00002.safetensors": os.urandom(70_000),
             "weights/model-00002-of-00002.safetensors": os.urandom(30_000), "README": b""}
    created = await commit(client, "bert", files)
    doc = await get_model(client, created["model_id"])
    paths = sorted(files, key=lambda p: p.encode())
    assert [f["path"] for f in doc["files"]] == paths
    for f in doc["files"]:
        assert f == {"path": f["path"], "size_bytes": len(files[f["path"]]), "checksum": digest(files[f["path"]]),
                     "content_type": f["content_type"]}
    assert doc["files"][0]["content_type"] == "application/octet-stream"  # README: no extension
    assert next(f for f in doc["files"] if f["path"] == "config.json")["content_type"] == "application/json"
    lines = "".join(f"{hashlib.sha256(files[p]).hexdigest()} {len(files[p])} {p}\n" for p in paths)
    assert doc["snapshot_digest"] == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert doc["total_size_bytes"] == sum(map(len, files.values()))
    assert "file_metadata" not in doc and "model_size" not in doc
    (summary,) = (await listing(client))["models"]
    assert summary["size_bytes"] == doc["total_size_bytes"] and summary["file_count"] == 4
    assert summary["snapshot_digest"] == doc["snapshot_digest"]


async def test_content_type_is_kept_when_given(client):
    data = b"abc"
    await put_blob(client, data)
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a",
                                           "files": [entry("x.bin", data, content_type="application/x-custom")]})
    doc = await get_model(client, (await json_of(resp, 201))["model_id"])
    assert doc["files"][0]["content_type"] == "application/x-custom"


async def test_a_missing_blob_creates_nothing(client):
    stored, absent, other = os.urandom(5000), os.urandom(6000), os.urandom(10)
    await put_blob(client, stored)
    before = await snapshot(client)
    files = [entry("a.bin", stored), entry("b.bin", absent), entry("c.bin", absent), entry("d.bin", other)]
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a", "files": files})
    body = await json_of(resp, 422)
    assert body["error"]["code"] == "missing_blobs"
    assert body["error"]["missing"] == [digest(absent), digest(other)]
    assert await snapshot(client) == before == []
    # The blob that was there is still there (a failed commit only drops its claim) and unreferenced.
    assert await blob_exists(client, stored)
    assert (await stats(client))["storage_usage"]["total_size_bytes"] == 0


async def test_a_blob_of_another_size_is_missing(client):
    data = os.urandom(100)
    await put_blob(client, data)
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a",
                                           "files": [{**entry("a", data), "size_bytes": 99}]})
    assert (await json_of(resp, 422))["error"]["missing"] == [digest(data)]
    assert await snapshot(client) == []


async def test_commit_a_new_version_of_a_model(client):
    v1 = await commit(client, "m", {"a.txt": b"one", "b.txt": b"two"})
    resp = await client.post(model_url(v1["model_id"], "/versions"),
                             json={"files": [entry("a.txt", b"one"), entry("c.txt", b"three")]})
    assert (await json_of(resp, 422))["error"]["missing"] == [digest(b"three")]
    await put_blob(client, b"three")
    resp = await client.post(model_url(v1["model_id"], "/versions"),
                             json={"files": [entry("a.txt", b"one"), entry("c.txt", b"three")]})
    v2 = await json_of(resp, 201)
    doc = await get_model(client, v2["model_id"])
    assert doc["version"] == "v1.1" and doc["parent_model_id"] == v1["model_id"]
    assert [f["path"] for f in doc["files"]] == ["a.txt", "c.txt"]
    # Without files, a new version has no content (as before).
    v3 = await json_of(await client.post(model_url(v1["model_id"], "/versions"), json={}), 201)
    assert "files" not in await get_model(client, v3["model_id"])


async def test_dedup_across_versions_and_models(client):
    shared, a, b = os.urandom(50_000), os.urandom(1000), os.urandom(2000)
    await commit(client, "m", {"w.bin": shared, "a": a})
    # The second commit finds every blob stored but one.
    assert await missing(client, digest(shared), digest(b)) == [digest(b)]
    await commit(client, "m", {"w.bin": shared, "b": b})
    await commit(client, "other", {"same/w.bin": shared})
    # A single-file upload of the same content shares it too.
    single = await register(client, "single")
    resp = await client.put(model_url(single["model_id"], "/upload"), data=shared)
    await json_of(resp, 201)
    usage = (await stats(client))["storage_usage"]
    assert usage["total_size_bytes"] == len(shared) + len(a) + len(b)
    # Average per model with content: each model's whole size.
    per_model = [len(shared) + len(a), len(shared) + len(b), len(shared), len(shared)]
    assert usage["average_model_size_mb"] == round(sum(per_model) / 4 / 1e6, 2)


async def test_detailed_health_counts_snapshot_content(client):
    await commit(client, "m", {"a": b"12345", "b": b"6789"})
    body = await json_of(await client.get("/health/detailed"), 200)
    assert body["storage_usage"] == {"total_size_bytes": 9}


# --------------------------------------------------------------------------- path rules

BAD_PATHS = [
    ("", "empty"),
    ("/etc/passwd", "relative"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("a/./b", '"."'),
    ("a/../b", '".."'),
    ("..", '".."'),
    ("a/b\x01c", "control"),
    ("a\x7f", "control"),
    ("a\nb", "control"),
    ("a\\b", "'\\'"),
    ("c:/x", "':'"),
    ("a/b:stream", "':'"),
    ("dir./x", "dot or a space"),
    ("x/name ", "dot or a space"),
    ("x" * 256, "255 bytes"),
    ("é" * 128, "255 bytes"),  # 256 bytes in UTF-8
    ("/".join(["x" * 255] * 3 + ["x" * 254]) + "/ab", "1024 bytes"),  # 1025 bytes
    (unicodedata.normalize("NFD", "caf\u00e9"), "NFC"),
]


@pytest.mark.parametrize("path, rule", BAD_PATHS, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD_PATHS)])
async def test_each_path_rule(client, path, rule):
    await put_blob(client, b"data")
    files = [entry("ok.txt", b"data"), entry(path, b"data")]
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a", "files": files})
    err = await expect_error(resp, 400, rule, "files[1].path")
    assert err["code"] == "invalid_path"
    assert await snapshot(client) == []


async def test_the_longest_allowed_paths_pass(client):
    longest = "/".join(["x" * 255] * 3 + ["x" * 254]) + "/a"  # 1024 bytes
    assert len(longest.encode()) == 1024
    created = await commit(client, "m", {longest: b"1", "é" * 127: b"2", "a b/c.d": b"3"})
    assert {f["path"] for f in (await get_model(client, created["model_id"]))["files"]} == {
        longest, "é" * 127, "a b/c.d"}


@pytest.mark.parametrize("paths, mentions", [
    (["a.txt", "a.txt"], "the same path"),
    (["Model.bin", "model.BIN"], "case-insensitive"),
    (["STRASSE", "straße"], "case-insensitive"),  # casefold() makes ß "ss"
    (["weights", "weights/part1"], "is a file, and a folder"),
    (["A/b", "a"], "is a file, and a folder"),
])
async def test_path_conflicts(client, paths, mentions):
    await put_blob(client, b"data")
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a",
                                           "files": [entry(p, b"data") for p in paths]})
    err = await expect_error(resp, 400, mentions)
    assert err["code"] == "path_conflict"
    assert await snapshot(client) == []


async def test_too_many_files(aiohttp_client, settings):
    client = await aiohttp_client(create_app(Settings(**{**settings.__dict__, "max_files_per_version": 3})))
    await put_blob(client, b"d")
    files = [entry(f"f{i}", b"d") for i in range(4)]
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a", "files": files})
    await expect_error(resp, 400, "MAX_FILES_PER_VERSION", "at most 3")
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a", "files": files[:3]})
    await json_of(resp, 201)


@pytest.mark.parametrize("files, mentions", [
    ([], "at least one"),
    ("a", "must be a list"),
    ([{"path": "a", "size_bytes": 1}], "files[0].checksum: is required"),
    ([{"path": "a", "checksum": "sha256:" + "0" * 64, "size_bytes": -1}], "files[0].size_bytes"),
    ([{"path": "a", "checksum": "sha256:XYZ", "size_bytes": 1}], "files[0].checksum"),
    ([{"path": "a", "checksum": "sha256:" + "0" * 64, "size_bytes": 1, "file_id": "x"}], "file_id"),
])
async def test_malformed_files_are_400(client, files, mentions):
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a", "files": files})
    err = await expect_error(resp, 400, mentions)
    assert err["code"] == "validation_error"


async def test_a_multipart_registration_cannot_carry_files(client):
    import aiohttp
    import orjson

    form = aiohttp.FormData()
    form.add_field("metadata", orjson.dumps({"name": "m", "algorithm": "a", "files": [entry("a", b"x")]}).decode(),
                   content_type="application/json")
    form.add_field("file", b"x", filename="m.bin")
    await expect_error(await client.post(MODELS, data=form), 400, "files")
    assert await snapshot(client) == []


# --------------------------------------------------------------------------- replace, delete, gc


async def _age(storage, data: bytes, by: timedelta) -> None:
    """Make a blob look stored (and last asked about) ``by`` earlier, as time passing would."""
    sha256 = hashlib.sha256(data).hexdigest()
    past = clock.now() - by
    if storage.kind == "embedded":
        await storage._run(lambda: storage._db.execute(
            "UPDATE files SET uploaded_at = ?, kept_until = ? WHERE sha256 = ?",
            (clock.iso(past), clock.iso(past + Settings.blob_grace), sha256)))
    else:
        raw = await storage.files.find_one({"metadata.sha256": sha256})
        await storage.files.update_one({"_id": raw["_id"]}, {"$set": {"uploadDate": past}})
        # Its keeps are leases: each ends as it would have, BLOB_GRACE after it was taken.
        await storage.content.leases.update_many({"file_id": raw["_id"], "owner": KEEP_OWNER},
                                                 {"$set": {"until": past + Settings.blob_grace}})


async def _past_grace(client, *blobs: bytes) -> None:
    for data in blobs:
        await _age(client.app[STORAGE], data, Settings.blob_grace + timedelta(minutes=1))


async def test_upload_on_a_snapshot_replaces_its_files(client):
    only_here, shared = os.urandom(3000), os.urandom(4000)
    snap = await commit(client, "m", {"a": only_here, "b": shared})
    await commit(client, "keeper", {"s": shared})
    resp = await client.put(model_url(snap["model_id"], "/upload?filename=model.pkl"), data=b"single")
    await json_of(resp, 201)
    doc = await get_model(client, snap["model_id"])
    assert doc["file_metadata"]["filename"] == "model.pkl"
    assert doc["files"] == [{"path": "model.pkl", "size_bytes": 6, "checksum": digest(b"single"),
                             "content_type": "application/octet-stream"}]
    assert doc["total_size_bytes"] == 6
    # The old files are no longer referenced by it: only the shared one still counts.
    assert (await stats(client))["storage_usage"]["total_size_bytes"] == 6 + len(shared)
    # Both were stored through the blobs API, so they stay for BLOB_GRACE; then gc takes the unshared one.
    assert await gc(client) == []
    await _past_grace(client, only_here, shared)
    assert len(await gc(client)) == 1
    assert not await blob_exists(client, only_here)
    assert await blob_exists(client, shared)


async def test_upload_over_an_upload_releases_at_once_as_before(client):
    created = await register(client, "m")
    first, second = os.urandom(1000), os.urandom(1000)
    for data in (first, second):
        await json_of(await client.put(model_url(created["model_id"], "/upload"), data=data), 201)
    assert not await blob_exists(client, first)
    assert await blob_exists(client, second)


async def test_delete_releases_every_file_of_the_version(client):
    a, b, shared = os.urandom(100), os.urandom(200), os.urandom(300)
    v1 = await commit(client, "m", {"a": a, "s": shared})
    v2 = await commit(client, "m", {"b": b, "s": shared})
    await _past_grace(client, a, b, shared)
    assert (await client.delete(model_url(v1["model_id"]))).status == 200
    assert not await blob_exists(client, a)
    assert await blob_exists(client, shared) and await blob_exists(client, b)
    # gc does not take what v2 refers to, however old.
    assert await gc(client) == []
    assert await blob_exists(client, shared) and await blob_exists(client, b)
    assert (await stats(client))["storage_usage"]["total_size_bytes"] == 500
    resp = await client.post(f"{MODELS}/batch", json={"operation": "delete", "ids": [v2["model_id"]]})
    assert (await json_of(resp, 200))["summary"]["ok"] == 1
    assert not await blob_exists(client, shared) and not await blob_exists(client, b)
    assert (await stats(client))["storage_usage"]["total_size_bytes"] == 0


async def test_gc_removes_an_uncommitted_blob_only_after_blob_grace(client):
    storage = client.app[STORAGE]
    kept, stale, used = os.urandom(1000), os.urandom(2000), os.urandom(3000)
    for data in (kept, stale):
        await put_blob(client, data)
    await commit(client, "m", {"u": used})
    await _age(storage, kept, Settings.blob_grace - timedelta(minutes=5))
    await _age(storage, stale, Settings.blob_grace + timedelta(minutes=5))
    await _age(storage, used, Settings.blob_grace * 10)
    report = await gc(client, timedelta(hours=1))
    assert len(report) == 1, report
    assert not await blob_exists(client, stale)
    assert await blob_exists(client, kept) and await blob_exists(client, used)


async def test_a_deleted_models_blob_asked_about_again_survives_until_the_commit(client):
    """blobs/missing keeps what it reports as stored: a delete in between does not take it."""
    data = os.urandom(500)
    v1 = await commit(client, "m", {"a": data})
    assert await missing(client, digest(data)) == []
    assert (await client.delete(model_url(v1["model_id"]))).status == 200
    assert await blob_exists(client, data)
    await commit(client, "m", {"a": data}, upload=False)


async def test_concurrent_commit_and_delete_sharing_blobs(client):
    """A commit racing the delete of the version whose blob it shares: it either wins (and its blob
    stays) or fails with missing_blobs and creates nothing; never a version whose blob is gone."""
    x = b"x"
    await put_blob(client, x)
    for round_ in range(6):
        shared = os.urandom(20_000)
        first = await commit(client, f"m{round_}", {"s": shared})
        await _past_grace(client, shared)  # not kept: only a reference or the commit's claim protects it
        files = [entry("s", shared), entry("x", x)]
        deleted, committed = await asyncio.gather(
            client.delete(model_url(first["model_id"])),
            client.post(MODELS, json={"name": f"m{round_}", "algorithm": "a", "files": files}),
        )
        assert deleted.status == 200
        if committed.status == 201:
            assert await blob_exists(client, shared)
        else:
            assert (await json_of(committed, 422))["error"]["missing"] == [digest(shared)]
            assert (await listing(client, q=f"m{round_}"))["pagination"]["total"] == 0


async def test_gc_racing_commits_never_takes_a_committed_blob(client):
    """Blobs past their grace, unreferenced, committed while gc runs: the commit's claim protects them."""
    for round_ in range(6):
        blobs = [os.urandom(5000) for _ in range(4)]
        for data in blobs:
            await put_blob(client, data)
        await _past_grace(client, *blobs)
        files = [entry(f"f{i}", data) for i, data in enumerate(blobs)]
        _, committed = await asyncio.gather(
            gc(client), client.post(MODELS, json={"name": f"g{round_}", "algorithm": "a", "files": files}))
        if committed.status == 201:
            for data in blobs:
                assert await blob_exists(client, data)
        else:
            body = await json_of(committed, 422)
            assert body["error"]["code"] == "missing_blobs"
    # Whatever won each round, the registry's files are all there.
    assert (await json_of(await client.get("/health/detailed"), 200))["checks"]["model_registry"] == "healthy"


async def test_detailed_health_finds_a_snapshot_whose_content_is_gone(client):
    created = await commit(client, "m", {"a": b"first", "b": b"second"})
    storage = client.app[STORAGE]
    doc = await storage.get_model(created["model_id"])
    await _past_grace(client, b"first", b"second")
    # Remove the content under the model, as a broken restore would.
    await storage.delete_model(created["model_id"])
    for file_id in snapshots.file_ids(doc):
        assert await storage.release_file(file_id)
    await storage.insert_model(doc)
    body = await json_of(await client.get("/health/detailed"), 503)
    assert created["model_id"] in body["checks"]["model_registry"]


# --------------------------------------------------------------------------- single-file models as before


async def test_a_single_file_model_behaves_as_before(client):
    created = await register(client, "plain")
    data = os.urandom(10_000)
    resp = await client.put(model_url(created["model_id"], "/upload?filename=model.pkl"), data=data)
    fm = (await json_of(resp, 201))["file_metadata"]
    doc = await get_model(client, created["model_id"])
    assert doc["file_metadata"] == fm and doc["model_size"] == "10.0 KB"
    assert doc["files"] == [{"path": "model.pkl", "size_bytes": 10_000, "checksum": digest(data),
                             "content_type": "application/octet-stream"}]
    assert doc["snapshot_digest"] == snapshots.snapshot_digest(doc["files"])
    resp = await client.get(model_url(created["model_id"], "/download"))
    assert resp.status == 200 and await resp.read() == data
    assert resp.headers["Content-Disposition"] == 'attachment; filename="model.pkl"'
    (summary,) = (await listing(client))["models"]
    assert summary["size_bytes"] == 10_000 and summary["file_count"] == 1
    # Without content, none of the new fields appear.
    empty = await register(client, "empty")
    doc = await get_model(client, empty["model_id"])
    assert not {"files", "snapshot_digest", "total_size_bytes"} & set(doc)


async def test_a_commit_body_may_exceed_max_json_size_by_its_files_allowance(aiohttp_client, settings):
    small = Settings(**{**settings.__dict__, "max_json_size": 2000, "max_files_per_version": 40})
    client = await aiohttp_client(create_app(small))
    await put_blob(client, b"d")
    files = [entry(f"folder/file-{i:03d}.bin", b"d") for i in range(30)]  # about 3.5 KB of JSON
    resp = await client.post(MODELS, json={"name": "m", "algorithm": "a", "files": files})
    await json_of(resp, 201)
    # The allowance is for a list of files only.
    resp = await client.post(MODELS, json={"name": "n", "algorithm": "a", "description": "x" * 3000})
    assert (await expect_error(resp, 413))["code"] == "payload_too_large"
    limit = 2000 + 40 * snapshots.BODY_ALLOWANCE_PER_FILE
    resp = await client.post(MODELS, json={"name": "n", "algorithm": "a", "files": files,
                                           "description": "x" * limit})
    assert (await expect_error(resp, 413))["code"] == "payload_too_large"


async def _raw_exchange(client, head: str, body: bytes = b"") -> bytes:
    """Send a request head (and, only when the server invites it, a body); the first final response's head."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        while True:
            status_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not status_head.startswith(b"HTTP/1.1 100"):
                return status_head
            writer.write(body)
            await writer.drain()
    finally:
        writer.close()


async def test_expect_100_continue_on_a_stored_blob_answers_200_without_inviting_the_body(client):
    data = os.urandom(4000)
    await put_blob(client, data)
    head = (f"PUT {BLOBS}/{digest(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            "Expect: 100-continue\r\n\r\n")
    answer = await _raw_exchange(client, head)  # sends no body unless invited
    assert answer.startswith(b"HTTP/1.1 200"), answer
    fresh = os.urandom(3000)
    head = (f"PUT {BLOBS}/{digest(fresh)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(fresh)}\r\n"
            "Expect: 100-continue\r\n\r\n")
    assert (await _raw_exchange(client, head, fresh)).startswith(b"HTTP/1.1 201")
    assert await blob_exists(client, fresh)


async def test_a_blob_over_max_file_size_is_refused_before_its_body(aiohttp_client, settings):
    client = await aiohttp_client(create_app(Settings(**{**settings.__dict__, "max_file_size": 1000})))
    data = os.urandom(1001)
    head = (f"PUT {BLOBS}/{digest(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            "Expect: 100-continue\r\n\r\n")
    assert (await _raw_exchange(client, head)).startswith(b"HTTP/1.1 413")
    # Chunked, so no length to refuse up front: refused while streaming, and nothing kept.
    resp = await client.put(f"{BLOBS}/{digest(data)}", data=_chunks(data))
    assert (await expect_error(resp, 413))["code"] == "file_too_large"
    assert not await blob_exists(client, data)


async def _chunks(data: bytes):
    for i in range(0, len(data), 100):
        yield data[i:i + 100]


async def test_an_embedded_registry_from_before_snapshots_keeps_its_files(tmp_path):
    """Opening a registry written before model_files existed records its models' files: a release
    after the upgrade must not take content a model still refers to."""
    from app.storage.embedded import EmbeddedStorage
    from tests.test_maintenance import add_model

    store = EmbeddedStorage(str(tmp_path / "data"))
    await store.open()
    doc = await add_model(store, "old", "active", 1, os.urandom(3000))
    await store._run(lambda: store._db.executescript(
        "DROP TABLE model_files; ALTER TABLE files DROP COLUMN kept_until;"))
    await store.close()

    store = EmbeddedStorage(str(tmp_path / "data"))
    await store.open()
    try:
        assert not await store.release_file(doc["file_metadata"]["file_id"])
        assert (await store.statistics(clock.now(), clock.now())).stored_bytes == 3000
        assert await store.collect_garbage(timedelta(0), dry_run=False) == []
    finally:
        await store.close()
