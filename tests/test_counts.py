"""Download counts written in batches off the downloads' path (app/counts.py), on both backends:
nothing written before a download's body, this process's reads see its own counts, a failed
write is retried and loses nothing, SIGTERM writes what is pending, COUNT_FLUSH_INTERVAL=0
writes each count before the body."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import urllib.request
from contextlib import closing
from datetime import timedelta

import orjson
import pytest
from bson import ObjectId

from app import clock
from app.appkeys import COUNTS, STORAGE
from app.counts import DownloadCounts
from app.server import create_app
from app.storage.base import StorageUnavailable, download_hour
from testkit.live_service import service_on
from tests.api_helpers import insert_model_doc

from .test_analytics import download, register, stats, upload

# Long enough that the flusher never writes during a test: what is written, settle or stop wrote.
NEVER = 3600.0


@pytest.fixture
async def batching(aiohttp_client, settings):
    return await aiohttp_client(create_app(dataclasses.replace(settings, count_flush_interval=NEVER)))


async def _model(client, model_id):
    resp = await client.get(f"/api/v1/models/{model_id}")
    assert resp.status == 200
    return await resp.json()


async def test_a_download_writes_no_count_before_its_body_and_a_read_here_sees_it(batching):
    client = batching
    model_id = await register(client, "counted")
    await upload(client, model_id, os.urandom(16 * 1024))
    for _ in range(5):
        assert await download(client, model_id) == 200
    # Off the download's path: nothing stored yet, all of it pending in this process.
    assert (await client.app[STORAGE].get_model(model_id))["download_count"] == 0
    assert client.app[COUNTS].pending == 5
    # Read your own counts: every answer that shows them writes what is pending first.
    assert (await _model(client, model_id))["download_count"] == 5
    assert client.app[COUNTS].pending == 0
    assert await download(client, model_id) == 200
    listed = await (await client.get("/api/v1/models")).json()
    assert [m["download_count"] for m in listed["models"]] == [6]
    assert await download(client, model_id) == 200
    body = await stats(client)
    assert (body["total_downloads"], body["recent_activity"]["downloads_last_24_hours"]) == (7, 7)
    assert await download(client, model_id) == 200
    popular = await (await client.get("/api/v1/models/popular")).json()
    assert [m["download_count"] for m in popular["models"]] == [8]
    assert await download(client, model_id) == 200
    by_name = await (await client.get("/api/v1/models/by-name/counted")).json()
    assert by_name["download_count"] == 9
    assert await download(client, model_id) == 200
    updated = await (await client.put(f"/api/v1/models/{model_id}", json={"tags": ["x"]})).json()
    assert updated["model"]["download_count"] == 10


async def test_count_flush_interval_zero_writes_each_count_before_the_body(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, count_flush_interval=0)))
    model_id = await register(client, "counted")
    await upload(client, model_id, os.urandom(1000))
    for n in (1, 2, 3):
        assert await download(client, model_id) == 200
        assert (await client.app[STORAGE].get_model(model_id))["download_count"] == n
        assert client.app[COUNTS].pending == 0
    body = await stats(client)
    assert (body["total_downloads"], body["recent_activity"]["downloads_last_24_hours"]) == (3, 3)


async def test_a_failed_write_is_retried_and_loses_nothing(storage, monkeypatch):
    a = await insert_model_doc(storage, "a")
    b = await insert_model_doc(storage, "b")
    counts = DownloadCounts(storage, NEVER)
    now = clock.now()
    earlier = now - timedelta(hours=1)
    for model_id, at in [(a, now), (a, now), (b, now), (a, earlier)]:
        await counts.add(model_id, at)

    real = storage.record_downloads
    attempts = []

    async def failing(tallies):
        attempts.append(dict(tallies))
        raise StorageUnavailable("store down for the test")

    monkeypatch.setattr(storage, "record_downloads", failing)
    assert await counts.flush() is False
    assert attempts == [{(a, download_hour(now)): 2, (b, download_hour(now)): 1, (a, download_hour(earlier)): 1}]
    assert counts.pending == 4
    await counts.add(b, now)  # while the store is down
    monkeypatch.setattr(storage, "record_downloads", real)
    assert await counts.flush() is True
    assert counts.pending == 0
    assert (await storage.get_model(a))["download_count"] == 3
    assert (await storage.get_model(b))["download_count"] == 2
    s = await storage.statistics(now - timedelta(days=1), download_hour(now) - timedelta(hours=23))
    assert s.downloads_by_hour == {download_hour(now): 4, download_hour(earlier): 1}
    assert await counts.flush() is True  # nothing pending: nothing written twice
    assert (await storage.get_model(a))["download_count"] == 3


async def test_the_backlog_of_a_failing_store_is_bounded(storage, monkeypatch):
    monkeypatch.setattr("app.counts.MAX_PENDING", 2)
    counts = DownloadCounts(storage, NEVER)
    ids = [str(ObjectId()) for _ in range(3)]
    now = clock.now()
    for model_id in ids + ids[:1]:
        await counts.add(model_id, now)
    # The third pair is dropped; a pair already waiting still adds up.
    assert counts._pending == {(ids[0], download_hour(now)): 2, (ids[1], download_hour(now)): 1}


def _stored_count(backend, data_dir, mongo, db_name, model_id) -> int:
    """The model's download_count as stored, read beside the service (no settle of its counts)."""
    if backend == "embedded":
        with closing(sqlite3.connect(f"file:{data_dir / 'registry.sqlite3'}?mode=ro", uri=True)) as db:
            return db.execute("SELECT download_count FROM models WHERE id = ?", (model_id,)).fetchone()[0]
    with mongo.sync_client() as c:
        return c[db_name]["models"].find_one({"_id": ObjectId(model_id)})["download_count"]


def test_sigterm_writes_the_pending_counts(request, backend, tmp_path):
    n = 7
    with service_on(request, backend, tmp_path, "t_counts", COUNT_FLUSH_INTERVAL=str(NEVER)) as (
            service, data_dir, mongo, db_name):
        def call(method, path, body=None, headers=None):
            req = urllib.request.Request(service.url + path, data=body, method=method, headers=headers or {})
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.read()

        model_id = orjson.loads(call("POST", "/api/v1/models", orjson.dumps({"name": "m", "algorithm": "x"}),
                                     {"Content-Type": "application/json"}))["model_id"]
        call("PUT", f"/api/v1/models/{model_id}/upload?filename=m.bin", os.urandom(16 * 1024))
        for _ in range(n):
            call("GET", f"/api/v1/models/{model_id}/download")
        assert _stored_count(backend, data_dir, mongo, db_name, model_id) == 0  # all pending in the service
        assert service.stop() == 0  # SIGTERM
        assert _stored_count(backend, data_dir, mongo, db_name, model_id) == n
        service.start()
        assert orjson.loads(call("GET", f"/api/v1/models/{model_id}"))["download_count"] == n


def test_this_hour_is_the_start_of_the_current_utc_hour_and_moves_on_at_its_end(monkeypatch):
    at = clock.now()
    assert clock.this_hour() == download_hour(at)  # the hour did not turn in between: run again if it did
    start = 1_796_000_400.0  # a whole UTC hour (2026-11-30 01:00)
    for t, hour in ((start + 3599.999, start), (start + 3600, start + 3600), (start - 0.5, start - 3600),
                    (start + 7200.25, start + 7200)):
        monkeypatch.setattr(clock, "time", lambda t=t: t)
        got = clock.this_hour()
        assert got.timestamp() == hour and got.tzinfo is not None and download_hour(got) is got
