"""Which GridFS uploads are still being written, for ``gc`` in another process.

An upload's chunks have no files document until it commits, which is also
what a crashed upload leaves; their age cannot tell the two apart, since a
client may stall for a while between chunks. So a writer records its files id
here before its first chunk and removes it when it commits or cancels, and
while it lives this process refreshes the record every ``HEARTBEAT``. gc
leaves the chunks of a fresh record alone; a record not refreshed for
``STALE_AFTER`` belongs to a process that died, and gc removes it with the
chunks. (The embedded backend does the same with a lock on the temp file.)
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from bson import ObjectId
from pymongo.errors import PyMongoError

from ..clock import now

log = logging.getLogger("app.storage")

HEARTBEAT = 30.0
STALE_AFTER = timedelta(minutes=2)


class LiveUploads:
    def __init__(self, collection) -> None:
        self._records = collection
        self._mine: set[ObjectId] = set()
        self._heartbeat: asyncio.Task | None = None

    async def create_index(self) -> None:
        """At start-up, which also creates the collection: not in the middle of an upload."""
        await self._records.create_index("seen_at")

    async def add(self, files_id: ObjectId) -> None:
        await self._records.insert_one({"_id": files_id, "seen_at": now()})
        self._mine.add(files_id)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat())

    async def remove(self, files_id: ObjectId) -> None:
        if files_id not in self._mine:
            return
        self._mine.discard(files_id)
        if not self._mine and self._heartbeat is not None:
            # No task outlives the uploads it refreshes.
            self._heartbeat.cancel()
            self._heartbeat = None
        try:
            await self._records.delete_one({"_id": files_id})
        except PyMongoError as e:
            # It goes stale by itself, and gc removes it then.
            log.info("could not remove the live-upload record of %s: %s", files_id, e.__class__.__name__)

    async def live(self) -> set[ObjectId]:
        """Files ids of uploads some process is still writing."""
        return set(await self._records.distinct("_id", {"seen_at": {"$gt": now() - STALE_AFTER}}))

    async def forget_stale(self) -> int:
        return (await self._records.delete_many({"seen_at": {"$lte": now() - STALE_AFTER}})).deleted_count

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._records.update_many({"_id": {"$in": list(self._mine)}}, {"$set": {"seen_at": now()}})
            except PyMongoError as e:
                log.warning("could not refresh live-upload records: %s", e.__class__.__name__)

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
