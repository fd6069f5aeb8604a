"""The storage interface: registry metadata plus content-addressed model files.

Shaped after the Docker registry's storage driver: a file is written through a
writer that stays invisible until ``commit`` and leaves nothing behind after
``cancel``; it is read through a reader that starts at any byte offset. Both
backends (MongoDB + GridFS, embedded SQLite + a directory) implement this and
must behave identically; the HTTP layer never knows which one it has.

Model documents cross this interface as plain dicts (``ModelDocument``) with
``id`` as a 24-hex string and timestamps as timezone-aware UTC datetimes
(millisecond precision, which is what BSON stores).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import AsyncIterator, Callable, Hashable, TypedDict

from . import pipeline

__all__ = [
    "Amend",
    "CLAIM_GRACE",
    "ContentGone",
    "DEFAULT_CHUNK_SIZE",
    "DOWNLOAD_HISTORY",
    "DuplicateModel",
    "FileMissing",
    "FileWriter",
    "ModelDocument",
    "StoredFileMetadata",
    "ModelQuery",
    "RegistryStats",
    "SESSION_LOCK_TTL",
    "SessionBusy",
    "SessionHashes",
    "SessionMissing",
    "SessionWriter",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StoredFile",
    "UploadSession",
]

class StoredFileMetadata(TypedDict, total=False):
    """A model's file as its document records it (shown as schemas.FileMetadata)."""

    file_id: str
    filename: str
    size_bytes: int
    checksum: str
    format: str | None
    content_type: str
    chunk_size: int
    uploaded_at: datetime
    # Bookkeeping for the download validators, never shown (see render).
    last_modified_shared: bool


class ModelDocument(TypedDict, total=False):
    """A model as storage holds it (shown as schemas.Model). Partial for updates:
    ``update_model`` takes just the fields to set."""

    id: str
    name: str
    version: str
    algorithm: str
    status: str
    description: str
    hyperparameters: dict[str, object]
    metrics: dict[str, int | float]
    dataset_info: dict[str, object]
    tags: list[str]
    format: str
    parent_model_id: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    download_count: int
    file_metadata: StoredFileMetadata  # a version made by /upload
    # A version made by a commit: its files (app.snapshots.Entry, each with the
    # internal file_id and chunk_size of its content), in path order.
    files: list[dict[str, object]]
    snapshot_digest: str
    total_size_bytes: int
    superseded: bool  # the registry's mark: a higher version of the name exists (not shown)


# update_model's ``amend``: the fields to set as well, given the document just before the update.
Amend = Callable[[ModelDocument], ModelDocument]


# GridFS's standard chunk size; the embedded backend reports the same figure
# so that file metadata looks alike on both.
DEFAULT_CHUNK_SIZE = 255 * 1024

# A commit claims the stored content (new, or the copy it deduplicated onto)
# until its caller has pointed a model at it and calls settle_file(). A release
# leaves claimed content alone, or a delete of another model sharing the same
# bytes could remove them in that gap. A claim older than this is abandoned
# (its uploader crashed); `model-service gc` finds what that leaves.
CLAIM_GRACE = timedelta(minutes=10)

# A session's write lock lapses this long after it was taken or last renewed.
# Its writer renews it while bytes arrive, so only a writer whose process died
# (or that stalls this long between pieces) lets it lapse; the next request then
# takes the session over.
SESSION_LOCK_TTL = timedelta(seconds=60)

# How long hourly download tallies are kept (analytics look back a day).
DOWNLOAD_HISTORY = timedelta(days=30)


def download_hour(at: datetime) -> datetime:
    """The hour a download at ``at`` is tallied under: its start."""
    if not (at.minute or at.second or at.microsecond):
        return at  # clock.this_hour() already
    return at.replace(minute=0, second=0, microsecond=0)


class StorageError(Exception):
    """Base class for storage failures the HTTP layer maps to responses."""


class StorageUnavailable(StorageError):
    """The database cannot be reached right now (answer 503)."""


class ValueRefused(StorageError):
    """The database cannot store a value the API accepted (answer 400).

    FerretDB, for one, stores no list directly inside a list, which MongoDB does.
    """


class SessionBusy(StorageError):
    """Another request holds this upload session's write lock (answer 409, retry later)."""


class ContentGone(StorageError):
    """The content was deleted, or is being deleted, before it could be leased (lease_files)."""


class SessionMissing(StorageError):
    """No such upload session: never opened, completed, cancelled, or removed by gc."""


class DuplicateModel(StorageError):
    """A model with the same (name, version) already exists."""


class FileMissing(StorageError):
    """A model refers to a stored file that is not there (or is incomplete)."""


@dataclass(frozen=True)
class ModelQuery:
    """Filters, order and page of a model listing; values are literals only."""

    algorithm: str | None = None
    status: str | None = None
    tags: tuple[str, ...] = ()
    text: str | None = None
    min_accuracy: float | None = None
    created_by: str | None = None
    created_before: datetime | None = None
    # Only each name's latest version (models the registry has not marked
    # superseded: see registry.settle_latest).
    latest_only: bool = False
    # "created_at", "name", "download_count" or "metrics.<name>"
    sort_field: str = "created_at"
    sort_desc: bool = True
    skip: int = 0
    limit: int = 10


@dataclass(frozen=True)
class RegistryStats:
    """Aggregates the database computes for /statistics."""

    by_algorithm: dict[str, int]
    by_status: dict[str, int]
    total_downloads: int
    stored_bytes: int  # distinct content, each shared file counted once
    models_with_files: int
    model_bytes: int  # per model, a shared file counted for each model
    added_since: int  # models created at or after `since_added`
    downloads_since: int  # downloads in hourly buckets at or after `since_downloads`
    # Those downloads per hour (the hour's start, UTC); hours without any are absent.
    downloads_by_hour: dict[datetime, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredFile:
    """Committed content, shared by every model whose file has this sha256."""

    file_id: str
    size: int
    sha256: str
    chunk_size: int
    uploaded_at: datetime


@dataclass(frozen=True)
class UploadSession:
    """A resumable upload (POST /api/v1/uploads) as storage holds it, between requests."""

    id: str  # 24 hex digits; on MongoDB also the GridFS files id its chunks carry
    owner: str  # who opened it: the API key's sha256 hex, "" when auth is off
    offset: int  # bytes stored so far: every chunk that was accepted, nothing else
    size_bytes: int | None  # the total announced when it was opened, if any
    checksum: str | None  # the sha256 hex announced when it was opened, if any
    chunk_size: int
    created_at: datetime
    updated_at: datetime  # its last change; it expires UPLOAD_SESSION_TTL after that


class SessionHashes:
    """The running sha256 of sessions this process served, by (session id, offset).

    Bytes below a session's offset never change, so a state recorded at an
    offset stays right for ever; a process that finds none (the session moved
    here from another replica, or this process restarted) re-reads the stored
    prefix instead. Bounded: the least recently used states are forgotten.
    """

    def __init__(self, limit: int = 256) -> None:
        self._limit = limit
        self._states: dict[str, tuple[int, "hashlib._Hash"]] = {}

    def get(self, session_id: str, offset: int) -> "hashlib._Hash | None":
        state = self._states.pop(session_id, None)
        if state is None or state[0] != offset:
            return None
        self._states[session_id] = state  # most recently used last
        return state[1].copy()

    def put(self, session_id: str, offset: int, running: "hashlib._Hash") -> None:
        self._states.pop(session_id, None)
        self._states[session_id] = (offset, running.copy())
        while len(self._states) > self._limit:
            del self._states[next(iter(self._states))]

    def forget(self, session_id: str) -> None:
        self._states.pop(session_id, None)


class FileWriter(abc.ABC):
    """Receives a file's bytes; nothing is visible to readers until commit().

    The loop thread only collects the pieces given to write(); threads hash and
    store them a batch at a time (see pipeline), one batch in their hands while
    the next is collected. ``size`` counts every byte written; ``sha256`` (and
    ``_hash``, the running hashlib object, which a SessionWriter resuming a
    session sets before its first write) covers them once flush() has returned.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.size = 0
        self._hash = hashlib.sha256()
        self._done = False
        self._queued: list[bytes] = []
        self._queued_size = 0
        # The batch the threads are hashing and storing; shielded from the
        # request's cancellation, so cancel() can wait for it before discarding.
        self._in_threads: asyncio.Future | None = None
        self._also: list[hashlib._Hash] = []  # see hash_also

    @property
    def sha256(self) -> str:
        if self._queued or self._in_threads is not None:
            raise RuntimeError("sha256 of bytes still being hashed: await flush() first")
        return self._hash.hexdigest()

    async def write(self, data: bytes) -> None:
        """Take a piece; it is kept, not copied, until a thread has hashed and stored it."""
        if self._done:
            raise RuntimeError("write after commit or cancel")
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # a caller's buffer may change after this returns
        self._queued.append(data)
        self._queued_size += len(data)
        self.size += len(data)
        if self._queued_size >= pipeline.BATCH:
            await self._pass_on()

    def hash_also(self, running: "hashlib._Hash") -> None:
        """Feed ``running`` too with every byte written from now on (a chunk's own digest), in a
        thread beside the content's hash; it covers them once flush() has returned."""
        if self._queued or self._in_threads is not None:
            raise RuntimeError("hash_also while bytes are still being hashed: await flush() first")
        self._also.append(running)

    async def flush(self) -> None:
        """Wait until every byte written so far is hashed and stored (not yet durable)."""
        if self._queued:
            await self._pass_on()
        await self._settle()

    async def _pass_on(self) -> None:
        await self._settle()
        batch, self._queued, self._queued_size = self._queued, [], 0
        self._in_threads = asyncio.ensure_future(self._process(batch, self.size - sum(map(len, batch))))

    async def _settle(self) -> None:
        if self._in_threads is not None:
            await asyncio.shield(self._in_threads)  # its error, if any, is this writer's from now on
            self._in_threads = None

    async def _process(self, batch: list[bytes], offset: int) -> None:
        loop = asyncio.get_running_loop()
        hashing = [loop.run_in_executor(pipeline.threads, pipeline.hash_pieces, running, batch)
                   for running in (self._hash, *self._also)]
        try:
            await self._store_batch(batch, offset)
        finally:
            await asyncio.wait(hashing)  # each hash is touched by one thread at a time
        for done in hashing:
            done.result()

    async def commit(self) -> StoredFile:
        """Make the content readable; identical content is stored only once.

        The result is claimed: call Storage.settle_file() once a model refers
        to it (or the caller gave up on it).
        """
        if self._done:
            raise RuntimeError("commit after commit or cancel")
        await self.flush()
        self._done = True
        return await self._commit()

    async def cancel(self) -> None:
        """Discard everything written so far. Safe to call more than once."""
        if self._done:
            return
        self._done = True
        self._queued = []
        await self._quiesce()
        await self._cancel()

    async def _quiesce(self) -> None:
        """Wait for the threads to be done with this writer (a batch still being stored, say)."""
        if self._in_threads is not None:
            await asyncio.wait([self._in_threads])
            if not self._in_threads.cancelled():
                self._in_threads.exception()  # retrieved: the upload already failed for its own reason

    async def __aenter__(self) -> "FileWriter":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        # Any way out other than a commit (an error, a cancelled task) discards.
        await self.cancel()

    @abc.abstractmethod
    async def _store_batch(self, batch: list[bytes], offset: int) -> None:
        """Store a batch of pieces, the content's bytes from ``offset`` on, after those
        stored before; runs while a thread hashes the same batch. The pieces are the
        caller's: keep them (or views of them), never change them."""

    @abc.abstractmethod
    async def _commit(self) -> StoredFile: ...

    @abc.abstractmethod
    async def _cancel(self) -> None: ...


class SessionWriter(FileWriter):
    """Appends one request's bytes to an upload session; made by Storage.session_writer().

    Use it as ``async with``. On entry it takes the session's write lock
    (SessionBusy while another request holds a live one), reads the session
    again under the lock (SessionMissing if it is gone) into ``session``,
    discards any bytes a writer that died left beyond the stored offset, and
    restores the running sha256 of the stored prefix (from the store's
    SessionHashes, else by re-reading the prefix). ``size`` and ``sha256`` then
    cover the whole content so far, as a FileWriter's do.

    It ends with exactly one of: ``checkpoint()`` (this request's bytes are
    durable and counted; the session stays), ``commit()`` (the whole content
    becomes stored content, deduplicated and claimed as any commit's; the
    session is gone), ``cancel()`` (this request's bytes are dropped; the
    offset is what it was). Leaving the block any other way cancels. The lock
    is released on the way out in every case.
    """

    def __init__(self, store: "Storage", session_id: str) -> None:
        super().__init__(DEFAULT_CHUNK_SIZE)
        self.store = store
        self.session_id = session_id
        self.session: UploadSession | None = None

    async def __aenter__(self) -> "SessionWriter":
        self.session = await self._acquire()
        try:
            self.chunk_size = self.session.chunk_size
            await self._discard_beyond(self.session.offset)
            running = self.store.session_hashes.get(self.session_id, self.session.offset)
            if running is None:
                running = hashlib.sha256()
                loop = asyncio.get_running_loop()
                async for piece in self._read_prefix():
                    # In a thread, as for new bytes: a prefix of GBs would hold the loop for seconds.
                    await loop.run_in_executor(pipeline.threads, running.update, piece)
            self._hash = running
            self.size = self.session.offset
        except BaseException:
            await self._release()
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await self.cancel()
        finally:
            await self._release()

    async def checkpoint(self) -> UploadSession:
        """Make this request's bytes durable and advance the offset over them; the session as it is now."""
        if self._done:
            raise RuntimeError("checkpoint after commit or cancel")
        await self.flush()
        self._done = True
        session = await self._checkpoint()
        self.store.session_hashes.put(self.session_id, session.offset, self._hash)
        return session

    async def commit(self) -> StoredFile:
        stored = await super().commit()
        self.store.session_hashes.forget(self.session_id)
        return stored

    # -- what each backend implements ------------------------------------------
    @abc.abstractmethod
    async def _acquire(self) -> UploadSession:
        """Take the write lock (SessionBusy) and return the session read under it (SessionMissing)."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Give the lock up if this writer still holds it; never raises."""

    @abc.abstractmethod
    async def _discard_beyond(self, offset: int) -> None:
        """Remove stored bytes past ``offset`` (a writer that died mid-request left them)."""

    @abc.abstractmethod
    def _read_prefix(self) -> AsyncIterator[bytes]:
        """The stored bytes [0, session.offset), in order."""

    @abc.abstractmethod
    async def _checkpoint(self) -> UploadSession:
        """Bytes written so far become durable, then the stored offset (and updated_at) moves to ``size``."""


class Storage(abc.ABC):
    kind: str
    # Pieces a download should read ahead while the previous one is sent:
    # worth it where a read waits on a database round trip.
    read_ahead: int = 2

    # The running sha256 of upload sessions this process served (SessionWriter).
    session_hashes: SessionHashes

    # -- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare (indexes, tables); raise StorageUnavailable fast."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the store answers, else raise StorageUnavailable."""

    @abc.abstractmethod
    async def probe_files(self) -> None:
        """Write, read back and remove a tiny probe where files live; raise StorageError if that fails."""

    @abc.abstractmethod
    async def disk_free(self) -> int | None:
        """Free bytes where files are stored, or None where that cannot be known."""

    # -- metadata --------------------------------------------------------
    @abc.abstractmethod
    async def insert_model(self, doc: ModelDocument) -> None:
        """Store a new model document; DuplicateModel if (name, version) exists."""

    @abc.abstractmethod
    async def get_model(self, model_id: str) -> ModelDocument | None: ...

    def read_stamp(self, counts: bool = True) -> Hashable | None:
        """A value that changes whenever a model read (get_model, models_named, find_models) could answer
        otherwise than before: after any change to any model, by this process, another one sharing the
        store, or anything else writing to it. Read it BEFORE the read it validates (app/read_cache.py).
        With ``counts=False`` it may stay put when only download counts changed, for reads that never
        show them. None where no cheap stamp exists: nothing read is then kept.
        """
        return None

    @abc.abstractmethod
    async def update_model(
        self, model_id: str, fields: ModelDocument, *, return_previous: bool = False,
        amend: Amend | None = None,
    ) -> ModelDocument | None:
        """Set top-level fields (None removes one) in one atomic step.

        ``amend``, if given, is called with the document as it is just before
        the update, within the same atomic step; the fields it returns are set
        too (a field whose value depends on what is being replaced).

        Returns the updated document, or with ``return_previous`` the document
        as it was just before (so a caller swapping a file learns which file it
        replaced, even when uploads race); None if there is no such model.
        """

    @abc.abstractmethod
    async def record_downloads(self, tallies: Mapping[tuple[str, datetime], int]) -> None:
        """Count downloads: ``tallies`` maps (model id, start of the hour, UTC) to how many
        downloads of that model that hour saw; each adds to the model's download_count and to
        the hour's tally. All or nothing, and exact across processes: a StorageError means
        none of it was counted (on MongoDB, see mongo.py, unless the answer alone was lost).
        A model that is gone still counts in the hourly tallies."""

    async def record_download(self, model_id: str, at: datetime) -> None:
        """Count one download at ``at`` (``record_downloads`` of one)."""
        await self.record_downloads({(model_id, download_hour(at)): 1})

    @abc.abstractmethod
    async def delete_model(self, model_id: str) -> ModelDocument | None:
        """Remove a model document; return what was removed, None if absent."""

    @abc.abstractmethod
    async def find_models(self, query: ModelQuery) -> tuple[list[ModelDocument], int]:
        """One page of models matching the query, and the total that match."""

    @abc.abstractmethod
    async def models_named(self, name: str) -> list[ModelDocument]:
        """Every version of a name, in no particular order."""

    @abc.abstractmethod
    async def count_models(self) -> int: ...

    @abc.abstractmethod
    async def statistics(self, since_added: datetime, since_downloads: datetime) -> RegistryStats:
        """Registry-wide aggregates, computed by the database, not by loading models."""

    # -- files -----------------------------------------------------------
    @abc.abstractmethod
    def file_writer(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileWriter:
        """A writer for new content; use it as ``async with`` so errors cancel."""

    @abc.abstractmethod
    def read_file(self, file: StoredFile, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Yield the bytes of [offset, offset+length) in order.

        Takes the StoredFile the caller already holds (from the model's
        file_metadata or file_info) so a read costs no extra lookup. Raises
        FileMissing when the content is gone or shorter than recorded.
        """

    @abc.abstractmethod
    async def file_info(self, file_id: str) -> StoredFile | None: ...

    def local_path(self, file: StoredFile) -> str | None:
        """A path on this machine holding exactly the file's bytes, when there is one
        (downloads then use sendfile); None for content that lives in a database."""
        return None

    @abc.abstractmethod
    async def settle_file(self, file_id: str) -> None:
        """Drop one claim a commit took on this content (completing a release it held back, see release_file)."""

    async def settle_files(self, file_ids: list[str]) -> None:
        """settle_file for each (a backend may do it in fewer round trips)."""
        for file_id in file_ids:
            await self.settle_file(file_id)

    # -- leases: content a reader holds, across processes ----------------------
    async def lease_files(self, file_ids: list[str], owner: str, until: datetime) -> dict[str, str]:
        """Lease stored content for a reader: {file_id: lease_id} for each file leased.

        Until the lease is dropped or ``until`` passes, no release (by any
        process) deletes that content. A file that is gone, or whose deletion
        has begun, gets no lease: it is absent from the result and nothing is
        left behind for it. ``owner`` names the process (app.leases.REPLICA_ID).
        """
        raise NotImplementedError

    async def renew_leases(self, lease_ids: list[str], until: datetime) -> None:
        """Extend these leases (the owner's heartbeat); missing ones are ignored."""
        raise NotImplementedError

    async def drop_leases(self, lease_ids: list[str]) -> list[str]:
        """End these leases, then release each content whose release waited for a lease
        (see release_file) and that nothing holds any more; the file ids deleted."""
        raise NotImplementedError

    async def release_pending(self) -> list[str]:
        """Try again every release that waited for leases (their holders may have died and
        their leases expired); the file ids deleted. Replicas call it every LEASE_TTL; gc too."""
        raise NotImplementedError

    # -- blobs (content by sha256, for snapshots) ---------------------------
    @abc.abstractmethod
    async def find_blob(self, sha256: str) -> StoredFile | None:
        """The stored content with this sha256 (hex), if any."""

    @abc.abstractmethod
    async def keep_blobs(self, sha256s: list[str], until: datetime) -> dict[str, StoredFile]:
        """Of these sha256s, the stored ones (by sha256); each is kept, referenced or not, until ``until``
        at least (neither a release nor gc removes it before): BLOB_GRACE for a blob a client is about to commit."""

    @abc.abstractmethod
    async def claim_blobs(self, sha256s: list[str]) -> dict[str, StoredFile]:
        """Of these sha256s, the stored ones (by sha256), each claimed once as a commit claims
        its content: call settle_file() for each once a model refers to it (or the commit failed)."""

    # -- upload sessions (resumable uploads) -----------------------------------
    @abc.abstractmethod
    async def open_session(self, session: UploadSession) -> None:
        """Record a new session (offset 0, no bytes yet)."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> UploadSession | None:
        """The session as stored, expired or not; None if there is none (or the id is malformed)."""

    @abc.abstractmethod
    async def count_sessions(self, owner: str, updated_after: datetime) -> tuple[int, int]:
        """(sessions of ``owner``, sessions of anyone) changed after ``updated_after``: those not expired."""

    @abc.abstractmethod
    def session_writer(self, session_id: str) -> SessionWriter:
        """A writer appending to this session (see SessionWriter); use as ``async with``."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Remove a session and its bytes, taking its write lock first (SessionBusy while a
        request holds it); False if there was none."""

    @abc.abstractmethod
    async def sessions_updated_before(self, before: datetime) -> list[UploadSession]:
        """Sessions last changed before ``before`` (gc removes the expired ones with delete_session)."""

    @abc.abstractmethod
    async def collect_garbage(self, min_age: timedelta, dry_run: bool) -> list[str]:
        """Remove stored content no model refers to, left by crashes; one line per item.

        Leaves alone anything younger than ``min_age`` (an upload in progress
        writes continuously, so its pieces are always young) and content a
        commit has claimed. With ``dry_run`` only lists what it would remove.
        """

    @abc.abstractmethod
    async def release_file(self, file_id: str) -> bool:
        """Delete stored content unless a model refers to it (by file_metadata or
        one of its files), a reader's lease on it is live (lease_files), a
        commit's claim on it is unsettled (and younger than CLAIM_GRACE) or it
        is kept (keep_blobs); True if deleted.

        Held back by a lease, claim or keep (not by a model), the release is
        remembered: the last drop_leases or settle_file on the content, or
        release_pending once what held it expired, completes it (re-checking
        everything, a model referring to it again included)."""
