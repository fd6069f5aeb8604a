"""The leases this process's readers hold on stored content, kept in the storage.

Replacing or deleting a model releases the content it stops referring to
(``storage.release_file``). A download still streaming that content, in this
process or in any other sharing the store (``--workers``, replicas), holds a
lease on it: the storage then remembers the release and completes it when the
last lease is dropped, or, if the reader's process died, once its lease has
expired (``release_pending``, which every process runs every LEASE_TTL).

Local readers of one file share one lease: the first takes it, the last drops
it. A heartbeat renews this process's leases every LEASE_TTL/3, so a lease
outlives its reader's process by at most LEASE_TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import clock
from .locks import KeyedLocks
from .storage.base import ContentGone, Storage

log = logging.getLogger("app.leases")

# Names this process as the owner of its leases (for diagnosis: which replica, which pid).
REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

DEFAULT_TTL = 60.0


@dataclass
class _Lease:
    lease_id: str
    readers: int


class FileLeases:
    """The process's lease keeper: ``reading(*file_ids)`` around a body; ``start``/``stop`` with the app."""

    def __init__(self, storage: Storage, ttl: float = DEFAULT_TTL) -> None:
        self._storage = storage
        self.ttl = ttl
        self._held: dict[str, _Lease] = {}
        # Taking and dropping one file's lease take turns: a reader never
        # counts itself in on a lease that is being dropped.
        self._turns = KeyedLocks()
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None

    @asynccontextmanager
    async def reading(self, *file_ids: str):
        """Hold these files (a download's, or a snapshot tar's many) until the block ends.

        ContentGone if one of them is deleted, or being deleted (nothing is held then).
        """
        held = await self._take(list(dict.fromkeys(file_ids)))
        try:
            yield
        finally:
            self._give_back(held)

    def holds(self, file_id: str) -> bool:
        """Whether this process holds a lease on the file (for tests and diagnosis)."""
        return file_id in self._held

    def _until(self) -> datetime:
        return clock.now() + timedelta(seconds=self.ttl)

    async def _take(self, file_ids: list[str]) -> list[str]:
        taken: list[str] = []
        try:
            wanted = []
            for file_id in file_ids:
                lease = self._held.get(file_id)
                if lease is not None and lease.readers:
                    lease.readers += 1  # no drop can be under way while it has readers
                    taken.append(file_id)
                else:
                    wanted.append(file_id)
            if wanted:
                await self._lease(sorted(wanted), taken)
        except BaseException:
            self._give_back(taken)
            raise
        return taken

    async def _lease(self, file_ids: list[str], taken: list[str]) -> None:
        async with AsyncExitStack() as turns:
            # In sorted order, here and in _drop: two requests never wait on each other's turns.
            for file_id in file_ids:
                await turns.enter_async_context(self._turns(file_id))
            missing = []
            for file_id in file_ids:
                lease = self._held.get(file_id)
                if lease is not None:  # taken meanwhile, or its drop has not had its turn yet
                    lease.readers += 1
                    taken.append(file_id)
                else:
                    missing.append(file_id)
            if not missing:
                return
            leasing = asyncio.ensure_future(self._storage.lease_files(missing, REPLICA_ID, self._until()))
            try:
                leased = await asyncio.shield(leasing)
            except asyncio.CancelledError:
                # The storage call runs on: whatever it leased is recorded, so it is dropped again.
                await asyncio.wait([leasing])
                if not leasing.cancelled() and leasing.exception() is None:
                    self._record(leasing.result(), taken)
                raise
            self._record(leased, taken)
            gone = [file_id for file_id in missing if file_id not in leased]
            if gone:
                raise ContentGone(f"stored file {', '.join(gone)} was deleted before it could be read")

    def _record(self, leased: dict[str, str], taken: list[str]) -> None:
        for file_id, lease_id in leased.items():
            self._held[file_id] = _Lease(lease_id, 1)
            taken.append(file_id)

    def _give_back(self, file_ids: list[str]) -> None:
        ending = []
        for file_id in file_ids:
            lease = self._held.get(file_id)
            if lease is None:
                continue  # dropped by drain() at shutdown already
            lease.readers -= 1
            if not lease.readers:
                ending.append(file_id)
        if ending:
            # A task: a reader that is being cancelled (its client left) still drops its lease.
            task = asyncio.get_running_loop().create_task(self._drop(sorted(ending)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drop(self, file_ids: list[str]) -> None:
        async with AsyncExitStack() as turns:
            for file_id in file_ids:
                await turns.enter_async_context(self._turns(file_id))
            ending = [self._held.pop(file_id) for file_id in file_ids
                      if file_id in self._held and not self._held[file_id].readers]
            if ending:
                await self._drop_leases([lease.lease_id for lease in ending])

    async def _drop_leases(self, lease_ids: list[str]) -> None:
        try:
            await self._storage.drop_leases(lease_ids)
        except Exception as e:
            # Not renewed any more: they expire within LEASE_TTL, and release_pending
            # (here or in another process) completes what they held back.
            log.warning("could not drop %d lease(s); they expire within %g s: %s", len(lease_ids), self.ttl, e)

    # -- with the application ----------------------------------------------------
    async def start(self) -> None:
        """Start the heartbeat (after the storage is open)."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="lease heartbeat")

    async def _beat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.ttl / 3)
            beats += 1
            try:
                lease_ids = [lease.lease_id for lease in self._held.values()]
                if lease_ids:
                    await self._storage.renew_leases(lease_ids, self._until())
                if beats % 3 == 0:
                    if released := await self._storage.release_pending():
                        log.info("released %d file(s) whose readers are gone", len(released))
            except Exception as e:
                # The next beat tries again; a lease lapses only after LEASE_TTL.
                log.warning("lease heartbeat failed: %r", e)

    async def stop(self) -> None:
        """Stop the heartbeat and drop every lease still held (at shutdown, before the storage closes)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        await self.drain()
        if self._held:  # readers cut short that never left their block
            held, self._held = self._held, {}
            await self._drop_leases([lease.lease_id for lease in held.values()])

    async def drain(self) -> None:
        """Wait for the drops under way (the releases they complete included)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
