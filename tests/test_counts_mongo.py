"""Several replicas on one MongoDB: model locks, model updates and download counts.

Each MongoStorage here has its own AsyncMongoClient, so its connections are
another process's as far as the server can tell. The FerretDB test server runs
every update as "find, then write by _id" (REPLICAS_CONTRACT.md), so what these
tests race is what three replicas would.
"""

import asyncio
import time
from datetime import datetime, timedelta

import pytest
from bson import ObjectId
from pymongo.errors import AutoReconnect

from app import clock
from app.storage.base import DOWNLOAD_HISTORY, StorageUnavailable
from app.storage.mongo import MongoStorage
from app.storage.mongo_locks import LockBusy
from tests.support import deadlines

BOUND = 120  # seconds: no test here may hang
REPLICAS = 4


bounded = deadlines.bounded(BOUND)


@pytest.fixture
async def stores(mongo, mongo_db_name):
    """REPLICAS storages on one database, each with its own client; an empty database afterwards."""
    opened = []
    try:
        for _ in range(REPLICAS):
            store = MongoStorage(mongo.url, mongo_db_name, "models", timeout_ms=2000)
            await store.open()
            opened.append(store)
        yield opened
    finally:
        for store in opened:
            await store.close()
        if mongo.server is None or mongo.server.running:
            with mongo.sync_client() as c:
                for name in c[mongo_db_name].list_collection_names():
                    c[mongo_db_name][name].delete_many({})


async def new_model(store, **fields) -> str:
    at = clock.now()
    model_id = str(ObjectId())
    await store.insert_model({"id": model_id, "name": f"m-{model_id}", "version": "1.0.0", "algorithm": "x",
                              "status": "active", "created_at": at, "updated_at": at, "download_count": 0,
                              **fields})
    return model_id


# One clock reading for the module: a test that runs across the hour still names the same hours.
_THIS_HOUR = clock.now().replace(minute=0, second=0, microsecond=0)


def hour(h: int) -> datetime:
    """The start of the hour ``h`` hours before this one."""
    return _THIS_HOUR - timedelta(hours=h)


async def settled(store, timeout: float = 30.0) -> None:
    """Wait until every download event is folded (a fold may go on in the background)."""
    deadline = time.monotonic() + timeout
    while await store.db["download_events"].count_documents({}):
        assert time.monotonic() < deadline, f"download events still unfolded after {timeout} s"
        await asyncio.sleep(0.05)


async def counted(store, model_id: str, since: datetime) -> tuple[int, dict[datetime, int]]:
    """The model's download_count and the hourly downloads statistics() reports since ``since``."""
    doc = await store.get_model(model_id)
    stats = await store.statistics(clock.now(), since)
    return doc["download_count"], stats.downloads_by_hour


# -- download counts ---------------------------------------------------------
@bounded
async def test_concurrent_downloads_on_many_replicas_are_counted_exactly(stores):
    model_id = await new_model(stores[0])
    per_replica = 25
    at = [hour(0), hour(1)]

    async def downloads(store, r):
        await asyncio.gather(*(store.record_download(model_id, at[(r + i) % 2]) for i in range(per_replica)))

    await asyncio.gather(*(downloads(store, r) for r, store in enumerate(stores)))
    await settled(stores[0])
    total = REPLICAS * per_replica
    count, by_hour = await counted(stores[1], model_id, hour(2))
    assert count == total
    assert by_hour == {at[0]: total // 2, at[1]: total // 2}
    assert (await stores[2].statistics(clock.now(), hour(2))).total_downloads == total
    # Nothing is folded twice later on.
    await stores[3].record_download(model_id, at[0])
    await settled(stores[0])
    assert await counted(stores[0], model_id, hour(2)) == (total + 1, {at[0]: total // 2 + 1, at[1]: total // 2})


@bounded
async def test_downloads_of_several_models_sum_per_hour(stores):
    a, b = await new_model(stores[0]), await new_model(stores[1])
    await asyncio.gather(*(stores[i % REPLICAS].record_download(a if i % 3 else b, hour(0)) for i in range(30)))
    await settled(stores[0])
    assert (await stores[0].get_model(a))["download_count"] == 20
    assert (await stores[0].get_model(b))["download_count"] == 10
    stats = await stores[1].statistics(clock.now(), hour(1))
    assert (stats.total_downloads, stats.downloads_since, stats.downloads_by_hour) == (30, 30, {hour(0): 30})


@bounded
async def test_batches_on_many_replicas_are_counted_exactly(stores):
    """A batch (app/counts.py) is an event per (model, hour) carrying n: each fold adds n."""
    a, b = await new_model(stores[0]), await new_model(stores[1])
    batches = [{(a, hour(0)): i + 1, (b, hour(1)): 2} for i in range(8)]
    await asyncio.gather(*(stores[i % REPLICAS].record_downloads(batch) for i, batch in enumerate(batches)))
    await settled(stores[0])
    assert (await stores[1].get_model(a))["download_count"] == 36
    assert (await stores[2].get_model(b))["download_count"] == 16
    stats = await stores[3].statistics(clock.now(), hour(2))
    assert (stats.total_downloads, stats.downloads_by_hour) == (52, {hour(0): 36, hour(1): 16})


# The steps of a fold, each a method of a collection: a failure there leaves the
# fold's events marked, and what came before it done.
FOLD_STEPS = {
    "marking the events": ("download_events", "update_many"),
    "counting on the model": ("models", "update_one"),
    "counting in the hour's tally": ("download_tallies", "update_one"),
    "deleting the events": ("download_events", "delete_many"),
}


def _fold_step_fails(store, step: str, monkeypatch):
    """From now on the fold's ``step`` (FOLD_STEPS) fails in ``store``: the calls it got, and what undoes it."""
    collection, method = FOLD_STEPS[step]
    target = getattr(store, collection)
    real = getattr(target, method)
    failures = []

    async def fails(*args, **kwargs):
        failures.append(args)
        raise AutoReconnect(f"connection lost while {step} (test)")

    monkeypatch.setattr(target, method, fails)
    return failures, lambda: monkeypatch.setattr(target, method, real)


@bounded
@pytest.mark.parametrize("died", [False, True], ids=["failed", "died"])
@pytest.mark.parametrize("step", FOLD_STEPS)
async def test_a_fold_interrupted_midway_is_finished_by_the_next_never_doubled(stores, monkeypatch, step, died):
    """``died``: the process stopped there, leaving the model's lock held until it lapses."""
    first, second = stores[0], stores[1]
    model_id = await new_model(first)
    for _ in range(3):
        await first.record_download(model_id, hour(1))
    failures, restore = _fold_step_fails(first, step, monkeypatch)
    if died:
        async def stays(key, token):  # a dead process releases nothing
            pass

        monkeypatch.setattr(first.model_locks, "release", stays)
    await first.record_download(model_id, hour(0))  # counted all the same: its event is stored
    await first.record_download(model_id, hour(0))
    assert failures, f"no fold reached {step}"
    restore()
    assert await first.db["download_events"].count_documents({}) == 2
    if died:
        # The lock is the dead process's until it lapses; then the next fold takes it over.
        await second.record_download(model_id, hour(0))
        assert await second.db["download_events"].count_documents({}) == 3
        result = await second.db["model_locks"].update_many({}, {"$set": {"until": clock.now() - timedelta(1)}})
        assert result.matched_count == 1
    await second.record_download(model_id, hour(0))
    await settled(second)
    expected = 3 + 2 + (2 if died else 1)
    assert await counted(second, model_id, hour(2)) == (expected, {hour(1): 3, hour(0): expected - 3})
    assert await second.db["model_locks"].count_documents({}) == 0


@bounded
@pytest.mark.parametrize("step", FOLD_STEPS)
async def test_a_batch_whose_folds_failed_midway_counts_each_n_once(stores, monkeypatch, step):
    first, second = stores[0], stores[1]
    a, b = await new_model(first), await new_model(first)
    failures, restore = _fold_step_fails(first, step, monkeypatch)
    await first.record_downloads({(a, hour(0)): 5, (a, hour(1)): 2, (b, hour(0)): 3})  # stored: counted
    assert failures, f"no fold reached {step}"
    restore()
    assert await first.db["download_events"].count_documents({}) == 3
    await second.record_downloads({(a, hour(0)): 1, (b, hour(0)): 1})
    await settled(second)
    assert (await second.get_model(a))["download_count"] == 8
    assert (await second.get_model(b))["download_count"] == 4
    stats = await second.statistics(clock.now(), hour(2))
    assert (stats.total_downloads, stats.downloads_by_hour) == (12, {hour(0): 10, hour(1): 2})


@bounded
@pytest.mark.parametrize("rounds", [3, 1], ids=["in-the-request", "in-the-background"])
async def test_a_download_during_a_fold_is_folded_by_that_folds_holder(stores, monkeypatch, rounds):
    """Insert, then look: its event came after the holder read the events, its lock attempt before
    the holder released the lock; the holder finds it when it looks again, after releasing (and
    past its rounds, folds on in the background)."""
    monkeypatch.setattr("app.storage.mongo._FOLD_ROUNDS", rounds)
    holder, other = stores[0], stores[1]
    model_id = await new_model(holder)
    real = holder.models.update_one
    meanwhile = []

    async def with_a_download_meanwhile(*args, **kwargs):
        if not meanwhile:
            meanwhile.append(await other.record_download(model_id, hour(0)))
            assert await other.db["download_events"].count_documents({}) == 2  # the lock was busy
        return await real(*args, **kwargs)

    monkeypatch.setattr(holder.models, "update_one", with_a_download_meanwhile)
    await holder.record_download(model_id, hour(0))
    assert meanwhile
    if rounds == 1:
        await settled(holder)
    assert await holder.db["download_events"].count_documents({}) == 0
    assert await counted(holder, model_id, hour(1)) == (2, {hour(0): 2})


@bounded
@pytest.mark.parametrize("update_fails", [False, True], ids=["update", "failed-update"])
async def test_a_download_that_found_the_lock_busy_is_folded_by_its_holder(stores, monkeypatch, update_fails):
    """The holder may be an update: it looks for events after releasing the lock, as a fold does,
    whether its update went through or not."""
    holder, updater, downloader = stores[0], stores[1], stores[2]
    model_id = await new_model(holder)
    if update_fails:
        async def fails(*args, **kwargs):
            raise AutoReconnect("connection lost (test)")

        monkeypatch.setattr(updater.models, "find_one_and_update", fails)
    oid, token = ObjectId(model_id), holder.model_locks.new_token()
    assert await holder.model_locks.acquire(oid, token) is False
    update = asyncio.ensure_future(updater.update_model(model_id, {"description": "new"}))
    await downloader.record_download(model_id, hour(0))  # the lock is busy: the event waits
    assert (await downloader.get_model(model_id))["download_count"] == 0
    assert not update.done()
    await holder.model_locks.release(oid, token)
    if update_fails:
        with pytest.raises(StorageUnavailable):
            await update
    else:
        assert (await update)["description"] == "new"
    # No later download came: the update's holder folded it.
    assert await downloader.db["download_events"].count_documents({}) == 0
    assert (await downloader.get_model(model_id))["download_count"] == 1


@bounded
async def test_downloads_of_a_deleted_model_stay_in_the_hourly_statistics(stores):
    model_id = await new_model(stores[0])
    await stores[0].record_download(model_id, hour(0))
    assert await stores[1].delete_model(model_id) is not None
    await stores[1].record_download(model_id, hour(0))
    stats = await stores[2].statistics(clock.now(), hour(1))
    assert (stats.total_downloads, stats.downloads_by_hour) == (0, {hour(0): 2})


@bounded
async def test_statistics_read_the_hourly_documents_of_earlier_versions(stores):
    await stores[0].downloads.insert_many([{"_id": hour(1), "count": 7}, {"_id": hour(30), "count": 9}])
    model_id = await new_model(stores[0])
    await stores[0].record_download(model_id, hour(1))
    await stores[0].record_download(model_id, hour(0))
    stats = await stores[1].statistics(clock.now(), hour(23))
    assert stats.downloads_by_hour == {hour(1): 8, hour(0): 1}
    assert stats.downloads_since == 9


@bounded
async def test_a_new_hour_prunes_tallies_past_the_history(stores):
    store = stores[0]
    old = hour(0) - DOWNLOAD_HISTORY - timedelta(hours=1)
    kept = hour(0) - DOWNLOAD_HISTORY + timedelta(hours=1)
    other = ObjectId()
    await store.download_tallies.insert_many([{"_id": {"m": other, "h": old}, "count": 1},
                                              {"_id": {"m": other, "h": kept}, "count": 2}])
    await store.downloads.insert_many([{"_id": old, "count": 3}, {"_id": kept, "count": 4}])
    model_id = await new_model(store)
    await store.record_download(model_id, hour(0))
    assert [t["_id"]["h"] async for t in store.download_tallies.find({}, sort=[("_id.h", 1)])] == [kept, hour(0)]
    assert [d["_id"] async for d in store.downloads.find({})] == [kept]


@bounded
async def test_gc_folds_leftover_events_and_forgets_lapsed_model_locks(stores):
    store = stores[0]
    model_id = await new_model(store)
    oid = ObjectId(model_id)
    long_ago = clock.now() - timedelta(minutes=5)
    # A download whose fold failed, and no download of that model since.
    await store.download_events.insert_one({"_id": ObjectId.from_datetime(long_ago), "model": oid,
                                            "hour": hour(0)})
    lapsed = ObjectId()
    await store.model_locks.acquire(lapsed, store.model_locks.new_token(), ttl=timedelta(seconds=-1))
    await store.collect_garbage(timedelta(hours=1), dry_run=True)
    assert await store.db["model_locks"].count_documents({}) == 1
    assert (await store.get_model(model_id))["download_count"] == 0
    await store.collect_garbage(timedelta(hours=1), dry_run=False)
    assert await store.db["model_locks"].count_documents({}) == 0
    assert await counted(store, model_id, hour(1)) == (1, {hour(0): 1})


# -- model updates -----------------------------------------------------------
@bounded
async def test_racing_swaps_each_return_the_file_they_replaced_exactly_once(stores):
    """What attach_file does on each replica: swap the model's file, and release the one it replaced."""
    def file(n: int) -> dict:
        return {"file_id": str(ObjectId()), "size_bytes": n}

    first = file(0)
    model_id = await new_model(stores[0], file_metadata=first)
    swaps = 10
    new = {r: [file(r * swaps + i + 1) for i in range(swaps)] for r in range(REPLICAS)}

    async def swap(store, fm):
        previous = await store.update_model(model_id, {"file_metadata": fm}, return_previous=True)
        return previous["file_metadata"]["file_id"]

    async def replica(r):
        return await asyncio.gather(*(swap(stores[r], fm) for fm in new[r]))

    replaced = [f for got in await asyncio.gather(*(replica(r) for r in range(REPLICAS))) for f in got]
    last = (await stores[0].get_model(model_id))["file_metadata"]["file_id"]
    # One chain first -> ... -> last: every value but the last was replaced, by exactly one swap.
    every = [first["file_id"]] + [fm["file_id"] for r in new for fm in new[r]]
    assert sorted(replaced + [last]) == sorted(every)
    assert await stores[0].db["model_locks"].count_documents({}) == 0


@bounded
async def test_an_update_waits_for_the_lock_then_answers_busy(stores, monkeypatch):
    holder, other = stores[0], stores[1]
    model_id = await new_model(holder)
    oid, token = ObjectId(model_id), holder.model_locks.new_token()
    await holder.model_locks.acquire(oid, token)
    monkeypatch.setattr("app.storage.mongo._MODEL_LOCK_WAIT", 0.3)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="busy"):
        await other.update_model(model_id, {"description": "x"})
    assert 0.3 <= time.monotonic() - started < 5
    assert (await other.get_model(model_id)).get("description") is None
    await holder.model_locks.release(oid, token)
    assert (await other.update_model(model_id, {"description": "x"}))["description"] == "x"


# -- the locks ---------------------------------------------------------------
@bounded
async def test_one_of_many_replicas_takes_a_lock(stores):
    key = ObjectId()
    tokens = [s.model_locks.new_token() for s in stores]
    results = await asyncio.gather(*(s.model_locks.acquire(key, t) for s, t in zip(stores, tokens)),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["LockBusy"] * (REPLICAS - 1) + ["bool"]
    winner = next(i for i, r in enumerate(results) if r is False)
    # A released lock is free again; a loser's release does not free the winner's.
    loser = (winner + 1) % REPLICAS
    await stores[loser].model_locks.release(key, tokens[loser])
    with pytest.raises(LockBusy):
        await stores[loser].model_locks.acquire(key, stores[loser].model_locks.new_token())
    await stores[winner].model_locks.release(key, tokens[winner])
    assert await stores[loser].model_locks.acquire(key, stores[loser].model_locks.new_token()) is False


@bounded
async def test_a_lapsed_lock_is_taken_over_by_exactly_one_replica(stores):
    for _ in range(10):
        key = ObjectId()
        dead = stores[0].model_locks.new_token()
        await stores[0].model_locks.acquire(key, dead, ttl=timedelta(seconds=-1))  # lapsed at once
        tokens = [s.model_locks.new_token() for s in stores]
        results = await asyncio.gather(*(s.model_locks.acquire(key, t) for s, t in zip(stores, tokens)),
                                       return_exceptions=True)
        # One winner; it may not be the replica that removed the lapsed lock, so it may not know
        # there was one (acquire's docstring).
        won = [i for i, r in enumerate(results) if not isinstance(r, LockBusy)]
        assert len(won) == 1 and results[won[0]] in (True, False), results
        winner = won[0]
        held = await stores[1].db["model_locks"].find({"key": key}).to_list(None)
        assert [h["_id"] for h in held] == [tokens[winner]]
        # The dead holder, back, has lost it: renewing fails, releasing leaves the new lock alone.
        assert await stores[0].model_locks.renew(key, dead) is False
        await stores[0].model_locks.release(key, dead)
        assert await stores[1].db["model_locks"].count_documents({"key": key}) == 1
        assert await stores[winner].model_locks.renew(key, tokens[winner]) is True


@bounded
async def test_wait_takes_a_lock_once_it_is_released(stores):
    key = ObjectId()
    holder, waiter = stores[0].model_locks, stores[1].model_locks
    token = holder.new_token()
    await holder.acquire(key, token)
    waiting = asyncio.ensure_future(waiter.wait(key, waiter.new_token(), timeout=30))
    for _ in range(5):  # it keeps trying while the lock is held
        await asyncio.sleep(0.01)
        assert not waiting.done()
    await holder.release(key, token)
    assert await waiting is False
    with pytest.raises(StorageUnavailable, match="model .* is busy"):
        await holder.wait(key, holder.new_token(), timeout=0.05)


@bounded
async def test_locks_of_the_earlier_shape_are_adopted(stores, mongo, mongo_db_name):
    """Upload-session locks were {_id: session id, token, until}: a writer of that version that died
    still tells the next writer to discard what it left, and a live one still excludes others."""
    locks = stores[0].db["upload_session_locks"]
    lapsed, live = ObjectId(), ObjectId()
    await locks.insert_many([{"_id": lapsed, "token": "dead", "until": clock.now() - timedelta(minutes=5)},
                             {"_id": live, "token": "busy", "until": clock.now() + timedelta(minutes=5)}])
    store = MongoStorage(mongo.url, mongo_db_name, "models", timeout_ms=2000)
    await store.open()
    try:
        assert await store.session_locks.acquire(lapsed, store.session_locks.new_token()) is True
        with pytest.raises(LockBusy):
            await store.session_locks.acquire(live, store.session_locks.new_token())
        assert await locks.count_documents({"key": {"$exists": False}}) == 0
    finally:
        await store.close()

