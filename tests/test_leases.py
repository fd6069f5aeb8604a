"""FileLeases, the process's lease keeper (app/leases.py), against a real storage.

A second storage object on the same store stands for another process (another
worker or replica): what the first one's readers hold, its releases must not
delete. Downloads that find their content gone look their URL up again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from datetime import timedelta

import pytest

from app import clock
from app.appkeys import LEASES, STORAGE
from app.leases import REPLICA_ID, FileLeases
from app.storage import make_storage
from app.storage.base import ContentGone


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
