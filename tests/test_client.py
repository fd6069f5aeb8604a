"""The Python client (tensorfleet_client) against the service as a real process, on both backends.

Plus a few tests against a small fake service for what the real one never
does on demand: 429/503 with Retry-After, and a response cut off mid-body.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import orjson
import pytest
from aiohttp import web
from tensorfleet_client import (
    AsyncModelServiceClient,
    BadRequest,
    ChecksumMismatch,
    ConnectionFailed,
    ModelServiceClient,
    NotFound,
    RetryPolicy,
    ServiceUnavailable,
)
from tensorfleet_client import download as dl

from tests.client_helpers import live, sha256_of, unique, write_random  # noqa: F401  (live is a fixture)

FAST_RETRIES = RetryPolicy(attempts=4, backoff=0.01)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


async def test_push_then_download_is_byte_identical(live, tmp_path):
    src = tmp_path / "weights.pkl"
    digest = write_random(src, 3_000_000 + 17)
    name = unique("roundtrip")
    async with AsyncModelServiceClient(live.url, api_key="secret") as client:
        model_id = await client.push(src, name=name, algorithm="random_forest", metrics={"accuracy": 0.91},
                                     hyperparameters={"n_estimators": 150}, tags=["churn"])
        doc = await client.get_model(model_id)
        assert doc["version"] == "v1.0" and doc["metrics"] == {"accuracy": 0.91}
        assert doc["file_metadata"]["checksum"] == f"sha256:{digest}"
        assert doc["file_metadata"]["filename"] == "weights.pkl"

        # By id to a file, by name into a directory (the server's file name).
        by_id = await client.download(model_id, tmp_path / "by-id.bin")
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        by_name = await client.download(name, out_dir)

    assert by_id.path.read_bytes() == src.read_bytes()
    assert by_name.path == out_dir / "weights.pkl"
    assert sha256_of(by_name.path) == digest
    for r in (by_id, by_name):
        assert (r.model_id, r.version, r.size, r.sha256) == (model_id, "v1.0", src.stat().st_size, digest)
        assert r.bytes_transferred == r.size and r.resumed_bytes == 0 and r.parallel == 1
    assert leftovers(tmp_path) == [] and leftovers(out_dir) == []


def test_sync_client_registry_calls(live, tmp_path):
    src = tmp_path / "m.bin"
    write_random(src, 100_000)
    other = tmp_path / "m2.bin"
    write_random(other, 50_000)
    name = unique("registry")
    with ModelServiceClient(live.url) as client:
        first = client.register_model({"name": name, "algorithm": "xgboost", "metrics": {"accuracy": 0.8}})
        fm = client.upload(first, src)
        assert fm["size_bytes"] == 100_000 and fm["filename"] == "m.bin"
        second = client.push(other, name=name, algorithm="xgboost", metrics={"accuracy": 0.9}, breaking_changes=True)

        assert client.latest(name)["id"] == second
        assert [v["version"] for v in client.list_versions(name)] == ["v2.0", "v1.0"]
        assert client.get_by_name(name, "v1.0")["id"] == first
        found = client.search_models(q=name, sort="-metrics.accuracy")
        assert [m["id"] for m in found] == [second, first]
        assert [m["id"] for m in client.search_models(q=name, min_accuracy=0.85)] == [second]

        updated = client.update_model(first, status="deprecated", tags=["old"])
        assert updated["status"] == "deprecated" and updated["tags"] == ["old"]
        assert client.file_info(first)["size_bytes"] == 100_000

        client.delete_model(first)
        with pytest.raises(NotFound) as e:
            client.get_model(first)
        assert e.value.status == 404 and e.value.code == "not_found" and first in e.value.message
        with pytest.raises(BadRequest) as e:
            client.register_model({"name": "bad name!", "algorithm": "x"})
        assert e.value.code == "validation_error" and "name" in e.value.message


async def test_download_errors_carry_the_servers_code(live, tmp_path):
    async with AsyncModelServiceClient(live.url) as client:
        model_id = await client.register_model(name=unique("nofile"), algorithm="x")
        with pytest.raises(NotFound) as e:
            await client.download(model_id, tmp_path / "x.bin")
        assert e.value.code == "no_file"
        with pytest.raises(NotFound) as e:
            await client.download("0123456789abcdef01234567", tmp_path / "x.bin")
        assert e.value.code == "not_found"
        with pytest.raises(NotFound):
            await client.download(unique("missing"), tmp_path / "x.bin", version="v9.9")
    assert list(tmp_path.iterdir()) == []


async def test_interrupted_parallel_download_resumes(live, tmp_path):
    src = tmp_path / "src.bin"
    digest = write_random(src, 6_000_000)
    target = tmp_path / "out.bin"
    async with AsyncModelServiceClient(live.url) as client:
        model_id = await client.push(src, name=unique("resume"), algorithm="x")

        got_some = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= 1_500_000:
                got_some.set()

        task = asyncio.create_task(client.download(model_id, target, parallel=4, limit_rate=3_000_000,
                                                   progress=progress))
        await asyncio.wait_for(got_some.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not target.exists()
        state = orjson.loads(target.with_name("out.bin.part.json").read_bytes())
        assert len(state["segments"]) == 4
        saved = sum(done for _, _, done in state["segments"])
        assert saved >= 1_000_000

        result = await client.download(model_id, target)
    assert result.resumed_bytes == saved
    assert result.bytes_transferred == 6_000_000 - saved
    assert result.parallel == 4
    assert sha256_of(target) == digest
    assert leftovers(tmp_path) == []


async def test_file_replaced_between_requests_starts_over(live, tmp_path):
    """If-Range: a partial download of the old file is not completed with the new one."""
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    write_random(old, 2_000_000)
    new_digest = write_random(new, 2_500_000)
    target = tmp_path / "out.bin"
    async with AsyncModelServiceClient(live.url) as client:
        model_id = await client.push(old, name=unique("replaced"), algorithm="x")
        _, stale = await client.probe(model_id)
        # Half of the old file, left behind by an interrupted download.
        target.with_name("out.bin.part").write_bytes(old.read_bytes()[:1_000_000])
        target.with_name("out.bin.part.json").write_bytes(orjson.dumps({
            "format": 1, "etag": stale.etag, "size": stale.size, "segments": [[0, stale.size, 1_000_000]]}))
        await client.upload(model_id, new)

        since = live.log_offset()
        result = await dl.download_file(client.transport, stale, target)
    # The resumed range was refused (200, not 206) and the new file fetched whole.
    # (Sorted: the log has each request when its response ends, and the
    # refused one, abandoned by the client, can end after the other.)
    gets = [status for method, _, status in live.requests(since, model_id) if method == "GET"]
    assert sorted(gets) == [200, 206]
    assert result.sha256 == new_digest and result.resumed_bytes == 0
    assert sha256_of(target) == new_digest


async def test_two_downloads_to_one_target_take_turns(live, tmp_path):
    """The second waits on the first's lock file instead of writing into its .part; nothing is left after."""
    src = tmp_path / "src.bin"
    digest = write_random(src, 3_000_000)
    target = tmp_path / "out.bin"
    async with AsyncModelServiceClient(live.url) as client:
        model_id = await client.push(src, name=unique("turns"), algorithm="x")
        halfway = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= 1_000_000:
                halfway.set()

        first = asyncio.create_task(client.download(model_id, target, limit_rate=2_000_000, progress=progress))
        await asyncio.wait_for(halfway.wait(), 30)
        assert target.with_name("out.bin.part.lock").exists()
        second = await client.download(model_id, target, overwrite=True)
        assert first.done()
        first = first.result()
    # Each took the whole file from the network: the second did not resume from the first's bytes.
    assert (first.resumed_bytes, first.bytes_transferred) == (0, 3_000_000)
    assert (second.resumed_bytes, second.bytes_transferred) == (0, 3_000_000)
    assert sha256_of(target) == digest
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("parallel", [1, 2])
async def test_tampered_file_raises_checksum_mismatch_and_leaves_nothing(live, tmp_path, parallel):
    src = tmp_path / "src.bin"
    digest = write_random(src, 3_000_000)
    out = tmp_path / "out"
    out.mkdir()
    async with AsyncModelServiceClient(live.url) as client:
        model_id = await client.push(src, name=unique("tampered"), algorithm="x")
        live.tamper(digest)
        with pytest.raises(ChecksumMismatch) as e:
            await client.download(model_id, out / "model.bin", parallel=parallel)
    assert e.value.expected == digest and e.value.actual != digest
    assert list(out.iterdir()) == []


async def test_fetch_revalidates_with_one_request_and_a_304(live, tmp_path):
    cache = tmp_path / "cache"
    v1, v2 = tmp_path / "v1.bin", tmp_path / "v2.bin"
    d1 = write_random(v1, 1_000_000)
    d2 = write_random(v2, 1_200_000)
    name = unique("cached")
    async with AsyncModelServiceClient(live.url) as client:
        await client.push(v1, name=name, algorithm="x")
        first = await client.fetch_result(name, cache_dir=cache)
    assert not first.cached and first.bytes_transferred == 1_000_000
    assert first.path == cache / name / "v1.0" / "v1.bin" and sha256_of(first.path) == d1

    # A restarted inference server: a new client, a warm cache.
    since = live.log_offset()
    async with AsyncModelServiceClient(live.url) as client:
        path = await client.fetch(name, cache_dir=cache)
        assert client.request_count == 1
    assert path == first.path
    assert live.requests(since) == [("HEAD", f"/api/v1/models/by-name/{name}/download", 304)]

    # A new version: downloaded once, then current again.
    with ModelServiceClient(live.url) as client:
        client.push(v2, name=name, algorithm="x")
        second = client.fetch_result(name, cache_dir=cache)
        assert not second.cached and second.version == "v1.1" and sha256_of(second.path) == d2
        again = client.fetch_result(name, cache_dir=cache)
        assert again.cached and again.path == second.path and again.bytes_transferred == 0
        # The older version is still cached under its own number.
        old = client.fetch_result(name, "v1.0", cache_dir=cache)
        assert old.cached and old.path == first.path

    # The service unreachable: an error, unless a stale copy will do.
    offline = AsyncModelServiceClient("http://127.0.0.1:9", retry=RetryPolicy(attempts=1))
    async with offline:
        with pytest.raises(ConnectionFailed):
            await offline.fetch(name, cache_dir=cache)
        stale = await offline.fetch_result(name, cache_dir=cache, allow_stale=True)
    assert stale.stale and stale.path == second.path and stale.version == "v1.1"

    # A cached copy changed on disk is not trusted: it is downloaded again.
    first.path.write_bytes(b"corrupted")
    with ModelServiceClient(live.url) as client:
        repaired = client.fetch_result(name, "v1.0", cache_dir=cache)
    assert not repaired.cached and sha256_of(repaired.path) == d1


async def test_fetch_learns_of_a_new_version_with_identical_content_from_the_304(live, tmp_path):
    cache = tmp_path / "cache"
    src = tmp_path / "weights.bin"
    digest = write_random(src, 300_000)
    name = unique("same")
    async with AsyncModelServiceClient(live.url) as client:
        await client.push(src, name=name, algorithm="x")
        first = await client.fetch_result(name, cache_dir=cache)
        # Retrained to the same bytes: a new version, the same ETag.
        await client.push(src, name=name, algorithm="x")

    since = live.log_offset()
    async with AsyncModelServiceClient(live.url) as client:
        now = await client.fetch_result(name, cache_dir=cache)
        assert client.request_count == 1
    assert live.requests(since) == [("HEAD", f"/api/v1/models/by-name/{name}/download", 304)]
    assert now.cached and now.bytes_transferred == 0
    assert (now.version, now.path) == ("v1.1", cache / name / "v1.1" / "weights.bin")
    assert now.model_id != first.model_id and sha256_of(now.path) == digest
    assert os.path.samefile(now.path, first.path)  # one copy of the bytes

    with ModelServiceClient(live.url) as client:
        again = client.fetch_result(name, cache_dir=cache)
        pinned = client.fetch_result(name, "v1.0", cache_dir=cache)
    assert (again.cached, again.version, again.model_id) == (True, "v1.1", now.model_id)
    assert (pinned.cached, pinned.version, pinned.model_id, pinned.path) == (True, "v1.0", first.model_id, first.path)


def test_a_parallel_download_is_cut_into_pieces_in_file_order():
    size = 1_000_000_000
    pieces = dl.split(size, 4)
    # Pieces tile the file in order, none over MAX_SEGMENT, each boundary on 64 KiB.
    assert pieces[0].start == 0 and pieces[-1].end == size
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    assert max(p.end - p.start for p in pieces) == dl.MAX_SEGMENT and len(pieces) == 60
    assert all(p.start % (64 * 1024) == 0 for p in pieces)
    # A small file: one piece per connection, as before.
    assert [(p.start, p.end) for p in dl.split(3_000_000, 2)] == [(0, 1_507_328), (1_507_328, 3_000_000)]
    assert [(p.start, p.end) for p in dl.split(size, 1)] == [(0, size)]
    # Connections: as asked, else by size; a resumed download keeps its own number (at most the default).
    assert dl.connections(8, size, pieces) == 8 and dl.connections(None, size, []) == dl.DEFAULT_PARALLEL
    assert dl.connections(None, 3_000_000, dl.split(3_000_000, 2)) == 2
    assert dl.connections(None, size, pieces) == dl.DEFAULT_PARALLEL


# -- against a fake service: retries ----------------------------------------


async def test_retries_503_and_429_honouring_retry_after(aiohttp_server):
    calls: list[float] = []

    async def model(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        assert request.headers.get("X-API-Key") == "key-1"
        if len(calls) == 1:
            return web.json_response({"error": {"code": "storage_unavailable", "message": "later"}}, status=503,
                                     headers={"Retry-After": "0"})
        if len(calls) == 2:
            return web.json_response({"error": {"code": "rate_limited", "message": "slow down"}}, status=429,
                                     headers={"Retry-After": "1"})
        return web.json_response({"id": request.match_info["id"]})

    async def register(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        return web.json_response({"error": {"code": "storage_unavailable", "message": "down"}}, status=503)

    app = web.Application()
    app.router.add_get("/api/v1/models/{id}", model)
    app.router.add_post("/api/v1/models", register)
    server = await aiohttp_server(app)
    async with AsyncModelServiceClient(str(server.make_url("")), "key-1", retry=FAST_RETRIES) as client:
        assert (await client.get_model("a" * 24))["id"] == "a" * 24
        assert len(calls) == 3 and calls[2] - calls[1] >= 0.9  # waited as Retry-After said
        # A registration that reached the service is never sent twice.
        calls.clear()
        with pytest.raises(ServiceUnavailable) as e:
            await client.register_model(name="x", algorithm="y")
        assert len(calls) == 1 and e.value.code == "storage_unavailable" and e.value.status == 503


async def test_download_cut_mid_body_continues_from_where_it_stopped(aiohttp_server, tmp_path):
    data = os.urandom(3_000_000)
    sha = hashlib.sha256(data).hexdigest()
    seen: list[str | None] = []
    headers = {"ETag": f'"{sha}"', "X-File-Checksum": f"sha256:{sha}", "X-Model-Id": "b" * 24,
               "X-Model-Name": "fake", "X-Model-Version": "v1.0", "Accept-Ranges": "bytes",
               "Content-Disposition": 'attachment; filename="../../evil.bin"'}

    async def download(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            resp = web.StreamResponse(headers=headers)
            resp.content_length = len(data)
            await resp.prepare(request)
            return resp
        seen.append(request.headers.get("Range"))
        assert request.headers.get("If-Range") == f'"{sha}"'
        first, last = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        resp = web.StreamResponse(status=206, headers={**headers, "Content-Range": f"bytes {first}-{last}/{len(data)}"})
        resp.content_length = last - first + 1
        await resp.prepare(request)
        if len(seen) == 1:
            await resp.write(data[first:first + 1_000_000])
            request.transport.close()  # the rest never comes
            return resp
        await resp.write(data[first:last + 1])
        return resp

    app = web.Application()
    app.router.add_get("/api/v1/models/{id}/download", download)
    server = await aiohttp_server(app)
    async with AsyncModelServiceClient(str(server.make_url("")), retry=FAST_RETRIES) as client:
        result = await client.download("b" * 24, tmp_path)
    assert seen == ["bytes=0-2999999", "bytes=1000000-2999999"]
    assert result.path == tmp_path / "fake-v1.0"  # the server's name is not a plain file name
    assert result.path.read_bytes() == data and result.bytes_transferred == 3_000_000


def _record_part_fsyncs(monkeypatch) -> list[tuple[str, bool]]:
    """Every fsync of a ``.part`` file from now on: (the file synced, whether its final name existed already)."""
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".part"):
            synced.append((path, os.path.exists(path.removesuffix(".part"))))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


async def test_a_plain_download_does_not_wait_for_the_disk_but_the_cache_and_durable_do(live, tmp_path, monkeypatch):
    """README, Client: `pull -o` skips the fsync (as curl does); the cache and ``durable=True`` fsync the
    verified file before it appears under its name."""
    src = tmp_path / "src.bin"
    write_random(src, 2_000_000)
    synced = _record_part_fsyncs(monkeypatch)
    async with AsyncModelServiceClient(live.url) as client:
        name = unique("durable")
        model_id = await client.push(src, name=name, algorithm="x")
        plain = await client.download(model_id, tmp_path / "plain.bin")
        assert plain.path.read_bytes() == src.read_bytes()
        assert synced == []

        durable = await client.download(model_id, tmp_path / "durable.bin", durable=True)
        assert synced == [(str(durable.path) + ".part", False)]

        synced.clear()
        cached = await client.fetch(name, cache_dir=tmp_path / "cache")
        assert synced == [(str(cached) + ".part", False)]


def test_pull_fsync_on_the_command_line_syncs_before_the_rename(live, tmp_path, monkeypatch):
    from tensorfleet_client import cli

    src = tmp_path / "src.bin"
    write_random(src, 1_000_000)
    with ModelServiceClient(live.url) as client:
        model_id = client.push(src, name=unique("cli-fsync"), algorithm="x")
    synced = _record_part_fsyncs(monkeypatch)
    out = tmp_path / "plain.bin"
    assert cli.main(["pull", model_id, "--url", live.url, "--no-progress", "-o", str(out)]) == 0
    assert synced == [] and out.read_bytes() == src.read_bytes()
    out = tmp_path / "synced.bin"
    assert cli.main(["pull", model_id, "--url", live.url, "--no-progress", "--fsync", "-o", str(out)]) == 0
    assert synced == [(str(out) + ".part", False)] and out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("parallel", [1, 4])
async def test_the_hash_follows_the_download_in_whole_blocks(live, tmp_path, monkeypatch, parallel):
    """The hasher hands the thread whole HASH_BLOCKs until the last byte is in, not each piece as it lands:
    every hop wakes two threads (1158 hops for 1 GB in one stream before, 6x the context switches)."""
    block = 1024 * 1024
    monkeypatch.setattr(dl, "HASH_BLOCK", block)
    monkeypatch.setattr(dl, "MAX_SEGMENT", 2 * block)
    hashed: list[int] = []
    real = dl._Job._hash_block

    def counting(self, h, start, end):
        hashed.append(end - start)
        return real(self, h, start, end)

    monkeypatch.setattr(dl._Job, "_hash_block", counting)
    src = tmp_path / "src.bin"
    size = 8 * block + 12345
    write_random(src, size)
    async with AsyncModelServiceClient(live.url) as client:
        model_id = await client.push(src, name=unique("hashblocks"), algorithm="x")
        result = await client.download(model_id, tmp_path / "out.bin", parallel=parallel)
    assert result.path.read_bytes() == src.read_bytes()
    assert sum(hashed) == size
    # Every hop but the last (the rest once the download is complete) hashes a whole block.
    assert all(n == block for n in hashed[:-1]), hashed
