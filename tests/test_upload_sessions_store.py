"""The upload-session half of the storage interface, on both backends, below HTTP.

A session's bytes survive between requests (and processes): each request
appends through a SessionWriter that holds the session's write lock and ends in
a checkpoint (the bytes count), a commit (the content becomes stored content)
or a cancel (the offset stays where it was).
"""

import asyncio
import hashlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from bson import ObjectId
from pymongo.errors import AutoReconnect

from app import clock
from app.storage import DEFAULT_CHUNK_SIZE, make_storage
from app.storage.base import SESSION_LOCK_TTL, SessionBusy, SessionMissing, StorageUnavailable, UploadSession
from tests.support import deadlines
from tests.test_storage_files import read_all, store
from tests.transfer_helpers import leftovers

CS = DEFAULT_CHUNK_SIZE
MiB = 1024 * 1024
BOUND = 120  # seconds: no test here may hang


bounded = deadlines.bounded(BOUND)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def new_session(storage, owner: str = "", size_bytes=None, checksum=None, at=None) -> UploadSession:
    at = at or clock.now()
    session = UploadSession(str(ObjectId()), owner, 0, size_bytes, checksum, CS, at, at)
    await storage.open_session(session)
    return session


async def append(storage, session_id: str, data: bytes, piece: int = 100_003) -> UploadSession:
    """One request: write ``data`` in pieces, then checkpoint."""
    async with storage.session_writer(session_id) as w:
        for i in range(0, len(data), piece):
            await w.write(data[i:i + piece])
        return await w.checkpoint()


async def commit(storage, session_id: str, last: bytes = b""):
    async with storage.session_writer(session_id) as w:
        await w.write(last)
        stored = await w.commit()
    await storage.settle_file(stored.file_id)
    return stored


async def session_bytes(storage, session_id: str) -> int:
    """Bytes the store holds for this session outside its record (chunks, or its file)."""
    if storage.kind == "mongodb":
        total = 0
        async for c in storage.chunks.find({"files_id": ObjectId(session_id)}, {"data": 1}):
            total += len(c["data"])
        return total
    path = Path(storage.upload_dir) / session_id
    return path.stat().st_size if path.exists() else -1


class _Later:
    """The time module as a storage module sees it, ``by`` seconds on (only its monotonic clock moves)."""

    def __init__(self, by: float) -> None:
        self._by = by

    def monotonic(self) -> float:
        return time.monotonic() + self._by

    def __getattr__(self, name):
        return getattr(time, name)


def stall(monkeypatch, storage) -> None:
    """Every writer of this backend stalls (its process froze) for SESSION_LOCK_TTL: its lock lapses."""
    monkeypatch.setattr(sys.modules[type(storage).__module__], "time",
                        _Later(SESSION_LOCK_TTL.total_seconds() + 1))


async def expire_lock(storage, session_id: str) -> None:
    """What a writer that stalled past SESSION_LOCK_TTL (or died) leaves in the store: its lock, past its time."""
    past = clock.now() - timedelta(minutes=5)
    if storage.kind == "mongodb":
        result = await storage.db["upload_session_locks"].update_one({"key": ObjectId(session_id)},
                                                                     {"$set": {"until": past}})
        assert result.matched_count == 1
    else:
        cur = await storage._run(lambda: storage._db.execute(
            "UPDATE upload_sessions SET lock_until = ? WHERE id = ? AND lock_token IS NOT NULL",
            (clock.iso(past), session_id)))
        assert cur.rowcount == 1


@bounded
async def test_open_get_count(storage):
    t0 = clock.now()
    a1 = await new_session(storage, owner="a" * 64, size_bytes=10, checksum="0" * 64)
    a2 = await new_session(storage, owner="a" * 64)
    b = await new_session(storage, owner="b" * 64)
    assert await storage.get_session(a1.id) == a1
    assert await storage.get_session(b.id) == b
    assert await storage.get_session(str(ObjectId())) is None
    assert await storage.get_session("not-an-id") is None
    assert await storage.get_session("Z" * 24) is None
    assert await storage.get_session(a1.id.upper()) is None  # ids are spelt one way
    before = t0 - timedelta(seconds=1)
    assert await storage.count_sessions("a" * 64, before) == (2, 3)
    assert await storage.count_sessions("b" * 64, before) == (1, 3)
    assert await storage.count_sessions("", before) == (0, 3)
    assert await storage.count_sessions("a" * 64, clock.now() + timedelta(seconds=1)) == (0, 0)
    assert {s.id for s in await storage.sessions_updated_before(clock.now() + timedelta(seconds=1))} == \
        {a1.id, a2.id, b.id}
    assert await storage.sessions_updated_before(before) == []


@bounded
@pytest.mark.parametrize("sizes", [
    [1, CS - 1, CS + 1, 1],
    [CS, CS, 2],
    [5 * MiB + 3, 1, 3 * CS - 1, 6 * MiB + 7],
])
async def test_checkpoints_off_chunk_boundaries_read_back_exactly(storage, sizes):
    session = await new_session(storage)
    data = os.urandom(sum(sizes))
    offset = 0
    for size in sizes:
        got = await append(storage, session.id, data[offset:offset + size], piece=size // 3 + 1)
        offset += size
        assert got.offset == offset
        assert got.updated_at >= session.updated_at
        assert (await storage.get_session(session.id)).offset == offset
        assert await session_bytes(storage, session.id) >= offset // CS * CS
    async with storage.session_writer(session.id) as w:
        assert (w.size, w.sha256) == (len(data), sha(data))
        stored = await w.commit()
    await storage.settle_file(stored.file_id)
    assert (stored.size, stored.sha256, stored.chunk_size) == (len(data), sha(data), CS)
    assert await read_all(storage, stored) == data
    assert await read_all(storage, stored, CS - 1, CS + 2) == data[CS - 1:2 * CS + 1]
    assert await storage.file_info(stored.file_id) == stored
    assert await storage.find_blob(sha(data)) == stored
    assert await storage.get_session(session.id) is None
    with pytest.raises(SessionMissing):
        async with storage.session_writer(session.id):
            pass


@bounded
async def test_empty_and_last_chunk_only_commits(storage):
    empty = await new_session(storage)
    stored = await commit(storage, empty.id)
    assert (stored.size, stored.sha256) == (0, sha(b""))
    assert await read_all(storage, stored) == b""
    one = await new_session(storage)
    data = os.urandom(2 * CS + 5)
    stored = await commit(storage, one.id, data)
    assert await read_all(storage, stored) == data


@bounded
async def test_commit_onto_stored_content_keeps_one_copy(storage):
    data = os.urandom(3 * CS + 100)
    existing = await store(storage, data)
    session = await new_session(storage)
    await append(storage, session.id, data[:CS + 7])
    stored = await commit(storage, session.id, data[CS + 7:])
    assert stored.file_id == existing.file_id
    assert await read_all(storage, stored) == data
    assert await session_bytes(storage, session.id) in (0, -1)
    if storage.kind == "mongodb":
        assert await storage.chunks.count_documents({}) == 4
        assert await storage.files.count_documents({}) == 1
    else:
        assert len((await leftovers(storage))["blobs"]) == 1


@bounded
async def test_cancel_leaves_the_offset(storage):
    session = await new_session(storage)
    first, dropped, rest = os.urandom(CS + 11), os.urandom(5 * MiB), os.urandom(CS - 3)
    await append(storage, session.id, first)
    writer = storage.session_writer(session.id)
    async with writer:
        await writer.write(dropped)  # past a write batch: some of it reached the store
        await writer.cancel()
    assert (await storage.get_session(session.id)).offset == len(first)
    with pytest.raises(RuntimeError, match="client went away"):
        async with storage.session_writer(session.id) as w:
            await w.write(dropped)
            raise RuntimeError("client went away")
    assert (await storage.get_session(session.id)).offset == len(first)
    # This request's bytes are gone from the store, not just uncounted.
    assert await session_bytes(storage, session.id) <= len(first)
    stored = await commit(storage, session.id, rest)
    assert await read_all(storage, stored) == first + rest


@bounded
async def test_a_held_lock_makes_others_busy(storage):
    session = await new_session(storage)
    async with storage.session_writer(session.id) as w:
        await w.write(b"x" * 1000)
        with pytest.raises(SessionBusy):
            async with storage.session_writer(session.id):
                pass
        with pytest.raises(SessionBusy):
            await storage.delete_session(session.id)
        await w.checkpoint()
    # Released on the way out: the next request gets it.
    got = await append(storage, session.id, b"y")
    assert got.offset == 1001


@bounded
@pytest.mark.parametrize("wakes_up_to", ["checkpoint", "error"])
async def test_a_dead_writers_lock_is_taken_over_and_its_bytes_discarded(storage, wakes_up_to, monkeypatch):
    session = await new_session(storage)
    kept = os.urandom(CS + 5)
    await append(storage, session.id, kept)
    dead = storage.session_writer(session.id)
    await dead.__aenter__()
    await dead.write(os.urandom(5 * MiB))
    await dead.flush()  # reaches the store, never counted
    assert await session_bytes(storage, session.id) > len(kept)
    with pytest.raises(SessionBusy):
        await append(storage, session.id, b"too early")
    # Its process freezes (or dies) here, past its lock's time.
    stall(monkeypatch, storage)
    await expire_lock(storage, session.id)

    rest = os.urandom(9 * MiB + 1)
    async with storage.session_writer(session.id) as w:
        # The stored prefix only: what the dead writer left beyond the offset is gone.
        assert (w.size, w.sha256) == (len(kept), sha(kept))
        assert await session_bytes(storage, session.id) <= len(kept)
        await w.write(rest[:8 * MiB])
        await w.checkpoint()
    # The frozen writer wakes up: it holds nothing and changes nothing.
    try:
        with pytest.raises((SessionBusy, RuntimeError)):
            await dead.write(os.urandom(2 * MiB))
            if wakes_up_to == "checkpoint":
                await dead.checkpoint()
            raise RuntimeError("the request fails")
    finally:
        await dead.__aexit__(None, None, None)  # (the end of its `async with` block)
    assert (await storage.get_session(session.id)).offset == len(kept) + 8 * MiB
    stored = await commit(storage, session.id, rest[8 * MiB:])
    assert await read_all(storage, stored) == kept + rest


@bounded
async def test_another_process_continues_and_rehashes_the_prefix(storage, settings):
    session = await new_session(storage)
    data = os.urandom(7 * MiB + 13)
    cut = 5 * MiB + 1
    await append(storage, session.id, data[:cut])
    other = make_storage(settings)  # another replica's view: same store, no hashes in memory
    await other.open()
    try:
        assert other.session_hashes.get(session.id, cut) is None
        async with other.session_writer(session.id) as w:
            assert (w.size, w.sha256) == (cut, sha(data[:cut]))
            await w.write(data[cut:])
            stored = await w.commit()
        await other.settle_file(stored.file_id)
    finally:
        await other.close()
    assert stored.sha256 == sha(data)
    assert await read_all(storage, stored) == data


@bounded
async def test_the_same_process_keeps_its_running_hash(storage):
    session = await new_session(storage)
    await append(storage, session.id, b"a" * (CS + 1))
    assert storage.session_hashes.get(session.id, CS + 1) is not None
    got = await append(storage, session.id, b"b" * 10)
    assert storage.session_hashes.get(session.id, got.offset).hexdigest() == sha(b"a" * (CS + 1) + b"b" * 10)


@bounded
async def test_delete_session_frees_everything(storage):
    session = await new_session(storage)
    await append(storage, session.id, os.urandom(5 * MiB + 77))
    assert await session_bytes(storage, session.id) > 0
    assert await storage.delete_session(session.id) is True
    assert await storage.get_session(session.id) is None
    assert await session_bytes(storage, session.id) in (0, -1)
    if storage.kind == "mongodb":
        assert await storage.db["upload_session_locks"].count_documents({}) == 0
        assert await storage.sessions.count_documents({}) == 0
    else:
        assert list(Path(storage.upload_dir).iterdir()) == []
    assert await storage.delete_session(session.id) is False
    assert await storage.delete_session("not-an-id") is False
    with pytest.raises(SessionMissing):
        await append(storage, session.id, b"late")
    with pytest.raises(SessionMissing):
        await append(storage, "not-an-id", b"late")


@bounded
async def test_sessions_updated_before(storage):
    old = await new_session(storage, at=clock.now() - timedelta(days=2))
    fresh = await new_session(storage)
    await append(storage, old.id, b"x" * (CS + 1))  # a write renews it
    stale = await new_session(storage, at=clock.now() - timedelta(days=2))
    expired = await storage.sessions_updated_before(clock.now() - timedelta(days=1))
    assert [s.id for s in expired] == [stale.id]
    assert expired[0] == stale
    assert {s.id for s in await storage.sessions_updated_before(clock.now() + timedelta(seconds=1))} == \
        {old.id, fresh.id, stale.id}


@bounded
async def test_gc_leaves_a_live_session_alone_and_removes_orphans(storage):
    session = await new_session(storage, at=clock.now() - timedelta(hours=5))
    data = os.urandom(3 * CS + 9)
    await append(storage, session.id, data[:2 * CS + 1])
    two_hours_ago = clock.now() - timedelta(hours=2)
    if storage.kind == "mongodb":
        # What an upload that died two hours ago leaves, and the session's chunks just as old.
        dead = ObjectId.from_datetime(two_hours_ago)
        for n in range(3):
            oid = ObjectId(ObjectId.from_datetime(two_hours_ago).binary[:4] + os.urandom(8))
            await storage.chunks.insert_one({"_id": oid, "files_id": dead, "n": n, "data": b"x" * 10})
        async for c in storage.chunks.find({"files_id": ObjectId(session.id)}):
            old_id = ObjectId(ObjectId.from_datetime(two_hours_ago).binary[:4] + os.urandom(8))
            await storage.chunks.delete_one({"_id": c["_id"]})
            await storage.chunks.insert_one({**c, "_id": old_id})
    else:
        dead_file = Path(storage.tmp_dir) / "crashed.part"
        dead_file.write_bytes(b"half an upload")
        old = two_hours_ago.timestamp()
        os.utime(dead_file, (old, old))
        os.utime(Path(storage.upload_dir) / session.id, (old, old))
    lines = await storage.collect_garbage(timedelta(hours=1), dry_run=False)
    assert len(lines) == 1, lines
    assert session.id not in "".join(lines)
    if storage.kind == "mongodb":
        assert await storage.chunks.count_documents({"files_id": dead}) == 0
    else:
        assert not dead_file.exists()
    assert await session_bytes(storage, session.id) >= 2 * CS
    stored = await commit(storage, session.id, data[2 * CS + 1:])
    assert await read_all(storage, stored) == data


@bounded
async def test_a_session_gone_mid_request_is_missing(storage):
    session = await new_session(storage)
    await append(storage, session.id, b"z" * 10)
    await storage.delete_session(session.id)
    with pytest.raises(SessionMissing):
        await commit(storage, session.id, b"more")
    with pytest.raises(SessionMissing):
        async with storage.session_writer(str(ObjectId())):
            pass


@bounded
async def test_a_request_cancelled_mid_write_changes_nothing(storage):
    """The request task is cancelled (the client left) while a write may be under way in the store."""
    session = await new_session(storage)
    first = os.urandom(CS + 3)
    await append(storage, session.id, first)
    for delay in (0, 0.001, 0.005, 0.02):
        writer = storage.session_writer(session.id)

        async def request():
            async with writer:
                await writer.write(os.urandom(12 * MiB))  # several write batches
                await writer.checkpoint()

        task = asyncio.ensure_future(request())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            continue  # it finished first: nothing to check at this delay
        assert (await storage.get_session(session.id)).offset == len(first)
        assert await session_bytes(storage, session.id) <= len(first)
    got = await storage.get_session(session.id)
    rest = os.urandom(100)
    async with storage.session_writer(session.id) as w:
        before = w.size
        await w.write(rest)
        stored = await w.commit()
    await storage.settle_file(stored.file_id)
    assert before == got.offset
    assert (await read_all(storage, stored))[:len(first)] == first
    assert stored.size == got.offset + 100


async def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"still not {what} after {timeout} s"
        await asyncio.sleep(0.1)


@bounded
@pytest.mark.parametrize("backend", ["mongodb"])
async def test_a_commit_that_died_after_publishing_leaves_the_content_alone(storage):
    """The files document was inserted, then the process died: its session document and lock stay."""
    session = await new_session(storage)
    data = os.urandom(3 * CS + 5)
    await append(storage, session.id, data[:CS + 1])
    stored = await commit(storage, session.id, data[CS + 1:])
    assert stored.file_id == session.id  # new content keeps the session's chunks, under its id
    locks = storage.db["upload_session_locks"]

    async def died_after_publishing():
        await storage.open_session(UploadSession(session.id, "", CS + 1, None, None, CS, session.created_at,
                                                 clock.now()))
        await locks.insert_one({"_id": ObjectId(), "key": ObjectId(session.id), "until": clock.now()})

    await died_after_publishing()
    with pytest.raises(SessionMissing):
        await append(storage, session.id, b"more")
    assert await storage.get_session(session.id) is None
    assert await read_all(storage, stored) == data
    await died_after_publishing()
    assert await storage.delete_session(session.id) is True
    assert await read_all(storage, stored) == data
    assert await locks.count_documents({}) == 0


@bounded
@pytest.mark.parametrize("backend", ["mongodb"])
async def test_a_commit_whose_session_removal_failed_is_settled_later(storage, monkeypatch):
    session = await new_session(storage)
    data = os.urandom(2 * CS + 5)
    real = storage.sessions.delete_one
    failures = []

    async def fails_once(*args, **kwargs):
        if not failures:
            failures.append(args)
            raise AutoReconnect("connection lost (test)")
        return await real(*args, **kwargs)

    monkeypatch.setattr(storage.sessions, "delete_one", fails_once)
    stored = await commit(storage, session.id, data)  # the content is stored: the commit succeeds
    assert failures and await read_all(storage, stored) == data

    async def settled():
        return (await storage.get_session(session.id) is None
                and await storage.db["upload_session_locks"].count_documents({}) == 0)

    await wait_until(settled, "settled")
    assert await read_all(storage, stored) == data


@bounded
@pytest.mark.parametrize("backend", ["mongodb"])
async def test_the_database_gone_mid_request(storage, mongo_server):
    session = await new_session(storage)
    first = os.urandom(CS + 5)
    await append(storage, session.id, first)
    w = storage.session_writer(session.id)
    await w.__aenter__()
    await w.write(os.urandom(5 * MiB))  # in the store, beyond the offset
    mongo_server.stop()
    try:
        with pytest.raises(StorageUnavailable):
            await w.write(os.urandom(5 * MiB))
            await w.checkpoint()
    finally:
        await w.__aexit__(None, None, None)  # its clean-up cannot reach the database either
    mongo_server.start()
    # The lock it could not release goes as soon as the database is back, not SESSION_LOCK_TTL later.
    deadline = time.monotonic() + SESSION_LOCK_TTL.total_seconds() / 2
    while True:
        try:
            got = await append(storage, session.id, b"x")
            break
        except (SessionBusy, StorageUnavailable):
            assert time.monotonic() < deadline, "the session stayed busy"
            await asyncio.sleep(0.2)
    # Settled before its lock went: nothing of the failed request is left beyond the offset.
    assert await session_bytes(storage, session.id) == CS
    assert got.offset == len(first) + 1
    stored = await commit(storage, session.id)
    assert await read_all(storage, stored) == first + b"x"


@bounded
@pytest.mark.parametrize("backend", ["mongodb"])
async def test_gc_forgets_lapsed_locks_of_sessions_that_are_gone(storage):
    locks = storage.db["upload_session_locks"]
    live = await new_session(storage)
    await append(storage, live.id, b"x" * (CS + 1))
    gone = ObjectId()
    lapsed = clock.now() - timedelta(minutes=5)
    await locks.insert_one({"_id": ObjectId(), "key": ObjectId(live.id), "until": lapsed})
    await locks.insert_one({"_id": ObjectId(), "key": gone, "until": lapsed})
    await storage.collect_garbage(timedelta(hours=1), dry_run=True)
    assert await locks.count_documents({}) == 2
    await storage.collect_garbage(timedelta(hours=1), dry_run=False)
    # The live session's lapsed lock stays: the next request takes it over (and discards).
    assert [d["key"] async for d in locks.find({})] == [ObjectId(live.id)]
    assert (await append(storage, live.id, b"y")).offset == CS + 2
