"""Content leases on MongoDB across processes, below HTTP.

Each MongoStorage here has its own AsyncMongoClient: a separate replica as far
as the database can tell. They race on one test database the way replicas do
(a reader leasing content that another replica releases, a commit claiming it,
a blob kept) and the content must be deleted exactly when nothing holds it any
more: never under a lease, never left behind after the last one.
"""

import asyncio
import contextlib
import os
from datetime import datetime, timedelta

import pytest
from bson import ObjectId
from pymongo import ReadPreference

from app import clock
from app.storage import make_storage
from app.storage.mongo_leases import EXPIRED_SLACK, STALE_TOMBSTONE
from tests.support import deadlines
from tests.test_storage_files import read_all, store
from tests.transfer_helpers import content_stored

pytestmark = pytest.mark.parametrize("backend", ["mongodb"])

ROUNDS = 25
BOUND = 120  # seconds: no test here may hang
OWNER = "test-replica"
SIZE = 300_000  # two chunks: a deletion removes several documents


bounded = deadlines.bounded(BOUND)


@contextlib.asynccontextmanager
async def replicas(settings, n: int):
    """``n`` storages on one database, each with its own client: separate processes to the server."""
    stores = [make_storage(settings) for _ in range(n)]
    try:
        for s in stores:
            await s.open()
        yield stores
    finally:
        for s in stores:
            await s.close()


def later(**delta) -> datetime:
    return clock.now() + timedelta(**delta)


async def bookkeeping(storage) -> dict[str, int]:
    """What the lease protocol holds: leases, tombstones (deletions running), pending releases."""
    c = storage.content
    return {"leases": await c.leases.count_documents({}), "tombstones": await c.tombstones.count_documents({}),
            "pending": await c.pending.count_documents({})}


NOTHING = {"leases": 0, "tombstones": 0, "pending": 0}


async def stored_content(storage):
    data = os.urandom(SIZE)
    return data, await store(storage, data)


async def gone(storage, stored) -> bool:
    return not await content_stored(storage, stored.file_id, stored.sha256)


async def age_leases(storage, file_id: str, by: timedelta) -> None:
    """Make every lease on this content end ``by`` ago, as time passing would."""
    await storage.content.leases.update_many({"file_id": ObjectId(file_id)}, {"$set": {"until": clock.now() - by}})


def in_order(first, second, order: str):
    """Both calls at once, the one ``order`` names started first; their results in argument order."""
    async def run():
        if order == "first":
            return await asyncio.gather(first, second)
        b, a = await asyncio.gather(second, first)
        return a, b
    return run()


# --------------------------------------------------------------------------- reader vs release


@pytest.mark.parametrize("order", ["first", "second"])
@bounded
async def test_a_lease_and_a_release_racing_never_delete_leased_content(settings, order):
    """Reader (B) leases while another replica (C) releases: either the reader holds the content,
    whole, until it drops the lease (which then completes the release), or it gets no lease and
    the content is gone. Started in both orders, many rounds."""
    outcomes = {"leased": 0, "gone": 0}
    async with replicas(settings, 3) as (a, b, c):
        for _ in range(ROUNDS):
            data, stored = await stored_content(a)
            leased, released = await in_order(b.lease_files([stored.file_id], OWNER, later(minutes=5)),
                                              c.release_file(stored.file_id), order)
            if stored.file_id in leased:
                outcomes["leased"] += 1
                assert released is False
                assert await read_all(b, stored) == data  # every chunk still there under the lease
                assert await b.drop_leases([leased[stored.file_id]]) == [stored.file_id]
            else:
                outcomes["gone"] += 1
                assert leased == {} and released is True
            assert await gone(a, stored)
            assert await bookkeeping(a) == NOTHING
    print(f"order {order}: {outcomes}")


@pytest.mark.parametrize("order", ["first", "second"])
@bounded
async def test_the_last_drop_and_a_release_racing_leave_nothing(settings, order):
    """A release that finds the lease is remembered; a drop at the same moment either is seen by
    that release or sees its pending mark: the content is gone afterwards either way."""
    async with replicas(settings, 3) as (a, b, c):
        for _ in range(ROUNDS):
            _, stored = await stored_content(a)
            lease = (await b.lease_files([stored.file_id], OWNER, later(minutes=5)))[stored.file_id]
            dropped, released = await in_order(b.drop_leases([lease]), c.release_file(stored.file_id), order)
            assert (dropped == [stored.file_id]) != released  # deleted exactly once, by one of them
            assert await gone(a, stored)
            assert await bookkeeping(a) == NOTHING


@bounded
async def test_many_readers_on_many_replicas_and_a_release(settings):
    """Nine downloads on three replicas hold one file while a fourth replica releases it: each
    reads it whole after the release as before, they finish at the same moment, and the one
    drop that ends the last lease deletes the content; nothing of the protocol is left."""
    async with replicas(settings, 4) as (a, *replica):
        data, stored = await stored_content(a)
        holding = asyncio.Barrier(9 + 1)
        released = asyncio.Event()

        async def download(storage):
            leased = await storage.lease_files([stored.file_id], OWNER, later(minutes=5))
            assert await read_all(storage, stored) == data
            await holding.wait()
            await released.wait()
            assert await read_all(storage, stored) == data
            return await storage.drop_leases(list(leased.values()))

        downloads = [asyncio.ensure_future(download(r)) for r in replica * 3]
        await holding.wait()
        assert await a.release_file(stored.file_id) is False
        released.set()
        dropped = await asyncio.gather(*downloads)
        assert sorted(dropped) == [[]] * 8 + [[stored.file_id]]
        assert await gone(a, stored)
        assert await bookkeeping(a) == NOTHING


@bounded
async def test_a_pending_release_is_completed_by_the_last_drop(settings):
    async with replicas(settings, 4) as (a, b, c, d):
        data, stored = await stored_content(a)
        first = await b.lease_files([stored.file_id], OWNER, later(minutes=5))
        second = await c.lease_files([stored.file_id], OWNER, later(minutes=5))
        assert await a.release_file(stored.file_id) is False
        assert (await bookkeeping(a))["pending"] == 1
        assert await b.drop_leases(list(first.values())) == []  # C still reads it
        assert await read_all(a, stored) == data
        # Dropped through another process than the one that took it: found by its id.
        assert await d.drop_leases(list(second.values())) == [stored.file_id]
        assert await gone(a, stored)
        assert await bookkeeping(a) == NOTHING


@bounded
async def test_a_release_of_content_a_model_refers_to_is_not_remembered(settings):
    async with replicas(settings, 2) as (a, b):
        _, stored = await stored_content(a)
        leased = await b.lease_files([stored.file_id], OWNER, later(minutes=5))
        at = clock.now()
        await a.insert_model({"id": str(ObjectId()), "name": "m", "version": "1", "algorithm": "x",
                              "status": "active", "created_at": at, "updated_at": at,
                              "file_metadata": {"file_id": stored.file_id}})
        assert await a.release_file(stored.file_id) is False
        assert await b.drop_leases(list(leased.values())) == []
        assert not await gone(a, stored)
        assert await bookkeeping(a) == NOTHING


@bounded
async def test_a_replica_that_died_holding_a_lease_holds_it_until_it_expires(settings):
    async with replicas(settings, 1) as (a,):
        data, stored = await stored_content(a)
        async with replicas(settings, 1) as (dying,):
            assert stored.file_id in await dying.lease_files([stored.file_id], OWNER, later(minutes=5))
        # (closed without dropping: SIGKILL)
        assert await a.release_file(stored.file_id) is False
        assert await a.release_pending() == []  # its lease is live still
        assert await read_all(a, stored) == data
        await age_leases(a, stored.file_id, timedelta(seconds=1))
        assert await a.release_pending() == [stored.file_id]
        assert await gone(a, stored)
        assert await bookkeeping(a) == {"leases": 1, "tombstones": 0, "pending": 0}
        # A minute past its end the lease itself goes too (a late heartbeat no longer counts).
        await age_leases(a, stored.file_id, EXPIRED_SLACK + timedelta(seconds=1))
        assert await a.release_pending() == []
        assert await bookkeeping(a) == NOTHING


@bounded
async def test_renewal_keeps_a_lease_alive(settings):
    async with replicas(settings, 2) as (a, b):
        _, stored = await stored_content(a)
        # Taken with an end already past: without renewal it protects nothing.
        leased = await b.lease_files([stored.file_id], OWNER, clock.now() - timedelta(seconds=1))
        await b.renew_leases(list(leased.values()) + [str(ObjectId())], later(minutes=5))  # a missing one is ignored
        assert await a.release_file(stored.file_id) is False
        assert not await gone(a, stored)
        assert await b.drop_leases(list(leased.values())) == [stored.file_id]
        assert await gone(a, stored)


@bounded
async def test_no_lease_and_nothing_left_for_content_that_is_not_there(settings):
    async with replicas(settings, 2) as (a, b):
        _, stored = await stored_content(a)
        _, released = await stored_content(a)
        assert await a.release_file(released.file_id) is True
        missing, malformed = str(ObjectId()), "not-an-id"
        leased = await b.lease_files([missing, released.file_id, stored.file_id, malformed, stored.file_id],
                                     OWNER, later(minutes=5))
        assert list(leased) == [stored.file_id]
        assert (await bookkeeping(a))["leases"] == 1
        assert await b.drop_leases(list(leased.values())) == []
        assert await bookkeeping(a) == NOTHING


# --------------------------------------------------------------------------- claims and keeps


@pytest.mark.parametrize("order", ["first", "second"])
@bounded
async def test_a_claim_and_a_release_racing(settings, order):
    """A commit naming stored blobs (claim_blobs) on B while C releases them: a claimed blob is
    whole until B settles, and then gone (the release waited); an unclaimed one is gone."""
    async with replicas(settings, 3) as (a, b, c):
        for _ in range(ROUNDS):
            data, stored = await stored_content(a)
            claimed, released = await in_order(b.claim_blobs([stored.sha256]), c.release_file(stored.file_id), order)
            if stored.sha256 in claimed:
                assert released is False
                assert claimed[stored.sha256].file_id == stored.file_id
                assert await read_all(b, stored) == data
                await b.settle_files([stored.file_id])
            else:
                assert released is True
            assert await gone(a, stored)
            assert await bookkeeping(a) == NOTHING


@pytest.mark.parametrize("order", ["first", "second"])
@bounded
async def test_an_upload_of_the_same_content_and_a_release_racing(settings, order):
    """An upload on B deduplicates onto the stored copy, or stores its own if the copy is being
    deleted: what its commit returns is whole until settled, whichever happened."""
    async with replicas(settings, 3) as (a, b, c):
        for _ in range(ROUNDS):
            data, stored = await stored_content(a)
            committed, _ = await in_order(store(b, data, settle=False), c.release_file(stored.file_id), order)
            assert await read_all(a, committed) == data
            await b.settle_file(committed.file_id)
            if committed.file_id == stored.file_id:
                assert await gone(a, stored)  # the release waited for this claim
            else:
                assert await gone(a, stored) and await read_all(a, committed) == data
                assert await a.release_file(committed.file_id) is True
            assert await bookkeeping(a) == NOTHING


class _SecondReadHeld:
    """Stands for a collection of one replica's lease protocol: the release's first read of
    leases or references goes through at once; the second waits until ``go`` is set."""

    def __init__(self, real, reads: dict) -> None:
        self._real, self._reads = real, reads

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def find_one(self, *args, **kwargs):
        self._reads["n"] += 1
        if self._reads["n"] == 2:
            await self._reads["go"].wait()
        found = await self._real.find_one(*args, **kwargs)
        if self._reads["n"] == 1:
            self._reads["first"].set()
        return found


@bounded
async def test_a_claim_dropped_between_a_releases_two_reads_never_loses_content_a_model_took(settings):
    """A commit claims a blob, inserts its model, then drops the claim. A release on another
    replica reads the live leases and the models referring to the content, one after the
    other. Whichever it reads first, the commit's two steps landing between its two reads must
    not let it delete what the new model refers to. (Reading references first, then leases,
    it saw neither: the model was not in yet, and the claim was gone.)"""
    async with replicas(settings, 2) as (a, c):
        _, stored = await stored_content(a)
        claimed = await a.claim_blobs([stored.sha256])
        assert stored.sha256 in claimed
        reads = {"n": 0, "first": asyncio.Event(), "go": asyncio.Event()}
        c.content.leases = _SecondReadHeld(c.content.leases, reads)
        c.content._models = _SecondReadHeld(c.content._models, reads)
        release = asyncio.ensure_future(c.release_file(stored.file_id))
        await reads["first"].wait()
        at = clock.now()
        await a.insert_model({"id": str(ObjectId()), "name": "m", "version": "1", "algorithm": "x",
                              "status": "active", "created_at": at, "updated_at": at,
                              "file_metadata": {"file_id": stored.file_id}})
        settle = asyncio.ensure_future(a.settle_files([stored.file_id]))
        while await a.content.leases.count_documents({"file_id": ObjectId(stored.file_id)}):
            await asyncio.sleep(0.01)
        reads["go"].set()
        assert await release is False
        await settle
        assert not await gone(a, stored)
        assert reads["n"] == 2
        assert await bookkeeping(a) == NOTHING


@bounded
async def test_claims_are_settled_by_the_process_that_took_them(settings):
    async with replicas(settings, 2) as (a, b):
        data, stored = await stored_content(a)
        await b.claim_blobs([stored.sha256, stored.sha256])
        await b.claim_blobs([stored.sha256])
        await a.settle_file(stored.file_id)  # A holds no claim on it: nothing changes
        assert await a.release_file(stored.file_id) is False
        await b.settle_file(stored.file_id)
        assert await read_all(a, stored) == data  # one claim still there
        await b.settle_files([stored.file_id, stored.file_id])  # more than it holds: the one left goes
        assert await gone(a, stored)
        assert await bookkeeping(a) == NOTHING


@pytest.mark.parametrize("order", ["first", "second"])
@bounded
async def test_a_keep_and_a_release_racing(settings, order):
    """A kept blob (keep_blobs: a blob a client is about to commit) stays until its keep ends,
    then release_pending deletes it; one that was not kept is gone."""
    async with replicas(settings, 3) as (a, b, c):
        for _ in range(ROUNDS):
            data, stored = await stored_content(a)
            kept, released = await in_order(b.keep_blobs([stored.sha256], later(hours=1)),
                                             c.release_file(stored.file_id), order)
            assert b.content._leased == {}  # (nothing remembered in-process for a lease nobody drops)
            if stored.sha256 in kept:
                assert released is False
                assert await a.release_pending() == []
                assert await read_all(a, stored) == data
                await age_leases(a, stored.file_id, EXPIRED_SLACK * 2)  # the hour has passed, and more
                assert await c.release_pending() == [stored.file_id]
            else:
                assert released is True
            assert await gone(a, stored)
            assert await bookkeeping(a) == NOTHING


# --------------------------------------------------------------------------- deleters that died; gc


@bounded
async def test_a_stale_tombstone_does_not_block_readers_or_releases(settings):
    async with replicas(settings, 2) as (a, b):
        data, stored = await stored_content(a)
        _, other = await stored_content(a)
        tombstones = a.content.tombstones
        # Deleters that died between their steps, long enough ago.
        for file_id in (stored.file_id, other.file_id):
            await tombstones.insert_one({"_id": ObjectId(file_id), "at": clock.now() - STALE_TOMBSTONE * 2,
                                         "token": "dead"})
        leased = await b.lease_files([stored.file_id], OWNER, later(minutes=5))
        assert list(leased) == [stored.file_id]
        assert await read_all(b, stored) == data
        assert await a.release_file(other.file_id) is True
        assert await tombstones.count_documents({}) == 0
        assert await b.drop_leases(list(leased.values())) == []  # never released: it stays
        assert not await gone(a, stored)


@bounded
async def test_a_reader_waits_for_a_deletion_under_way(settings):
    async with replicas(settings, 2) as (a, b):
        _, stored = await stored_content(a)
        tombstones = a.content.tombstones
        await tombstones.insert_one({"_id": ObjectId(stored.file_id), "at": clock.now(), "token": "running"})
        leasing = asyncio.ensure_future(b.lease_files([stored.file_id], OWNER, later(minutes=5)))
        done, _ = await asyncio.wait([leasing], timeout=0.5)
        assert not done  # it cannot know yet whether that deletion saw its lease
        # That deletion ends having deleted the content (files document first, then its tombstone).
        await a.files.delete_one({"_id": ObjectId(stored.file_id)})
        await tombstones.delete_one({"_id": ObjectId(stored.file_id)})
        assert await leasing == {}
        assert (await bookkeeping(a))["leases"] == 0


@bounded
async def test_gc_removes_what_dead_replicas_left(settings):
    async with replicas(settings, 2) as (a, b):
        _, held = await stored_content(a)
        _, abandoned = await stored_content(a)
        live = await b.lease_files([held.file_id], OWNER, later(minutes=5))
        dead = await b.lease_files([abandoned.file_id], OWNER, later(minutes=5))
        assert await a.release_file(held.file_id) is False
        assert await a.release_file(abandoned.file_id) is False
        # B dies; its lease on `abandoned` ends (and is long past), the other is renewed elsewhere.
        await age_leases(a, abandoned.file_id, EXPIRED_SLACK * 2)
        just_ended = await b.lease_files([held.file_id], OWNER, clock.now() - timedelta(seconds=5))
        vanished = ObjectId()
        await a.content.pending.insert_one({"_id": vanished, "at": clock.now()})
        await a.content.tombstones.insert_one({"_id": ObjectId(), "at": clock.now() - STALE_TOMBSTONE * 2,
                                               "token": "dead"})
        assert await a.collect_garbage(timedelta(hours=1), dry_run=True) == []
        assert (await bookkeeping(a)) == {"leases": 3, "tombstones": 1, "pending": 3}

        report = await a.collect_garbage(timedelta(hours=1), dry_run=False)
        assert report == [f"file {abandoned.file_id} {SIZE} bytes (no model refers to it)"]
        assert await gone(a, abandoned) and not await gone(a, held)
        leases = {str(raw["_id"]) async for raw in a.content.leases.find()}
        # The one that ended a moment ago stays (a late heartbeat may still renew it).
        assert leases == {*live.values(), *just_ended.values()} and not leases & set(dead.values())
        assert await a.content.pending.distinct("_id") == [ObjectId(held.file_id)]
        assert await a.content.tombstones.count_documents({}) == 0
        assert await b.drop_leases(list(live.values())) == [held.file_id]


@bounded
async def test_leases_of_many_files_at_once(settings):
    """A snapshot's download leases all its files in one call (a few round trips, not one per file)."""
    async with replicas(settings, 2) as (a, b):
        files = [await store(a, os.urandom(100 + i)) for i in range(30)]
        ids = [f.file_id for f in files]
        leased = await b.lease_files(ids, OWNER, later(minutes=5))
        assert set(leased) == set(ids) and len(set(leased.values())) == len(ids)
        assert all([not await a.release_file(i) for i in ids])
        assert sorted(await b.drop_leases(list(leased.values()))) == sorted(ids)
        assert await bookkeeping(a) == NOTHING
        assert all([await gone(a, f) for f in files])



async def test_coordination_reads_the_primary_and_writes_a_majority_whatever_the_url_says(settings):
    """A lease, a lock or a files document acknowledged by one member only could be rolled back by a
    fail-over, and one read from a secondary could miss a deletion marker; chunks keep the URL's
    write concern (their files document, written after them with w: majority, covers them)."""
    import dataclasses

    url = settings.mongodb_url.rstrip("/") + "/?w=1&readPreference=secondaryPreferred"
    storage = make_storage(dataclasses.replace(settings, mongodb_url=url))
    try:
        for coll in (storage.models, storage.files, storage.content.leases, storage.content.tombstones,
                     storage.content.pending, storage.download_events, storage.sessions):
            assert coll.write_concern.document == {"w": "majority"}, coll.name
            assert coll.read_preference == ReadPreference.PRIMARY, coll.name
        assert storage.chunks.write_concern.document == {"w": 1}
        assert storage.chunks.read_preference == ReadPreference.PRIMARY
    finally:
        await storage.close()
