"""Embedded backend specifics: its SQLite schema upgrades in place; only download counts skip the fsync."""

import asyncio
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from bson import ObjectId

from app import clock, registry
from app.storage.base import ModelQuery
from app.storage.embedded import EmbeddedStorage, _EmbeddedWriter


async def test_registry_from_before_search_text_is_upgraded(tmp_path):
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    now = clock.now()
    await store.insert_model({"id": str(ObjectId()), "name": "Churn_Model", "version": "v1.0", "algorithm": "xgboost",
                              "status": "active", "tags": ["Prod"], "description": "Predicts CHURN",
                              "created_at": now, "updated_at": now, "download_count": 0})
    await store.close()
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # as an older release left it
        db.execute("ALTER TABLE models DROP COLUMN search_text")

    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        for text in ("churn_model", "PREDICTS", "prod", "XGB"):
            _, total = await store.find_models(ModelQuery(text=text))
            assert total == 1, text
        _, total = await store.find_models(ModelQuery(text="nothing"))
        assert total == 0
    finally:
        await store.close()


async def _one_model(store: EmbeddedStorage) -> str:
    doc = registry.model_document({"name": "m", "algorithm": "x"}, "v1.0")
    await store.insert_model(doc)
    return doc["id"]


async def test_a_download_count_skips_the_fsync_and_nothing_else_does(tmp_path, monkeypatch):
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        model_id, now = await _one_model(store), clock.now()
        # The setting each statement ran under, as SQLite itself reports it.
        seen = []
        db = store._db
        monkeypatch.setattr(store, "_db", _Spy(db, seen))
        await store.record_download(model_id, now)
        await store.update_model(model_id, {"description": "after"})
        assert ("UPDATE models SET download_count", 1) in seen  # 1 = NORMAL: no fsync per commit
        assert ("UPDATE models SET", 2) in seen  # 2 = FULL for everything else
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
        doc = await store.get_model(model_id)
        assert doc["download_count"] == 1 and doc["description"] == "after"
    finally:
        await store.close()


class _Spy:
    """A connection that notes (statement start, PRAGMA synchronous) for each UPDATE."""

    def __init__(self, db, seen) -> None:
        self._db, self._seen = db, seen

    def execute(self, sql, *args):
        if sql.startswith("UPDATE models SET"):
            counting = "download_count = download_count" in sql
            prefix = "UPDATE models SET download_count" if counting else "UPDATE models SET"
            self._seen.append((prefix, self._db.execute("PRAGMA synchronous").fetchone()[0]))
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


async def test_get_model_reads_on_the_loop_and_queues_when_sqlite_is_busy(tmp_path, monkeypatch):
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        model_id, now = await _one_model(store), clock.now()
        await store.record_download(model_id, now)
        queued = []
        real_run = store._run

        async def counting_run(fn, *args):
            queued.append(fn.__name__)
            return await real_run(fn, *args)

        monkeypatch.setattr(store, "_run", counting_run)
        # What the writer thread committed, the loop's read-only connection sees at once.
        doc = await store.get_model(model_id)
        assert doc["download_count"] == 1 and queued == []
        assert await store.get_model(str(ObjectId())) is None and queued == []

        class Busy:
            def execute(self, *args):
                raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(store, "_reader", Busy())
        doc = await store.get_model(model_id)
        assert doc["download_count"] == 1 and queued == ["_get"]
        monkeypatch.undo()
    finally:
        await store.close()
    assert store._reader is None


async def test_an_upload_cancelled_while_its_bytes_are_being_written_leaves_no_temp_file(tmp_path, monkeypatch):
    """A cancelled upload task (a handler cancelled at shutdown or when its client leaves) stops
    awaiting a write whose thread still runs; discarding under that thread must not fail or be undone."""
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    entered, release = threading.Event(), threading.Event()
    real_write_batch = _EmbeddedWriter._write_batch

    def slow_write_batch(writer, batch, offset) -> None:
        entered.set()
        release.wait(10)  # the disk is slow
        real_write_batch(writer, batch, offset)

    monkeypatch.setattr(_EmbeddedWriter, "_write_batch", slow_write_batch)

    async def upload() -> None:
        async with store.file_writer() as writer:
            await writer.write(os.urandom(2 * 1024 * 1024))
            await asyncio.sleep(60)  # never reached: cancelled while writing

    try:
        task = asyncio.create_task(upload())
        assert await asyncio.to_thread(entered.wait, 10), "the write never started"
        task.cancel()
        await asyncio.sleep(0.1)  # the cancelled task discards while the write thread still runs
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert list(Path(store.tmp_dir).iterdir()) == []
    finally:
        release.set()
        await store.close()


async def test_settling_blobs_among_concurrent_writes_is_safe(tmp_path):
    # Every SQLite call runs on the one SQLite thread; nothing it made (a
    # cursor) may be left to the loop thread to finalize meanwhile.
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        stored = []
        for i in range(20):
            async with store.file_writer() as w:
                await w.write(os.urandom(100) + bytes([i]))
                stored.append(await w.commit())
        sha256s = [f.sha256 for f in stored]

        async def claim_and_settle() -> None:
            claimed = await store.claim_blobs(sha256s)
            await store.settle_files([f.file_id for f in claimed.values()])

        await asyncio.gather(*(claim_and_settle() for _ in range(300)))
        await store.settle_files([f.file_id for f in stored])
        assert all([await store.release_file(f.file_id) for f in stored])
    finally:
        await store.close()


def test_batch_writes_resume_after_a_short_pwritev(tmp_path, monkeypatch):
    """pwritev may write less than asked (a signal, a 2 GiB cap): the rest follows, in order, once."""
    from app.storage import pipeline

    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: real(fd, [memoryview(bufs[0])[:3]], offset))
    pieces = [os.urandom(10), os.urandom(1), os.urandom(7)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        pipeline.write_pieces(fd, pieces, 5)
        assert os.pread(fd, 100, 0) == b"\0" * 5 + b"".join(pieces)
    finally:
        os.close(fd)


def _open_once(data_dir: str, barrier, results) -> None:
    storage = EmbeddedStorage(data_dir)
    barrier.wait(timeout=30)
    try:
        asyncio.run(storage.open())
        results.put("ok")
    except Exception as e:  # reported to the test, which names it
        results.put(repr(e))


def test_workers_opening_one_new_database_at_once_all_start(tmp_path):
    """--workers N opens one new SQLite database from N processes at the same moment: each must start
    (switching it to WAL is not covered by busy_timeout; 1 start in 15 of 4 workers failed "locked")."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(40):
        data_dir = tmp_path / f"r{round_}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_once, args=(str(data_dir), barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        failures += [o for o in outcomes if o != "ok"]
    assert failures == []
