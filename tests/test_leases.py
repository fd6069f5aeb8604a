"""FileLeases, the process's lease keeper (app/leases.py), against a real storage.

A second storage object on the same store stands for another process (another
worker or replica): what the first one's readers hold, its releases must not
delete. Downloads that find their content gone look their URL up again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sqlite3
import time
from contextlib import closing
from datetime import timedelta

import pytest
from bson import ObjectId

from app import clock
from app.appkeys import LEASES, STORAGE
from app.leases import REPLICA_ID, FileLeases
from app.storage import make_storage
from app.storage.base import ContentGone
from tests.support import deadlines


@pytest.fixture
async def other(settings):
    """Another process's view of the same store."""
    store = make_storage(settings)
    await store.open()
    yield store
    await store.close()


async def stored_content(storage, data: bytes | None = None):
    """Content no model refers to (a replaced file): any release deletes it unless something holds it."""
    async with storage.file_writer() as w:
        await w.write(data or os.urandom(5000))
        stored = await w.commit()
    await storage.settle_file(stored.file_id)
    return stored


async def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Recording:
    """Counts the lease calls a FileLeases makes; ``hold_drops`` keeps drop_leases waiting."""

    def __init__(self, storage) -> None:
        self._storage = storage
        self.calls: list[str] = []
        self.hold_drops: asyncio.Event | None = None
        self.dropping = asyncio.Event()

    async def lease_files(self, file_ids, owner, until):
        self.calls.append("lease")
        return await self._storage.lease_files(file_ids, owner, until)

    async def drop_leases(self, lease_ids):
        self.calls.append("drop")
        self.dropping.set()
        if self.hold_drops is not None:
            await self.hold_drops.wait()
        result = await self._storage.drop_leases(lease_ids)
        self.calls.append("dropped")
        return result

    def __getattr__(self, name):
        return getattr(self._storage, name)


async def test_readers_of_one_file_share_one_lease_and_the_last_drops_it(storage, other):
    f = await stored_content(storage)
    recording = Recording(storage)
    leases = FileLeases(recording)
    async with leases.reading(f.file_id):
        async with leases.reading(f.file_id, f.file_id):
            assert recording.calls == ["lease"]
            assert await other.release_file(f.file_id) is False  # held, from another process too
        # One reader left: the lease stays.
        await leases.drain()
        assert recording.calls == ["lease"] and leases.holds(f.file_id)
        assert await other.file_info(f.file_id) is not None
    await leases.drain()
    assert recording.calls == ["lease", "drop", "dropped"] and not leases.holds(f.file_id)
    # The release the lease held back was remembered: the last drop completed it.
    assert await storage.file_info(f.file_id) is None


async def test_a_take_during_a_drop_waits_for_it_and_leases_again(storage, other):
    """The last reader's drop is under way when a new reader comes: the new reader must not count
    itself in on the lease being dropped (the content would then be unprotected)."""
    f = await stored_content(storage)
    recording = Recording(storage)
    recording.hold_drops = asyncio.Event()
    leases = FileLeases(recording)
    async with leases.reading(f.file_id):
        pass
    await asyncio.wait_for(recording.dropping.wait(), 10)  # the drop task is inside drop_leases, held
    entered = asyncio.Event()

    async def second_reader():
        async with leases.reading(f.file_id):
            entered.set()
            # Its own lease protects the content against any release.
            assert await other.release_file(f.file_id) is False
            assert await other.file_info(f.file_id) is not None

    reader = asyncio.create_task(second_reader())
    turn = leases._turns(f.file_id)

    async def queued():  # the new reader waits for the file's turn, which the drop holds
        return turn.locked() and bool(turn._waiters)
    await wait_for(queued, "the second reader to wait for the drop")
    assert not entered.is_set()
    recording.hold_drops.set()
    await asyncio.wait_for(reader, 10)
    assert recording.calls[:4] == ["lease", "drop", "dropped", "lease"]
    await leases.drain()
    assert await storage.file_info(f.file_id) is None  # released once the second reader was done


async def test_content_gone_before_the_lease_raises_and_holds_nothing(storage):
    kept, gone = await stored_content(storage), await stored_content(storage)
    assert await storage.release_file(gone.file_id) is True
    leases = FileLeases(storage)
    with pytest.raises(ContentGone):
        async with leases.reading(kept.file_id, gone.file_id):
            pytest.fail("entered with content that is gone")
    await leases.drain()
    assert not leases.holds(kept.file_id) and not leases.holds(gone.file_id)
    # Nothing left behind: the kept file's lease was dropped again.
    assert await storage.release_file(kept.file_id) is True


async def test_the_heartbeat_renews_leases_past_their_ttl(storage, other):
    ttl = 0.6
    f = await stored_content(storage)
    leases = FileLeases(storage, ttl=ttl)
    await leases.start()
    try:
        async with leases.reading(f.file_id):
            held_until = time.monotonic() + 4 * ttl
            while time.monotonic() < held_until:
                # Unrenewed, the lease would have expired after ttl: another process's release must
                # keep failing for as long as the reader reads.
                assert await other.release_file(f.file_id) is False
                await asyncio.sleep(ttl / 4)
            assert await other.file_info(f.file_id) is not None
        await leases.drain()
        assert await storage.file_info(f.file_id) is None
    finally:
        await leases.stop()


async def test_a_dead_processes_lease_expires_and_the_heartbeat_completes_its_release(storage, other):
    ttl = 0.6
    f = await stored_content(storage)
    # A reader in a process that then died: its lease is never renewed nor dropped.
    await other.lease_files([f.file_id], "dead:1:0", clock.now() + timedelta(seconds=ttl))
    assert await storage.release_file(f.file_id) is False
    leases = FileLeases(storage, ttl=ttl)
    await leases.start()
    try:
        async def released():
            return await storage.file_info(f.file_id) is None
        await wait_for(released, "release_pending to delete the content after the dead lease expired")
    finally:
        await leases.stop()


async def test_stop_drops_what_readers_still_hold(storage, other):
    f = await stored_content(storage)
    leases = FileLeases(storage)
    await leases.start()
    reading = leases.reading(f.file_id)
    await reading.__aenter__()  # a reader cut short at shutdown never leaves its block
    assert await other.release_file(f.file_id) is False
    await leases.stop()
    assert await storage.file_info(f.file_id) is None
    assert REPLICA_ID.count(":") >= 2  # host:pid:token


# -- a lease lingers after its last reader -----------------------------------------

async def live_leases(storage, file_id: str) -> int:
    """The lease records on this content in the store, whoever holds them."""
    if storage.kind == "mongodb":
        return await storage.content.leases.count_documents({"file_id": ObjectId(file_id)})
    with closing(sqlite3.connect(storage.db_path)) as db:
        return db.execute("SELECT count(*) FROM content_leases WHERE file_id = ?", (file_id,)).fetchone()[0]


async def drops_settled(leases: FileLeases) -> None:
    """Wait for the drop tasks already started (not for lingers: drain() would end those)."""
    await asyncio.gather(*leases._tasks)


@deadlines.bounded(60)
async def test_back_to_back_readers_of_one_file_share_one_lease(storage, other):
    f = await stored_content(storage)
    recording = Recording(storage)
    leases = FileLeases(recording)
    leases.linger = 30.0  # far longer than the test: the lease must simply still be there
    for _ in range(20):
        async with leases.reading(f.file_id):
            pass
        await drops_settled(leases)
    assert recording.calls == ["lease"] and leases.holds(f.file_id)
    assert await live_leases(storage, f.file_id) == 1
    # Lingering, it still protects the content against another process's release.
    assert await other.release_file(f.file_id) is False
    assert await other.file_info(f.file_id) is not None
    await leases.drain()
    assert recording.calls == ["lease", "drop", "dropped"] and not leases.holds(f.file_id)
    assert await live_leases(storage, f.file_id) == 0
    assert await storage.file_info(f.file_id) is None  # the drop completed the other's release


@deadlines.bounded(60)
async def test_a_linger_is_renewed_and_ends_with_the_drop_that_completes_another_processes_release(storage, other):
    ttl = 0.6
    f = await stored_content(storage)
    recording = Recording(storage)
    leases = FileLeases(recording, ttl=ttl)
    leases.linger = 4 * ttl  # longer than an unrenewed lease lives: the heartbeat renews lingering leases too
    await leases.start()
    try:
        async with leases.reading(f.file_id):
            pass
        left = time.monotonic()
        # Another process releases the content while the lease lingers: held back, remembered.
        assert await other.release_file(f.file_id) is False
        while time.monotonic() < left + 2 * ttl:
            assert await other.file_info(f.file_id) is not None, "deleted while the lease lingered"
            assert await other.release_file(f.file_id) is False
            await asyncio.sleep(ttl / 4)
        assert recording.calls == ["lease"]

        async def dropped():
            return not leases.holds(f.file_id)
        await wait_for(dropped, "the linger to end", timeout=30)
        assert time.monotonic() - left >= 0.9 * leases.linger
        assert recording.calls[:2] == ["lease", "drop"]

        async def released():
            return await other.file_info(f.file_id) is None
        # The drop that ended the linger completed the other process's release: nothing else would before ttl*3.
        await wait_for(released, "the release to complete", timeout=10)
        assert await live_leases(storage, f.file_id) == 0
    finally:
        await leases.stop()


@deadlines.bounded(60)
async def test_a_reader_that_comes_while_a_lingers_drop_waits_for_its_turn_keeps_the_lease(storage, other):
    f = await stored_content(storage)
    recording = Recording(storage)
    leases = FileLeases(recording)
    leases.linger = 0.05
    async with leases.reading(f.file_id):
        pass
    turn = leases._turns(f.file_id)
    await turn.acquire()  # the file's turn, held here: the drop, once the linger ends, waits for it
    holding = True
    try:
        async def drop_waits():
            return bool(turn._waiters)
        await wait_for(drop_waits, "the linger's drop to wait for the file's turn")
        async with asyncio.timeout(10):
            async with leases.reading(f.file_id):  # the lingering lease, taken again without a storage call
                turn.release()
                holding = False

                async def drop_passed():
                    return not turn.locked()
                await wait_for(drop_passed, "the drop to have its turn")
                await drops_settled(leases)
                # The drop saw the reader and left the lease: it protects the content still.
                assert recording.calls == ["lease"] and leases.holds(f.file_id)
                assert await other.release_file(f.file_id) is False
                assert await other.file_info(f.file_id) is not None
    finally:
        if holding:
            turn.release()
    await leases.drain()
    assert recording.calls == ["lease", "drop", "dropped"]
    assert await storage.file_info(f.file_id) is None


@deadlines.bounded(60)
async def test_a_release_through_the_keeper_drops_its_idle_lease_first(storage):
    f = await stored_content(storage)
    leases = FileLeases(storage)
    leases.linger = 30.0
    async with leases.reading(f.file_id):
        pass
    assert leases.holds(f.file_id)
    await leases.release([f.file_id])
    # At once, not after the linger: the lease was this process's own and idle.
    assert await storage.file_info(f.file_id) is None and not leases.holds(f.file_id)
    assert await live_leases(storage, f.file_id) == 0


@deadlines.bounded(60)
async def test_a_release_through_the_keeper_under_readers_completes_as_the_last_leaves(storage, other):
    f = await stored_content(storage)
    leases = FileLeases(storage)
    leases.linger = 30.0
    async with leases.reading(f.file_id):
        async with leases.reading(f.file_id):
            await leases.release([f.file_id])
            assert await other.file_info(f.file_id) is not None  # read here: held back
        await drops_settled(leases)
        assert await other.file_info(f.file_id) is not None and leases.holds(f.file_id)

    async def released():
        return await storage.file_info(f.file_id) is None
    # Without a linger: the last reader dropped the lease, which completed the release (30 s otherwise).
    await wait_for(released, "the release to complete as the last reader left", timeout=10)
    assert not leases.holds(f.file_id)


@deadlines.bounded(60)
async def test_stop_drops_lingering_leases_without_waiting_for_their_linger(storage, other):
    f = await stored_content(storage)
    leases = FileLeases(storage)
    leases.linger = 300.0
    await leases.start()
    async with leases.reading(f.file_id):
        pass
    await drops_settled(leases)
    assert leases.holds(f.file_id)
    assert await other.release_file(f.file_id) is False  # held back by the lingering lease
    async with asyncio.timeout(10):
        await leases.stop()
    assert not leases.holds(f.file_id)
    assert await live_leases(storage, f.file_id) == 0
    assert await storage.file_info(f.file_id) is None


# -- downloads that find their content gone -------------------------------------

async def _model_with_file(client, name: str, data: bytes) -> str:
    resp = await client.post("/api/v1/models", json={"name": name, "algorithm": "x"})
    model_id = (await resp.json())["model_id"]
    resp = await client.put(f"/api/v1/models/{model_id}/upload?filename=f.bin", data=data)
    assert resp.status == 201
    return model_id


def _before_first_lease(storage, action):
    """Run ``action`` once, just before the first lease is taken: as if another process acted between
    the download's lookup and its lease."""
    real = storage.lease_files
    calls = []

    async def lease_files(file_ids, owner, until):
        calls.append(list(file_ids))
        if len(calls) == 1:
            await action()
        return await real(file_ids, owner, until)

    storage.lease_files = lease_files
    return calls


@pytest.mark.parametrize("url", ["/api/v1/models/{id}/download", "/api/v1/models/by-name/swap/download",
                                 "/api/v1/models/{id}/files/f.bin"])
async def test_a_download_whose_file_was_replaced_before_its_lease_serves_the_new_file(client, url):
    old, new = os.urandom(70_000), os.urandom(90_000)
    model_id = await _model_with_file(client, "swap", old)
    donor = await _model_with_file(client, "donor", new)
    storage = client.app[STORAGE]
    old_doc, new_fm = await storage.get_model(model_id), (await storage.get_model(donor))["file_metadata"]
    new_fm = {**new_fm, "filename": "f.bin"}

    async def replace():  # another process's upload: swap, then release the old content
        await storage.update_model(model_id, {"file_metadata": new_fm})
        assert await storage.release_file(old_doc["file_metadata"]["file_id"]) is True

    calls = _before_first_lease(storage, replace)
    resp = await client.get(url.format(id=model_id))
    assert resp.status == 200
    body = await resp.read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(new).hexdigest()
    assert resp.headers["ETag"] == f'"{hashlib.sha256(new).hexdigest()}"'
    assert calls == [[old_doc["file_metadata"]["file_id"]], [new_fm["file_id"]]]


async def test_a_download_whose_model_was_deleted_before_its_lease_is_404(client):
    model_id = await _model_with_file(client, "gone", os.urandom(10_000))
    storage = client.app[STORAGE]

    async def delete():
        doc = await storage.delete_model(model_id)
        assert await storage.release_file(doc["file_metadata"]["file_id"]) is True

    _before_first_lease(storage, delete)
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_content_that_keeps_going_is_503_after_three_lookups(client):
    model_id = await _model_with_file(client, "churn", os.urandom(10_000))
    storage = client.app[STORAGE]
    calls = []

    async def never(file_ids, owner, until):
        calls.append(file_ids)
        return {}

    storage.lease_files = never
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "storage_unavailable"
    assert len(calls) == 3
    assert not client.app[LEASES].holds((await storage.get_model(model_id))["file_metadata"]["file_id"])


# -- lingering leases through HTTP ---------------------------------------------------

def _count_leases(storage) -> list[list[str]]:
    real, calls = storage.lease_files, []

    async def lease_files(file_ids, owner, until):
        calls.append(list(file_ids))
        return await real(file_ids, owner, until)

    storage.lease_files = lease_files
    return calls


@deadlines.bounded(120)
async def test_back_to_back_downloads_and_ranges_of_one_file_take_one_lease(client):
    data = os.urandom(3 * 1024 * 1024 + 5)
    model_id = await _model_with_file(client, "loop", data)
    storage = client.app[STORAGE]
    file_id = (await storage.get_model(model_id))["file_metadata"]["file_id"]
    client.app[LEASES].linger = 60.0  # longer than the test, however slow the machine
    calls = _count_leases(storage)
    url = f"/api/v1/models/{model_id}/download"
    for _ in range(5):  # one client downloading the file again and again
        resp = await client.get(url)
        assert resp.status == 200 and await resp.read() == data
    rng = random.Random(18)

    async def one_range():
        start = rng.randrange(len(data) - 1024 * 1024)
        resp = await client.get(url, headers={"Range": f"bytes={start}-{start + 1024 * 1024 - 1}"})
        assert resp.status == 206
        assert await resp.read() == data[start:start + 1024 * 1024]
    for _ in range(3):  # 1 MiB ranges over four connections
        await asyncio.gather(*(one_range() for _ in range(4)))
    assert calls == [[file_id]]
    assert client.app[LEASES].holds(file_id) and await live_leases(storage, file_id) == 1


@pytest.mark.parametrize("change", ["replace", "delete"])
@deadlines.bounded(120)
async def test_a_release_through_this_service_deletes_at_once_despite_its_lingering_lease(client, change):
    model_id = await _model_with_file(client, "lingered", os.urandom(70_000))
    storage = client.app[STORAGE]
    leases = client.app[LEASES]
    leases.linger = 60.0
    old = (await storage.get_model(model_id))["file_metadata"]["file_id"]
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert resp.status == 200
    await resp.read()
    await drops_settled(leases)
    assert leases.holds(old)  # the download's lease lingers
    if change == "replace":
        resp = await client.put(f"/api/v1/models/{model_id}/upload?filename=g.bin", data=os.urandom(80_000))
        assert resp.status == 201
    else:
        resp = await client.delete(f"/api/v1/models/{model_id}")
        assert resp.status in (200, 204)
    # Deleted by the release itself, as with no reader at all: not when the linger ends.
    assert await storage.file_info(old) is None
    assert not leases.holds(old) and await live_leases(storage, old) == 0


@deadlines.bounded(120)
async def test_shutting_the_service_down_drops_its_lingering_leases(aiohttp_client, settings):
    from app.server import create_app

    client = await aiohttp_client(create_app(settings))
    client.app[LEASES].linger = 300.0
    model_id = await _model_with_file(client, "shutdown", os.urandom(20_000))
    storage = client.app[STORAGE]
    file_id = (await storage.get_model(model_id))["file_metadata"]["file_id"]
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert resp.status == 200
    await resp.read()
    await drops_settled(client.app[LEASES])
    assert client.app[LEASES].holds(file_id) and await live_leases(storage, file_id) == 1
    async with asyncio.timeout(30):
        await client.close()
    observer = make_storage(settings)
    await observer.open()
    try:
        assert await live_leases(observer, file_id) == 0
    finally:
        await observer.close()
