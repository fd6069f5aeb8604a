"""The leases this process's readers hold on stored content, kept in the storage.

Replacing or deleting a model releases the content it stops referring to
(``storage.release_file``). A download still streaming that content, in this
process or in any other sharing the store (``--workers``, replicas), holds a
lease on it: the storage then remembers the release and completes it when the
last lease is dropped, or, if the reader's process died, once its lease has
expired (``release_pending``, which every process runs every LEASE_TTL).

Local readers of one file share one lease: the first takes it, the last lets
it go. A heartbeat renews this process's leases every LEASE_TTL/3, so a lease
outlives its reader's process by at most LEASE_TTL.

A lease lingers for ``linger`` seconds (min(1 s, LEASE_TTL/3)) after its last
reader, still renewed, and is dropped only if no reader took it meanwhile:
back-to-back downloads of one file (a client's loop, ranges of one file over
a few connections) then share one lease instead of writing a lease and its
drop each. Releases made through this process (``release``) do not wait for
its own lingering leases: they drop the idle ones first, and a lease whose
readers are still reading is dropped as soon as its last reader leaves. A
release made by another process waits for this process's linger, at most
``linger`` longer than it would for the last reader alone (the drop that ends
the linger completes it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Coroutine, Iterable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import clock
from .locks import KeyedLocks
from .storage.base import ContentGone, Storage

log = logging.getLogger("app.leases")

# Names this process as the owner of its leases (for diagnosis: which replica, which pid).
REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

DEFAULT_TTL = 60.0
# Long enough to span the gap between back-to-back requests for one file (a
# millisecond or so), short enough that another process's release is barely
# delayed; never more than a heartbeat period, so that delay stays well below
# the LEASE_TTL a crashed reader's lease may already hold content.
LINGER = 1.0


def default_linger(ttl: float) -> float:
    return min(LINGER, ttl / 3)


@dataclass(slots=True)
class _Lease:
    lease_id: str
    readers: int
    # Released through this process (release()): no linger after its last reader.
    released: bool = False


class _Reading:
    """One reader's hold (FileLeases.reading). A class, not a generator-based context manager:
    one is entered per download, and an async generator costs a frame, a hook and a weak
    reference more (README, Performance: 16 KB downloads)."""

    __slots__ = ("_leases", "_file_ids", "_held")

    def __init__(self, leases: FileLeases, file_ids: tuple[str, ...]) -> None:
        self._leases = leases
        self._file_ids = file_ids
        self._held: list[str] = []

    async def __aenter__(self) -> None:
        self._held = await self._leases._take(list(dict.fromkeys(self._file_ids)))

    async def __aexit__(self, *exc_info: object) -> None:
        self._leases._give_back(self._held)


class FileLeases:
    """The process's lease keeper: ``reading(*file_ids)`` around a body, ``release(file_ids)``
    for content this process stops referring to; ``start``/``stop`` with the app."""

    def __init__(self, storage: Storage, ttl: float = DEFAULT_TTL, linger: float | None = None) -> None:
        self._storage = storage
        self.ttl = ttl
        self.linger = default_linger(ttl) if linger is None else linger
        self._held: dict[str, _Lease] = {}
        # The leases without readers, to the loop time their linger ends. Every
        # linger is as long, so insertion order is the order they end in.
        self._idle: dict[str, float] = {}
        self._expiry: asyncio.TimerHandle | None = None
        # Taking, dropping and releasing one file take turns: a reader never
        # counts itself in on a lease that is being dropped.
        self._turns = KeyedLocks()
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None

    def reading(self, *file_ids: str) -> _Reading:
        """``async with leases.reading(*file_ids):`` holds these files (a download's, or a snapshot
        tar's many) until the block ends.

        ContentGone if one of them is deleted, or being deleted (nothing is held then).
        """
        return _Reading(self, file_ids)

    def holds(self, file_id: str) -> bool:
        """Whether this process holds a lease on the file, lingering or read (for tests and diagnosis)."""
        return file_id in self._held

    def _until(self) -> datetime:
        return clock.now() + timedelta(seconds=self.ttl)

    async def _take(self, file_ids: list[str]) -> list[str]:
        taken: list[str] = []
        try:
            wanted = []
            for file_id in file_ids:
                lease = self._held.get(file_id)
                if lease is not None:
                    # Held, read or lingering: a drop that has not had its turn yet
                    # sees the reader and leaves the lease (one that had it, popped it).
                    if not lease.readers:
                        self._idle.pop(file_id, None)
                    lease.readers += 1
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
                    if not lease.readers:
                        self._idle.pop(file_id, None)
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
                continue  # dropped by stop() at shutdown already
            lease.readers -= 1
            if lease.readers:
                continue
            if lease.released:
                ending.append(file_id)
            else:
                self._idle[file_id] = asyncio.get_running_loop().time() + self.linger
        if ending:
            # A task: a reader that is being cancelled (its client left) still drops its lease.
            self._spawn(self._drop(sorted(ending)))
        if self._idle and self._expiry is None:
            self._expire_later()

    def _expire_later(self) -> None:
        self._expiry = asyncio.get_running_loop().call_at(next(iter(self._idle.values())), self._expire)

    def _expire(self) -> None:
        """Drop the leases whose linger has ended; one timer for all of them, set for the next one to end."""
        self._expiry = None
        now = asyncio.get_running_loop().time()
        ended = []
        for file_id, until in self._idle.items():
            if until > now:
                break
            ended.append(file_id)
        for file_id in ended:
            del self._idle[file_id]
        if ended:
            self._spawn(self._drop(sorted(ended)))
        if self._idle:
            self._expire_later()

    def _spawn(self, work: Coroutine[None, None, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drop(self, file_ids: list[str]) -> None:
        async with AsyncExitStack() as turns:
            for file_id in file_ids:
                await turns.enter_async_context(self._turns(file_id))
            # Not a lease a reader took meanwhile, nor one lingering again since (its own linger ends it).
            ending = [self._held.pop(file_id) for file_id in file_ids
                      if file_id in self._held and not self._held[file_id].readers and file_id not in self._idle]
            if ending:
                await self._drop_leases([lease.lease_id for lease in ending])

    async def _drop_leases(self, lease_ids: list[str]) -> None:
        try:
            await self._storage.drop_leases(lease_ids)
        except Exception as e:
            # Not renewed any more: they expire within LEASE_TTL, and release_pending
            # (here or in another process) completes what they held back.
            log.warning("could not drop %d lease(s); they expire within %g s: %s", len(lease_ids), self.ttl, e)

    # -- releases made through this process ----------------------------------------
    async def release(self, file_ids: Iterable[str]) -> None:
        """``storage.release_file`` for content this process stopped referring to, unhindered by its idle leases.

        A lingering lease on it is dropped first, in the file's turn, which the
        release keeps: no reader here leases it again in between. A lease that
        readers here still read is marked, so their last one drops it at once,
        completing the release (in the storage, as a lease of any process does).
        """
        for file_id in dict.fromkeys(file_ids):
            async with self._turns(file_id):
                lease = self._held.get(file_id)
                if lease is not None and lease.readers:
                    lease.released = True
                elif lease is not None:
                    del self._held[file_id]
                    self._idle.pop(file_id, None)
                    # Shielded: a release cut short still drops the lease it popped.
                    await asyncio.shield(self._spawn(self._drop_leases([lease.lease_id])))
                await self._storage.release_file(file_id)

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
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._idle.clear()
        if self._held:  # readers cut short that never left their block
            held, self._held = self._held, {}
            await self._drop_leases([lease.lease_id for lease in held.values()])

    async def drain(self) -> None:
        """End every linger now, and wait for the drops under way (the releases they complete included)."""
        while self._idle or self._tasks:
            if self._idle:
                ended, self._idle = sorted(self._idle), {}
                self._spawn(self._drop(ended))
            await asyncio.gather(*self._tasks, return_exceptions=True)
