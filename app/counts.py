"""This process's download counts, written in batches off the downloads' path.

A counted download adds one to an in-memory tally per (model, hour) and goes
on at once. Every COUNT_FLUSH_INTERVAL seconds a flusher writes what has
accumulated with one ``storage.record_downloads`` (embedded: one SQLite
transaction; MongoDB: one event per (model, hour) carrying its count, folded
under each model's lock), and once more at shutdown, after the drain and before
the storage closes: a SIGTERM loses no count. A crash (SIGKILL, OOM kill, power
cut) loses the counts of at most one interval, plus whatever backlog a failing
store had left. COUNT_FLUSH_INTERVAL=0 writes each count before its
download's body instead, as before batching (a failure there loses that count,
logged).

Reads see this process's own counts: a handler that answers with counts (a
model, a listing, statistics) awaits ``settle()`` first, which writes what is
pending (nothing to do when nothing is). Other processes see them within an
interval.

A write that fails keeps its tallies for the next one. The backlog is bounded
(``MAX_PENDING`` (model, hour) pairs): beyond it a new pair's downloads are not
counted, and logged as such.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import datetime

from . import metrics
from .storage.base import Storage, StorageError, download_hour

log = logging.getLogger("app.counts")

# (model, hour) pairs waiting to be written: a failing store lets the backlog
# grow only this far (a few MB), whatever the outage's length.
MAX_PENDING = 50_000

# At shutdown, tries of the last write (the store may be busy for a moment).
_LAST_TRIES = 3

Key = tuple[str, datetime]


class DownloadCounts:
    """The process's count buffer: ``add`` per download; ``start``/``stop`` with the app."""

    def __init__(self, storage: Storage, interval: float) -> None:
        self._storage = storage
        self.interval = interval
        self._pending: Counter[Key] = Counter()
        self._writing: asyncio.Task[bool] | None = None
        self._flusher: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._dropped = 0
        self._failed_at: float | None = None  # loop time of the last failed write

    @property
    def pending(self) -> int:
        """Downloads counted here and not written yet (for tests and diagnosis)."""
        return sum(self._pending.values())

    async def add(self, model_id: str, at: datetime) -> None:
        """Count one download of the model at ``at``."""
        key = (model_id, download_hour(at))
        if self.interval:
            self._count(key, 1)
            return
        try:
            await self._storage.record_downloads({key: 1})
        except StorageError as e:
            # A lost count is not worth a failed download.
            metrics.STORAGE_ERRORS.labels("count_download").inc()
            log.warning("download of model %s not counted: %s", model_id, e)

    def _count(self, key: Key, n: int) -> None:
        if key not in self._pending and len(self._pending) >= MAX_PENDING:
            self._dropped += n
            return
        self._pending[key] += n

    async def settle(self) -> None:
        """Before answering with counts: write this process's pending ones, unless the last
        write failed within the interval (the flusher tries again; each read does not)."""
        if not self._pending and self._writing is None:
            return
        if self._failed_at is not None and asyncio.get_running_loop().time() - self._failed_at < self.interval:
            return
        await self.flush()

    async def flush(self) -> bool:
        """Write every count added before this call; False if that failed (they stay pending)."""
        if self._writing is not None:
            # Shielded, here and below: a caller cancelled must not cut a write
            # short, whose outcome would then be unknown.
            await asyncio.shield(self._writing)
        if self._writing is None:
            if not self._pending:
                return True
            batch, self._pending = self._pending, Counter()
            self._writing = asyncio.create_task(self._write(batch))
        return await asyncio.shield(self._writing)

    async def _write(self, batch: Counter[Key]) -> bool:
        try:
            await self._storage.record_downloads(batch)
        except Exception as e:  # noqa: BLE001 - a bug's exception too must not lose the batch
            for key, n in batch.items():
                self._count(key, n)
            self._failed_at = asyncio.get_running_loop().time()
            metrics.STORAGE_ERRORS.labels("count_download").inc()
            log.warning("%d download count(s) of %d (model, hour) pair(s) not written, kept for the next try: %s",
                        sum(batch.values()), len(batch), e, exc_info=not isinstance(e, StorageError))
            return False
        else:
            self._failed_at = None
            return True
        finally:
            self._writing = None
            if self._dropped:
                log.error("%d download(s) not counted: more than %d (model, hour) pairs waited to be written",
                          self._dropped, MAX_PENDING)
                self._dropped = 0

    async def start(self) -> None:
        if self.interval:
            self._stopping.clear()
            self._flusher = asyncio.create_task(self._flush_every_interval())

    async def _flush_every_interval(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                await self.flush()

    async def stop(self) -> None:
        """The last write: after the drain (no download adds any more), before the storage closes."""
        if self._flusher is not None:
            self._stopping.set()
            await self._flusher
            self._flusher = None
        for attempt in range(_LAST_TRIES):
            if await self.flush():
                return
            if attempt < _LAST_TRIES - 1:
                await asyncio.sleep(min(self.interval, 1.0) or 0.1)  # a pause between tries, not a wait for an event
        log.error("%d download(s) not counted: the store refused them at shutdown", self.pending)
