"""Stored files that downloads in this process are reading right now.

Replacing or deleting a model releases its old file. If a download is still
streaming that file, deleting the content under it would cut the download
short (GridFS chunks vanish mid-cursor), so the release waits until the last
reader in this process has finished. Readers in other processes (``--workers``)
are not seen here; for them the window is the few chunks a cursor has buffered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import asynccontextmanager

from .storage.base import Storage, StorageError

log = logging.getLogger("app.leases")


class FileLeases:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._readers: Counter[str] = Counter()
        self._deferred: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    @asynccontextmanager
    async def reading(self, *file_ids: str):
        """Keep these files (a download's, or a snapshot tar's many) until the block ends."""
        held = list(dict.fromkeys(file_ids))
        for file_id in held:
            self._readers[file_id] += 1
        try:
            yield
        finally:
            for file_id in held:
                self._done_reading(file_id)

    def _done_reading(self, file_id: str) -> None:
        self._readers[file_id] -= 1
        if not self._readers[file_id]:
            del self._readers[file_id]
            if file_id in self._deferred:
                self._deferred.discard(file_id)
                # A task, so a reader that is being cancelled still releases.
                task = asyncio.create_task(self._release_now(file_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def release(self, file_id: str) -> None:
        """Release now, or as soon as the last local reader of the file is done."""
        if self._readers[file_id]:
            self._deferred.add(file_id)
        else:
            await self._storage.release_file(file_id)

    async def _release_now(self, file_id: str) -> None:
        try:
            await self._storage.release_file(file_id)
        except StorageError as e:
            # The content stays; `model-service gc` finds unreferenced files.
            log.warning("could not release file %s after its last reader: %s", file_id, e)

    async def drain(self) -> None:
        """Wait for deferred releases (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
