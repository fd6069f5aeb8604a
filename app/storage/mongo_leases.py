"""Content leases on MongoDB: who still needs stored content, across processes.

Three collections, whose documents are only ever inserted and deleted (never
updated by anyone but a lease's owner), because inserts into a unique index and
deletes by ``_id`` are the only writes atomic on every MongoDB wire server
(FerretDB runs each update and each conditional delete as a read, then a write):

- ``content_leases`` ``{_id: ObjectId, file_id, owner, until}``: a reader's,
  a commit's claim, a kept blob. Live while ``until`` is ahead.
- ``content_deletions`` ``{_id: file_id, at, token}``: a tombstone, held by the
  one release deleting that content right now.
- ``content_pending`` ``{_id: file_id, at}``: a release that found the content
  leased and waits for the last lease to end.

The rule is "insert, then look". A reader inserts its lease, then looks for a
tombstone and the files document; a deleter inserts its tombstone, then looks
for leases: whichever inserted second sees the other's document. Likewise a
deleter inserts the pending mark before it looks for leases, and a reader drops
its lease before it looks for a pending mark: one of them always sees the other,
so the last reader completes a release that waited for it. A commit hands its
content from its claim to its model (model inserted, then claim dropped), so a
deleter looks at leases before models: whichever moment it reads, one of the
two holds the content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from datetime import datetime, timedelta
from typing import Any, Awaitable, Callable

from bson import ObjectId
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..clock import now

log = logging.getLogger("app.storage.mongo")

# A tombstone this old belongs to a deleter that died between its steps.
STALE_TOMBSTONE = timedelta(seconds=30)
# A lease this far past its end is removed; the margin keeps a late heartbeat
# from racing the removal (an update and a conditional delete are not atomic here).
EXPIRED_SLACK = timedelta(minutes=1)
# Polling a tombstone until its deleter is done: a deletion takes a few round trips.
_POLL_FIRST, _POLL_MAX = 0.002, 0.05
# Ids per $in or insert_many: bounds the size of one command.
_BATCH = 1000

KEEP_OWNER = "keep"


def claim_owner() -> str:
    """A claim names the process that took it, for diagnosis (asked each time: workers fork)."""
    return f"claim:{socket.gethostname()}:{os.getpid()}"

Retry = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


def referring(oid: ObjectId) -> dict[str, Any]:
    """Models whose file, or one of whose snapshot files, is this content."""
    return {"$or": [{"file_metadata.file_id": oid}, {"files.file_id": oid}]}


def _batches(items: list, size: int = _BATCH):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ContentLeases:
    """The protocol; MongoStorage maps its driver errors. ``retry`` runs one step again
    while the server answers busy (a busy step did not happen, so repeating it is safe;
    repeating the whole protocol would not be)."""

    def __init__(self, db, files, chunks, models, retry: Retry) -> None:
        self.leases = db["content_leases"]
        self.tombstones = db["content_deletions"]
        self.pending = db["content_pending"]
        self._files, self._chunks, self._models = files, chunks, models
        self._retry = retry
        # lease id -> file id of leases this process took: a drop then needs no read.
        self._leased: dict[ObjectId, ObjectId] = {}

    async def create_indexes(self) -> None:
        await self.leases.create_index("file_id")
        await self.leases.create_index("until")

    # -- leases ------------------------------------------------------------------
    async def insert(self, file_id: ObjectId, owner: str, until: datetime) -> ObjectId:
        """A lease on content not visible yet (a commit's, before its files document):
        no release can be deleting what nobody can see, so there is nothing to look for."""
        doc = {"_id": ObjectId(), "file_id": file_id, "owner": owner, "until": until}
        await self._retry(lambda: self.leases.insert_one(doc))
        self._leased[doc["_id"]] = file_id
        return doc["_id"]

    async def lease(self, file_ids: list[ObjectId], owner: str, until: datetime,
                    dropped: bool = True) -> dict[ObjectId, ObjectId]:
        """{file id: lease id} for each file leased; a file gone, or being deleted and then
        gone, gets none (and no lease is left for it). ``dropped``: whether the lease will be
        dropped (a keep's simply ends)."""
        docs = [{"_id": ObjectId(), "file_id": f, "owner": owner, "until": until}
                for f in dict.fromkeys(file_ids)]
        if not docs:
            return {}
        try:
            for batch in _batches(docs):
                await self._retry(lambda batch=batch: self.leases.insert_many(batch, ordered=True))
            await self._deletions_done([d["file_id"] for d in docs])
            present: set[ObjectId] = set()
            for batch in _batches([d["file_id"] for d in docs]):
                present |= {raw["_id"] async for raw in self._files.find({"_id": {"$in": batch}}, {"_id": 1})}
        except BaseException:
            # Nobody will drop them: leave nothing behind if the database lets us, else they expire.
            with contextlib.suppress(PyMongoError):
                await self._delete_leases([d["_id"] for d in docs])
            raise
        await self._delete_leases([d["_id"] for d in docs if d["file_id"] not in present])
        leased = {d["file_id"]: d["_id"] for d in docs if d["file_id"] in present}
        if dropped:
            self._leased.update((lease, file) for file, lease in leased.items())
        return leased

    def forget(self, lease_id: ObjectId) -> None:
        """A lease this process will not drop after all (it simply ends)."""
        self._leased.pop(lease_id, None)

    async def renew(self, lease_ids: list[ObjectId], until: datetime) -> None:
        # Only the owner writes its leases (gc removes them a minute after they end).
        for batch in _batches(list(dict.fromkeys(lease_ids))):
            await self._retry(lambda batch=batch: self.leases.update_many(
                {"_id": {"$in": batch}}, {"$set": {"until": until}}))

    async def drop(self, lease_ids: list[ObjectId]) -> list[ObjectId]:
        """End these leases, then complete the releases that waited for them; the file ids deleted."""
        lease_ids = list(dict.fromkeys(lease_ids))
        unknown = [lease for lease in lease_ids if lease not in self._leased]
        files = {self._leased.pop(lease) for lease in lease_ids if lease in self._leased}
        for batch in _batches(unknown):
            files |= {raw["file_id"] async for raw in self.leases.find({"_id": {"$in": batch}}, {"file_id": 1})}
        await self._delete_leases(lease_ids)
        # Looked for after the leases are gone: see the module's docstring.
        waiting: list[ObjectId] = []
        for batch in _batches(list(files)):
            waiting += [raw["_id"] async for raw in self.pending.find({"_id": {"$in": batch}}, {"_id": 1})]
        return await self._release_unleased(waiting)

    async def _delete_leases(self, lease_ids: list[ObjectId]) -> None:
        for batch in _batches(lease_ids):
            await self._retry(lambda batch=batch: self.leases.delete_many({"_id": {"$in": batch}}))

    async def _release_unleased(self, file_ids: list[ObjectId]) -> list[ObjectId]:
        """Release each of these files that no live lease holds (a file still held is released
        by its last holder's drop, or by release_pending once that lease has expired)."""
        held: set[ObjectId] = set()
        for batch in _batches(file_ids):
            held.update(await self.leases.distinct("file_id", {"file_id": {"$in": batch}, "until": {"$gt": now()}}))
        return [f for f in file_ids if f not in held and await self.release(f)]

    async def _deletions_done(self, file_ids: list[ObjectId]) -> None:
        """Wait until no deletion that may have missed our leases on these files is running.

        Those are the tombstones there now: a tombstone inserted later (another token)
        belongs to a deleter that will see our leases. A stale one is removed.
        """
        waiting: dict[ObjectId, str] = {}
        for batch in _batches(file_ids):
            waiting |= {t["_id"]: t["token"] async for t in self.tombstones.find({"_id": {"$in": batch}})}
        delay = _POLL_FIRST
        while waiting:
            stale_before = now() - STALE_TOMBSTONE
            current = {t["_id"]: t async for t in self.tombstones.find({"_id": {"$in": list(waiting)}})}
            for file_id, token in list(waiting.items()):
                t = current.get(file_id)
                if t is None or t["token"] != token:
                    del waiting[file_id]
                elif t["at"] < stale_before:
                    await self._retry(lambda t=t: self.tombstones.delete_one({"_id": t["_id"], "token": t["token"]}))
                    del waiting[file_id]
            if waiting:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)

    # -- releases ----------------------------------------------------------------
    async def release(self, file_id: ObjectId) -> bool:
        """Delete the content unless a model refers to it or a live lease holds it (then the
        release is remembered, and the last drop or release_pending completes it); True if
        this call deleted its files document."""
        token = secrets.token_hex(8)
        for attempt in range(2):
            try:
                await self._retry(lambda: self.tombstones.insert_one({"_id": file_id, "at": now(), "token": token}))
                break
            except DuplicateKeyError:
                if attempt:
                    # This tombstone's deleter began after this call did, so it sees
                    # everything this call would: the decision is its.
                    return False
                await self._deletions_done([file_id])
        try:
            deleted = await self._delete_unless_held(file_id)
        finally:
            # Whatever happened: a tombstone left behind would hold readers up until it is stale.
            await self._retry(lambda: self.tombstones.delete_one({"_id": file_id, "token": token}))
        if deleted is None:
            return False
        await self._retry(lambda: self._chunks.delete_many({"files_id": file_id}))
        await self._retry(lambda: self.pending.delete_one({"_id": file_id}))
        return deleted

    async def _delete_unless_held(self, file_id: ObjectId) -> bool | None:
        """With the tombstone in place: delete the files document (whether there was one), or
        None if a model refers to the content or a live lease holds it."""
        try:
            await self._retry(lambda: self.pending.insert_one({"_id": file_id, "at": now()}))
        except DuplicateKeyError:
            pass  # a release already waits for this content
        # Leases read before references: a commit holds its claim until its model is in, so a
        # claim gone by the first read means that model is there for the second. Read the other
        # way round, the claim could be dropped between the two, after the model was looked for.
        held = await self.leases.find_one({"file_id": file_id, "until": {"$gt": now()}}, {"_id": 1}) is not None
        if await self._models.find_one(referring(file_id), {"_id": 1}) is not None:
            await self._retry(lambda: self.pending.delete_one({"_id": file_id}))
            return None
        if held:
            return None  # the pending mark stays for the last holder
        # The files document first: from then on no lease can be taken.
        return (await self._retry(lambda: self._files.delete_one({"_id": file_id}))).deleted_count == 1

    async def release_pending(self) -> list[ObjectId]:
        # Every replica calls this (every LEASE_TTL): what dead ones leased, and keeps,
        # which nobody drops, go here too, not only when an operator runs gc.
        await self._forget_expired()
        waiting = [raw["_id"] async for raw in self.pending.find({}, {"_id": 1})]
        return await self._release_unleased(waiting)

    async def _forget_expired(self) -> int:
        expired = {"until": {"$lt": now() - EXPIRED_SLACK}}
        return (await self._retry(lambda: self.leases.delete_many(expired))).deleted_count

    # -- gc ----------------------------------------------------------------------
    async def collect(self, dry_run: bool) -> list[str]:
        """Remove what dead processes left (expired leases, stale tombstones, pending marks of
        content that is gone) and complete the releases whose leases have expired: one line per
        file deleted (the bookkeeping is logged, not reported: it is no stored content)."""
        at = now()
        stale = [t async for t in self.tombstones.find({"at": {"$lt": at - STALE_TOMBSTONE}})]
        marks = [raw["_id"] async for raw in self.pending.find({}, {"_id": 1})]
        sizes: dict[ObjectId, int] = {}
        for batch in _batches(marks):
            found = self._files.find({"_id": {"$in": batch}}, {"length": 1})
            sizes |= {raw["_id"]: raw["length"] async for raw in found}
        vanished = [file_id for file_id in marks if file_id not in sizes]
        if dry_run:
            return []
        ended = await self._forget_expired()
        for t in stale:
            await self._retry(lambda t=t: self.tombstones.delete_one({"_id": t["_id"], "token": t["token"]}))
        for file_id in vanished:
            # Nothing left to delete: a release of this id is moot.
            await self._retry(lambda file_id=file_id: self.pending.delete_one({"_id": file_id}))
        if ended or stale or vanished:
            log.info("gc: removed %d expired content lease(s), %d stale deletion mark(s), %d pending release(s) "
                     "of content already gone", ended, len(stale), len(vanished))
        deleted = await self._release_unleased([f for f in marks if f in sizes])
        return [f"file {file_id} {sizes[file_id]} bytes (no model refers to it)" for file_id in deleted]
