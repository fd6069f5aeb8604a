"""Cross-process locks on MongoDB: one document per held lock.

A lock on ``key`` is the document ``{_id: token, key, until}`` in the locks'
collection, taken by inserting it: a unique index on ``key`` lets one insert
win, on every MongoDB wire server (FerretDB, the test server, makes no update or
find-and-modify atomic across connections, so none is used to take a lock).

The holder's token is the document's ``_id``, a fresh ObjectId per attempt and
never reused. So renewing, releasing or removing a lapsed lock by ``_id``
touches exactly the lock meant, even on a server that runs a conditional write
as "find, then write by _id": had the key been the ``_id``, a removal of a
lapsed lock could land on the lock that replaced it, and a late renewal could
write the old holder back over the new one.

A lock whose ``until`` has passed belongs to a holder that died or stalled; the
next taker removes exactly that lock and inserts its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import timedelta
from typing import Any, Iterable

from bson import ObjectId
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..clock import now
from .base import StorageUnavailable

log = logging.getLogger("app.storage")

# Takeover attempts before answering busy: each failed insert means another
# taker got the lock in between, which is what busy means.
_ATTEMPTS = 3

# wait(): the first pause and the longest, in seconds (each jittered).
_FIRST_PAUSE, _LONGEST_PAUSE = 0.001, 0.05


class LockBusy(Exception):
    """Another holder's lock on this key is live."""


class Locks:
    """Locks on keys of one kind (``what`` names it in messages), each lapsing ``ttl`` after it was
    taken or renewed."""

    def __init__(self, collection, ttl: timedelta, what: str) -> None:
        self._locks = collection
        self._ttl = ttl
        self._what = what
        self._retries: set[asyncio.Task] = set()

    async def create_index(self) -> None:
        # Sparse: lock documents of the earlier shape (no key field) do not collide.
        await self._locks.create_index("key", unique=True, sparse=True)

    async def adopt_earlier_shape(self) -> None:
        """Locks left in the earlier shape, ``{_id: key, token, until}`` (upload sessions' until
        issue 16), become the same locks in this one, so that a writer of an earlier version that
        died still tells the next writer to discard what it left."""
        async for old in self._locks.find({"key": {"$exists": False}}):
            try:
                await self._locks.insert_one({"_id": ObjectId(), "key": old["_id"], "until": old["until"]})
            except DuplicateKeyError:
                pass  # another replica starting at the same moment adopted it, or the key is locked anew
            await self._locks.delete_one({"_id": old["_id"]})

    @staticmethod
    def new_token() -> ObjectId:
        return ObjectId()

    async def acquire(self, key: Any, token: ObjectId, ttl: timedelta | None = None) -> bool:
        """Take the lock on ``key`` under ``token`` (new_token()); LockBusy while another holder's
        lock is live.

        True if it took over a lapsed lock: its holder died or stalled, and may have
        left what the lock guards half-written. Only the taker that removed the lapsed
        lock learns of it: should another insert win right after that removal, the
        winner answers False, and the remover LockBusy. (An upload session's writer that
        meets the leftovers then fails one request, whose clean-up removes them.)
        """
        took_over = False
        for _ in range(_ATTEMPTS):
            try:
                await self._locks.insert_one({"_id": token, "key": key, "until": now() + (ttl or self._ttl)})
                return took_over
            except DuplicateKeyError:
                held = await self._locks.find_one({"key": key})
                if held is not None and held["_id"] == token:
                    return took_over  # an earlier insert of ours landed; its answer was lost
                if held is not None and held["until"] > now():
                    raise LockBusy(f"{self._what} {key} is locked") from None
                if held is not None:
                    # That lapsed lock only: one another taker put in its place stays.
                    await self._locks.delete_one({"_id": held["_id"]})
                    took_over = True
        raise LockBusy(f"{self._what} {key} is locked")

    async def wait(self, key: Any, token: ObjectId, ttl: timedelta | None = None, *, timeout: float) -> bool:
        """acquire(), again after short jittered pauses while the lock is busy; after ``timeout``
        seconds StorageUnavailable (a 503 with Retry-After)."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + timeout, _FIRST_PAUSE
        while True:
            try:
                return await self.acquire(key, token, ttl)
            except LockBusy:
                if loop.time() >= deadline:
                    raise StorageUnavailable(f"{self._what} {key} is busy") from None
            # Jittered, so that waiters that met once do not meet again at every try.
            await asyncio.sleep(min(pause * random.uniform(0.5, 1.0), max(0.0, deadline - loop.time())))
            pause = min(pause * 2, _LONGEST_PAUSE)

    async def renew(self, key: Any, token: ObjectId, ttl: timedelta | None = None) -> bool:
        """Extend our lock; False if we no longer hold it (it lapsed and another taker removed it)."""
        result = await self._locks.update_one({"_id": token}, {"$set": {"until": now() + (ttl or self._ttl)}})
        return result.matched_count == 1

    async def release(self, key: Any, token: ObjectId) -> None:
        """Give our lock up; never raises, and a cancelled caller's release still happens. If the
        database is out of reach, again in the background until it is back (else the key stays
        busy until the lock lapses)."""
        task = asyncio.ensure_future(self._release(key, token))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            raise

    async def _release(self, key: Any, token: ObjectId) -> None:
        try:
            await self._locks.delete_one({"_id": token})
        except PyMongoError as e:
            log.info("could not release the lock of %s %s (%s); retrying", self._what, key, e.__class__.__name__)
            task = asyncio.create_task(self._release_when_back(token))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _release_when_back(self, token: ObjectId) -> None:
        loop = asyncio.get_running_loop()
        delay, deadline = 0.5, loop.time() + self._ttl.total_seconds()
        while loop.time() < deadline:  # after that the lock has lapsed anyway
            await asyncio.sleep(delay)
            try:
                await self._locks.delete_one({"_id": token})
                return
            except PyMongoError:
                delay = min(delay * 2, 8.0)

    async def forget_lapsed(self, keep: Iterable[Any] = ()) -> int:
        """Remove lapsed locks, except those on the keys in ``keep``.

        Upload sessions keep the lapsed locks of live sessions: such a lock tells
        the next writer that the last one died, and that writer then discards
        what it left. A lapsed lock that is removed here, meanwhile taken over,
        was that one lock only (by its ``_id``); its taker's lock stays.
        """
        result = await self._locks.delete_many({"until": {"$lt": now()}, "key": {"$nin": list(keep)}})
        return result.deleted_count

    def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
