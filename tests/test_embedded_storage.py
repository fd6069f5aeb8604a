"""Embedded backend specifics: its SQLite schema upgrades in place; only download counts and leases skip
the fsync; register and release of one content are atomic across worker processes."""

import asyncio
import os
import sqlite3
import threading
import time
from datetime import timedelta
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


async def test_download_counts_and_leases_skip_the_fsync_and_nothing_else_does(tmp_path, monkeypatch):
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        model_id, now = await _one_model(store), clock.now()
        async with store.file_writer() as w:
            await w.write(b"leased bytes")
            stored = await w.commit()
        # Each write, the connection it ran on, and its setting as SQLite itself reports it.
        seen = []
        for name in ("_db", "_fast", "_on_loop"):
            monkeypatch.setattr(store, name, _Spy(getattr(store, name), name, seen))
        await store.record_download(model_id, now)
        leases = await store.lease_files([stored.file_id], "test", now + timedelta(minutes=1))
        await store.renew_leases(list(leases.values()), now + timedelta(minutes=2))
        await store.update_model(model_id, {"description": "after"})
        await store.settle_file(stored.file_id)
        assert await store.release_file(stored.file_id) is False  # leased: remembered
        assert await store.drop_leases(list(leases.values())) == [stored.file_id]
        writes = {statement: (connection, synchronous) for connection, statement, synchronous in seen}
        # 1 = NORMAL: no fsync per commit, 2 = FULL for everything else.
        assert writes["UPDATE content_leases SET"] == ("_fast", 1)
        # A download's count, its lease and its drop run on the loop's own connection (not busy here).
        assert writes["UPDATE models SET download_count"] == ("_on_loop", 1)
        assert writes["INSERT INTO content_leases"] == ("_on_loop", 1)
        assert writes["DELETE FROM content_leases WHERE id"] == ("_on_loop", 1)
        for statement in ("UPDATE models SET", "UPDATE files SET", "INSERT OR IGNORE INTO content_pending",
                          "DELETE FROM files WHERE file_id"):
            assert writes[statement] == ("_db", 2), statement
        assert all(synchronous == (2 if connection == "_db" else 1) for connection, _, synchronous in seen)
        doc = await store.get_model(model_id)
        assert doc["download_count"] == 1 and doc["description"] == "after"
        assert await store.file_info(stored.file_id) is None
    finally:
        await store.close()


class _Spy:
    """A connection that notes (its name, the write's first words, PRAGMA synchronous) for each write."""

    def __init__(self, db, name, seen) -> None:
        self._db, self._name, self._seen = db, name, seen

    def execute(self, sql, *args):
        self._note(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._note(sql)
        return self._db.executemany(sql, *args)

    def _note(self, sql):
        if sql.startswith(("UPDATE", "INSERT", "DELETE")):
            words = sql.split("(")[0].split()
            if sql.startswith(("UPDATE models SET download_count", "INSERT OR IGNORE", "DELETE")):
                words = words[:5 if sql.startswith(("INSERT", "DELETE")) else 4]
            else:
                words = words[:3]
            self._seen.append((self._name, " ".join(words),
                               self._db.execute("PRAGMA synchronous").fetchone()[0]))

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


CONTENT = b"the same bytes, committed by two worker processes" * 100


async def _commit(store: EmbeddedStorage):
    async with store.file_writer() as w:
        await w.write(CONTENT)
        return await w.commit()


def _release_in_a_loop(data_dir: str, started, releases, failures, stop) -> None:
    """A worker that commits CONTENT, settles and releases it, round after round, on a disk where
    removing a blob takes a while (so any gap between a release's COMMIT and its unlink is wide)."""
    real_unlink = Path.unlink
    blobs = str(Path(data_dir) / "blobs")

    def slow_unlink(self, missing_ok=False):
        if str(self).startswith(blobs):
            time.sleep(0.02)
        return real_unlink(self, missing_ok=missing_ok)

    Path.unlink = slow_unlink

    async def run() -> None:
        store = EmbeddedStorage(data_dir)
        await store.open()
        try:
            started.set()
            while not stop.is_set():
                try:
                    stored = await _commit(store)
                    await store.settle_file(stored.file_id)
                    await store.release_file(stored.file_id)
                except Exception as e:
                    failures.put(repr(e))
                with releases.get_lock():
                    releases.value += 1
        finally:
            await store.close()

    asyncio.run(run())


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


async def test_a_release_in_another_worker_never_removes_content_a_commit_just_stored(tmp_path):
    """Worker A releases content while worker B commits the same bytes: B's commit (claimed) keeps
    its blob. A release that unlinked after its COMMIT removed the blob B had just put in place."""
    import multiprocessing

    # spawn: a forked child would inherit thread pools (pipeline.threads) without their threads.
    ctx = multiprocessing.get_context("spawn")
    started, stop, releases, failures = ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    releaser = ctx.Process(target=_release_in_a_loop, args=(str(tmp_path), started, releases, failures, stop))
    releaser.start()
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        assert await asyncio.to_thread(started.wait, 30)
        lost = 0
        for _ in range(40):
            try:
                stored = await _commit(store)
            except Exception as e:
                failures.put(f"this worker: {e!r}")
                continue
            if stored is None:  # the row it counted its claim on went between its look and its claim
                failures.put("this worker: a commit returned no stored file")
                continue
            # Claimed: no release may remove it now (nor a commit put another copy in its place).
            blob = _inode(store.blob_path(stored.sha256))
            # Let the other worker release twice first.
            seen, deadline = releases.value, time.monotonic() + 10
            while releases.value < seen + 2:
                assert releaser.is_alive() and time.monotonic() < deadline, "the releasing worker stopped"
                await asyncio.sleep(0.001)
            if blob is None or _inode(store.blob_path(stored.sha256)) != blob \
                    or await store.file_info(stored.file_id) is None:
                lost += 1
            await store.settle_file(stored.file_id)
    finally:
        stop.set()
        await asyncio.to_thread(releaser.join, 30)
        await store.close()
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert (lost, errors[:3]) == (0, []), f"{lost} of 40 committed (claimed) contents lost their blob to a release"
    assert releaser.exitcode == 0


async def test_a_lease_taken_while_another_writer_holds_the_database_queues_for_it(tmp_path):
    """Leases, drops and download counts run on the loop's own connection, which never waits: busy, they queue for
    the SQLite thread (which waits for the lock) instead of failing."""
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    blocker = sqlite3.connect(tmp_path / "registry.sqlite3", isolation_level=None, check_same_thread=False)
    try:
        stored = await _commit(store)
        blocker.execute("BEGIN IMMEDIATE")  # another worker's write transaction
        leasing = asyncio.ensure_future(store.lease_files([stored.file_id], "t", clock.now() + timedelta(minutes=1)))
        await asyncio.sleep(0)
        blocker.execute("COMMIT")
        leases = await asyncio.wait_for(leasing, 10)
        assert list(leases) == [stored.file_id]
        blocker.execute("BEGIN IMMEDIATE")
        dropping = asyncio.ensure_future(store.drop_leases(list(leases.values())))
        await asyncio.sleep(0)
        blocker.execute("COMMIT")
        assert await asyncio.wait_for(dropping, 10) == []
        assert blocker.execute("SELECT count(*) FROM content_leases").fetchone()[0] == 0
        # A download's count likewise.
        model_id = await _one_model(store)
        blocker.execute("BEGIN IMMEDIATE")
        counting = asyncio.ensure_future(store.record_download(model_id, clock.now()))
        await asyncio.sleep(0)
        blocker.execute("COMMIT")
        await asyncio.wait_for(counting, 10)
        assert (await store.get_model(model_id))["download_count"] == 1
    finally:
        blocker.close()
        await store.close()


async def test_leases_and_drops_alone_keep_the_wal_bounded(tmp_path):
    """A download's lease, count and drop commit on the loop's connection, which never checkpoints
    (uncounted downloads, ranges after byte 0, only the lease and the drop): the SQLite thread must,
    or the WAL grows without end (and every read with it)."""
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        stored = await _commit(store)
        until = clock.now() + timedelta(minutes=1)
        model_id = await _one_model(store)
        for _ in range(2000):  # a counted download's three commits
            leases = await store.lease_files([stored.file_id], "t", until)
            await store.record_download(model_id, until)
            assert await store.drop_leases(list(leases.values())) == []
        await store.ping()  # runs after any checkpoint already queued for the SQLite thread
        wal = tmp_path / "registry.sqlite3-wal"
        # 6,000 commits of a few pages each: tens of MB had nothing checkpointed.
        assert (await store.get_model(model_id))["download_count"] == 2000
        assert wal.stat().st_size < 12 * 1024 * 1024, wal.stat().st_size
    finally:
        await store.close()
