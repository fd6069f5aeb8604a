"""MongoDB backend: model documents in ``models``, files in GridFS.

Uses PyMongo's native async API. Files are written as standard GridFS
(``<bucket>.files`` / ``<bucket>.chunks``, ``length``, ``chunkSize``,
``uploadDate``) so any driver's GridFSBucket can read them, but through our own
writer and reader: the writer inserts chunks in bounded batches (PyMongo's
upload stream costs one round trip per chunk) and publishes the files document
last, which is what makes the file visible; the reader starts its cursor at the
first chunk a byte range needs instead of reading from the start to seek.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Iterator

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReadPreference, ReturnDocument, WriteConcern
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from ..clock import now
from .base import (
    CLAIM_GRACE,
    DEFAULT_CHUNK_SIZE,
    DOWNLOAD_HISTORY,
    SESSION_LOCK_TTL,
    Amend,
    DuplicateModel,
    FileMissing,
    FileWriter,
    ModelDocument,
    ModelQuery,
    RegistryStats,
    SessionBusy,
    SessionHashes,
    SessionMissing,
    SessionWriter,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredFile,
    UploadSession,
    ValueRefused,
)
from .live_uploads import LiveUploads
from .mongo_leases import KEEP_OWNER, ContentLeases, claim_owner
from .mongo_locks import LockBusy, Locks

# Chunk documents per cursor batch when reading: bounds memory per download.
_READ_BATCH_BYTES = 1024 * 1024

# Retries (about 15 minutes with backoff) to remove a cancelled upload's chunks.
_CLEANUP_ATTEMPTS = 40

# A model's lock (model documents and download tallies are written under it):
# held for a write or two, so a lock this old belongs to a holder that died.
_MODEL_LOCK_TTL = timedelta(seconds=30)
# How long a model update waits for the lock before answering 503.
_MODEL_LOCK_WAIT = 10.0

# Folds one download's fold runs before it leaves the rest to a background task
# (while downloads of the model keep coming, there is always more to fold).
_FOLD_ROUNDS = 3

# Download events older than this are folded by gc: their own fold failed and
# no later download of that model came to fold them.
_LEFTOVER_EVENTS = timedelta(minutes=1)

# Leasing content by sha256 again after its copy was deleted under us: each
# failure means a deletion finished in between, so a few attempts suffice.
_LEASE_ATTEMPTS = 3
_Leased = tuple[StoredFile, ObjectId]  # content, and the id of the lease on it

log = logging.getLogger("app.storage.mongo")

_UNAVAILABLE = (ServerSelectionTimeoutError, ConnectionFailure, AutoReconnect, NetworkTimeout)


def _oid(value: str) -> ObjectId | None:
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        return None


_SESSION_ID = re.compile(r"[0-9a-f]{24}")


def _session_oid(session_id: str) -> ObjectId | None:
    """Session ids are spelt one way only (ObjectId would also take upper case), as on the embedded backend."""
    return ObjectId(session_id) if isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id) else None


def _to_mongo(doc: ModelDocument) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k != "id"}
    out["_id"] = ObjectId(doc["id"])
    if doc.get("parent_model_id"):
        out["parent_model_id"] = ObjectId(doc["parent_model_id"])
    if "file_metadata" in doc:
        out["file_metadata"] = {**doc["file_metadata"], "file_id": ObjectId(doc["file_metadata"]["file_id"])}
    if doc.get("files"):
        out["files"] = [{**e, "file_id": ObjectId(e["file_id"])} for e in doc["files"]]
    return out


def _from_mongo(raw: dict[str, Any]) -> ModelDocument:
    doc = dict(raw)
    doc["id"] = str(doc.pop("_id"))
    doc.pop("last_fold", None)  # record_downloads' bookkeeping, not the model's
    if isinstance(doc.get("parent_model_id"), ObjectId):
        doc["parent_model_id"] = str(doc["parent_model_id"])
    fm = doc.get("file_metadata")
    if fm and isinstance(fm.get("file_id"), ObjectId):
        doc["file_metadata"] = {**fm, "file_id": str(fm["file_id"])}
    if doc.get("files"):
        doc["files"] = [{**e, "file_id": str(e["file_id"])} for e in doc["files"]]
    return doc


def _busy(e: OperationFailure) -> bool:
    return _busy_text(str(e))


def _busy_text(message: str) -> bool:
    # FerretDB on SQLite answers a write that meets another with SQLITE_BUSY:
    # a momentary condition, to be retried, not a server error.
    return "database is locked" in message or "SQLITE_BUSY" in message


_BUSY_RETRIES = 6
_DUPLICATE_KEY = 11000  # the server's error code for a unique key taken


async def _retry_busy(call):
    """Run ``call()``, again after a short pause while the database says it is busy.

    A busy answer means the write did not happen, so trying again is safe.
    """
    for attempt in range(_BUSY_RETRIES):
        try:
            return await call()
        except OperationFailure as e:
            if not _busy(e) or attempt == _BUSY_RETRIES - 1:
                raise
            await asyncio.sleep(0.01 * 2**attempt)


async def _all(*aws) -> None:
    """Await them together; then raise the first error, once none is still running (a write
    still in flight after its caller gave the model's lock up would race the next holder)."""
    for result in await asyncio.gather(*aws, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


def _unavailable(e: BaseException) -> StorageUnavailable | None:
    """What a driver error means when the database is out of reach or (still) busy; None otherwise."""
    if isinstance(e, _UNAVAILABLE):
        return StorageUnavailable(f"MongoDB unreachable: {e}")
    if isinstance(e, OperationFailure) and _busy(e):
        return StorageUnavailable(f"MongoDB busy: {e}")
    return None


_BAD_VALUE = 2  # the server's error code for a value it will not take


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """Driver errors as the StorageError the HTTP layer maps (for code _guard cannot wrap)."""
    try:
        yield
    except BulkWriteError as e:
        # Its text would carry every document of the batch, chunk data and all.
        first = (e.details.get("writeErrors") or [{}])[0]
        raise StorageError(f"MongoDB: insert failed: {first.get('errmsg', 'write error')}") from e
    except PyMongoError as e:
        raise (_unavailable(e) or StorageError(f"MongoDB: {e}")) from e


def _guard(fn, retry: bool = True):
    """Translate driver errors that mean 'database unreachable' (or busy) into StorageUnavailable.

    ``retry``: run the call again while the server is busy; False for a protocol of
    several writes, whose steps each retry on their own (a repeat of the whole would
    repeat the steps that went through).
    """

    async def wrapper(*args, **kwargs):
        try:
            if not retry:
                return await fn(*args, **kwargs)
            return await _retry_busy(lambda: fn(*args, **kwargs))
        except PyMongoError as e:
            if isinstance(e, OperationFailure) and e.code == _BAD_VALUE:
                raise ValueRefused((e.details or {}).get("errmsg") or str(e)) from e
            raise (_unavailable(e) or StorageError(f"MongoDB: {e}")) from e

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _guard_steps(fn):
    return _guard(fn, retry=False)


class MongoStorage(Storage):
    kind = "mongodb"

    def __init__(self, url: str, db_name: str, bucket: str, timeout_ms: int = 5000, **client_options) -> None:
        """``client_options`` go to AsyncMongoClient (tests pass event_listeners)."""
        self._url = url
        self._timeout_ms = timeout_ms
        self.client: AsyncMongoClient = AsyncMongoClient(
            url,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            tz_aware=True,
            tzinfo=timezone.utc,
            appname="tensorfleet-model-service",
            **client_options,
        )
        # Whatever the URL says: reads from the primary (a client reads its model right after
        # writing it; leases, locks and tombstones must see the latest writes) and writes
        # acknowledged by a majority (they survive a fail-over). Chunks alone keep the URL's
        # write concern: their files document, written after them with w: majority, is
        # acknowledged only once the oplog up to it, chunks included, is on that majority.
        self.db = self.client.get_database(db_name, read_preference=ReadPreference.PRIMARY,
                                           write_concern=WriteConcern("majority"))
        self.models = self.db["models"]
        self.files = self.db[f"{bucket}.files"]
        self.chunks = self.client.get_database(db_name, read_preference=ReadPreference.PRIMARY)[f"{bucket}.chunks"]
        # Download counting (record_downloads): events, folded under the model's lock into the
        # model's download_count and per (model, hour) tallies. download_hours holds the global
        # hourly tallies of earlier versions: read until they age out.
        self.download_events = self.db["download_events"]
        self.download_tallies = self.db["download_tallies"]
        self.downloads = self.db["download_hours"]
        self.model_locks = Locks(self.db["model_locks"], _MODEL_LOCK_TTL, "model")
        self.content = ContentLeases(self.db, self.files, self.chunks, self.models, _retry_busy)
        # The claims this process took and has not settled, by file id: lease ids.
        # A claim is always settled by the process that took it.
        self._claims: dict[str, list[ObjectId]] = {}
        self._cleanups: set[asyncio.Task] = set()
        self._folding: dict[ObjectId, asyncio.Task] = {}  # background folds (_fold_later)
        self.live_uploads = LiveUploads(self.db[f"{bucket}.uploads_in_progress"])
        # An upload session's full chunks are GridFS chunks whose files_id is the
        # session's _id (no files document until it completes); see _GridFSSessionWriter.
        self.sessions = self.db["upload_sessions"]
        self.session_locks = Locks(self.db["upload_session_locks"], SESSION_LOCK_TTL, "upload session")
        self.session_hashes = SessionHashes()

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        try:
            await self.client.admin.command("ping")
            await self._create_indexes()
        except _UNAVAILABLE as e:
            # The driver's message ends in a long topology dump; the first part
            # names the host and the reason, which is what an operator needs.
            reason = str(e).split(" (configured timeouts")[0].split(", Timeout:")[0]
            raise StorageUnavailable(f"cannot reach MongoDB within {self._timeout_ms} ms: {reason}") from e

    async def _create_indexes(self) -> None:
        await self.models.create_index([("name", ASCENDING), ("version", ASCENDING)], unique=True)
        await self.models.create_index([("algorithm", ASCENDING), ("status", ASCENDING), ("created_at", DESCENDING)])
        await self.models.create_index("tags")
        await self.models.create_index([("created_at", DESCENDING)])
        await self.models.create_index([("download_count", DESCENDING)])
        await self.models.create_index("file_metadata.file_id")
        await self.models.create_index("files.file_id")
        # The indexes the GridFS specification asks for, plus content lookup.
        await self.chunks.create_index([("files_id", ASCENDING), ("n", ASCENDING)], unique=True)
        await self.files.create_index([("filename", ASCENDING), ("uploadDate", ASCENDING)])
        # Unique, so two concurrent commits of the same content keep one copy;
        # sparse, so files other tools wrote without our metadata do not collide.
        await self.files.create_index("metadata.sha256", unique=True, sparse=True)
        await self.live_uploads.create_index()
        await self.content.create_indexes()
        # count_sessions (per owner and in all) and sessions_updated_before.
        await self.sessions.create_index([("owner", ASCENDING), ("updated_at", ASCENDING)])
        await self.sessions.create_index("updated_at")
        await self.session_locks.create_index()
        await self.session_locks.adopt_earlier_shape()
        await self.model_locks.create_index()
        await self.download_events.create_index("model")
        # Statistics and pruning read tallies by hour.
        await self.download_tallies.create_index("_id.h")

    async def close(self) -> None:
        # A last chance for pending cleanups whose database is already back.
        for task in [*self._cleanups, *self._folding.values()]:
            task.cancel()
        self.live_uploads.close()
        self.session_locks.close()
        self.model_locks.close()
        await self.client.close()

    async def ping(self) -> None:
        try:
            await self.client.admin.command("ping")
        except _UNAVAILABLE as e:
            raise StorageUnavailable(f"MongoDB unreachable: {e}") from e

    @_guard
    async def probe_files(self) -> None:
        # A chunk document with a files_id of its own: no files document ever
        # points at it, so no reader can see it, and it is removed at once.
        probe = {"files_id": ObjectId(), "n": 0, "data": b"probe"}
        try:
            await self.chunks.insert_one(probe)
            got = await self.chunks.find_one({"_id": probe["_id"]})
            if got is None or got["data"] != b"probe":
                raise StorageError("GridFS chunks: probe read back wrong")
        except PyMongoError as e:
            if isinstance(e, _UNAVAILABLE):
                raise
            raise StorageError(f"GridFS is not writable: {e}") from e
        finally:
            await self.chunks.delete_one({"_id": probe["_id"]})

    @_guard
    async def disk_free(self) -> int | None:
        # MongoDB 4.4+ reports the database host's file system in dbStats; other
        # servers (FerretDB) do not, and then it is unknown.
        stats = await self.db.command("dbStats")
        total, used = stats.get("fsTotalSize"), stats.get("fsUsedSize")
        return int(total - used) if total is not None and used is not None else None

    # -- metadata --------------------------------------------------------
    @_guard
    async def insert_model(self, doc: ModelDocument) -> None:
        try:
            await self.models.insert_one(_to_mongo(doc))
        except DuplicateKeyError as e:
            raise DuplicateModel(f"{doc['name']} {doc['version']} already exists") from e

    @_guard
    async def get_model(self, model_id: str) -> ModelDocument | None:
        oid = _oid(model_id)
        raw = await self.models.find_one({"_id": oid}) if oid else None
        return _from_mongo(raw) if raw else None

    @_guard
    async def update_model(
        self, model_id: str, fields: ModelDocument, *, return_previous: bool = False, amend: Amend | None = None
    ) -> ModelDocument | None:
        oid = _oid(model_id)
        if oid is None:
            return None
        # Under the model's lock: FerretDB runs find-and-modify as "find, then write",
        # so without it two replicas' updates could both return the same previous document.
        async with self._model_lock(oid):
            if amend is not None:
                # Under the lock, the document read here is the one the update replaces.
                raw = await self.models.find_one({"_id": oid})
                if raw is None:
                    return None
                fields = {**fields, **amend(_from_mongo(raw))}
            to_set = _to_mongo({"id": model_id, **{k: v for k, v in fields.items() if v is not None}})
            to_set.pop("_id")
            to_unset = {k: "" for k, v in fields.items() if v is None}
            update: dict[str, Any] = {"$set": to_set}  # never empty: it sets "id" at least
            if to_unset:
                update["$unset"] = to_unset
            raw = await self.models.find_one_and_update(
                {"_id": oid}, update,
                return_document=ReturnDocument.BEFORE if return_previous else ReturnDocument.AFTER)
        return _from_mongo(raw) if raw else None

    @contextlib.asynccontextmanager
    async def _model_lock(self, oid: ObjectId) -> AsyncIterator[None]:
        """Hold the model's lock (waiting for it up to _MODEL_LOCK_WAIT, then StorageUnavailable)."""
        token = self.model_locks.new_token()
        try:
            await self.model_locks.wait(oid, token, timeout=_MODEL_LOCK_WAIT)
        except BaseException:
            await self.model_locks.release(oid, token)  # an insert whose answer was lost may have landed
            raise
        try:
            yield
        finally:
            await self.model_locks.release(oid, token)
            # Downloads that found the lock busy left their events to its holder (record_downloads),
            # whether the update went through or not.
            await self._fold(oid)

    async def record_downloads(self, tallies: Mapping[tuple[str, datetime], int]) -> None:
        """Exact across processes, and durable once this returns: each (model, hour) is an event
        document carrying its count ``n`` (inserts, atomic on every server, where FerretDB loses
        concurrent $inc), which the holder of the model's lock folds into the model's
        download_count and its (model, hour) tally; see _fold.

        The events of a batch are one insert, not one transaction: should it fail after some
        landed (or its answer be lost), the caller's retry counts those again. A busy server
        is retried here with the same event ids, which never double."""
        events = [{"_id": ObjectId(), "model": ObjectId(model_id), "hour": hour, "n": n}
                  for (model_id, hour), n in tallies.items() if n]
        if not events:
            return
        with _storage_errors():
            await self._insert_events(events)
        await asyncio.gather(*(self._fold(oid) for oid in {e["model"] for e in events}))

    async def _insert_events(self, events: list[dict[str, Any]]) -> None:
        for attempt in range(_BUSY_RETRIES):
            try:
                await self.download_events.insert_many(events, ordered=False)
                return
            except BulkWriteError as e:
                failed = e.details.get("writeErrors") or []
                # A duplicate _id is an event an earlier attempt inserted.
                left = [f for f in failed if f.get("code") != _DUPLICATE_KEY]
                if not left:
                    return
                if attempt == _BUSY_RETRIES - 1 or not all(_busy_text(f.get("errmsg", "")) for f in left):
                    raise
                events = [events[f["index"]] for f in left]
            except OperationFailure as e:
                if not _busy(e) or attempt == _BUSY_RETRIES - 1:
                    raise
            await asyncio.sleep(0.01 * 2**attempt)

    async def _fold(self, oid: ObjectId) -> None:
        """Fold the model's download events now; never raises (an event left is folded by the
        model's next fold, or gc's)."""
        try:
            if await self._fold_rounds(oid, _FOLD_ROUNDS):
                self._fold_later(oid)
        except (PyMongoError, StorageError) as e:
            log.info("download events of model %s not folded yet: %s", oid, e.__class__.__name__)

    async def _fold_rounds(self, oid: ObjectId, rounds: int) -> bool:
        """Up to ``rounds`` folds of the model's events while its lock is free; True if events are
        still there after the last.

        Insert, then look: a download inserts its event before it tries the lock, and a
        holder looks for events after releasing it, so an event whose download found the
        lock busy is there when that holder looks, and that holder folds it.
        """
        for _ in range(rounds):
            token = self.model_locks.new_token()
            try:
                await _retry_busy(lambda: self.model_locks.acquire(oid, token))
            except LockBusy:
                return False  # its holder looks after releasing
            except BaseException:
                await self.model_locks.release(oid, token)  # an insert whose answer was lost may have landed
                raise
            try:
                folded = await self._fold_held(oid)
            except BaseException:
                await self.model_locks.release(oid, token)
                raise
            # Its events go while the lock is given up: a holder that reads them before they
            # are gone finds their fold applied everywhere, and only deletes them.
            await _all(self._delete_events(folded), self.model_locks.release(oid, token))
            if await _retry_busy(lambda: self.download_events.find_one({"model": oid}, {"_id": 1})) is None:
                return False
        return True

    def _fold_later(self, oid: ObjectId) -> None:
        """Fold on in the background, one task per model, so that no download waits for others'."""
        if oid in self._folding:
            return
        self._folding[oid] = task = asyncio.create_task(self._fold_in_background(oid))
        task.add_done_callback(lambda _: self._folding.pop(oid, None))

    async def _fold_in_background(self, oid: ObjectId) -> None:
        try:
            while await self._fold_rounds(oid, _FOLD_ROUNDS):
                await asyncio.sleep(0)
        except (PyMongoError, StorageError) as e:
            log.info("download events of model %s not folded yet: %s", oid, e.__class__.__name__)

    async def _fold_held(self, oid: ObjectId) -> list[ObjectId]:
        """Fold the model's events; the caller holds the model's lock, and deletes the events
        whose ids this returns.

        A fold that dies midway neither loses nor doubles a count: it marks its events
        with a fold id first, sets ``last_fold`` to that id beside each $inc, and deletes
        the events last. A later fold finishes a fold whose marked events it finds, on
        the targets whose ``last_fold`` is not that fold's (one fold is applied at a
        time, so a target's ``last_fold`` is that fold's if it has it).
        """
        events = await _retry_busy(lambda: self.download_events.find({"model": oid}).to_list(None))
        fresh, unfinished = [], {}
        for e in events:
            if "fold" in e:
                unfinished.setdefault(e["fold"], []).append(e)
            else:
                fresh.append(e)
        for fold_id, marked in unfinished.items():
            await self._apply_fold(oid, fold_id, marked)
            await self._delete_events([e["_id"] for e in marked])
        ids = [e["_id"] for e in fresh]
        if ids:
            fold_id = ObjectId()
            await _retry_busy(lambda: self.download_events.update_many({"_id": {"$in": ids}},
                                                                       {"$set": {"fold": fold_id}}))
            await self._apply_fold(oid, fold_id, fresh)
        return ids

    async def _delete_events(self, ids: list[ObjectId]) -> None:
        if ids:
            await _retry_busy(lambda: self.download_events.delete_many({"_id": {"$in": ids}}))

    async def _apply_fold(self, oid: ObjectId, fold_id: ObjectId, events: list[dict[str, Any]]) -> None:
        """Each target's $inc where this fold is not applied yet, all at once (each target has
        one writer: this holder)."""
        not_yet = {"last_fold": {"$ne": fold_id}}

        async def tally(hour: datetime, n: int) -> None:
            try:
                result = await _retry_busy(lambda: self.download_tallies.update_one(
                    {"_id": {"m": oid, "h": hour}, **not_yet},
                    {"$inc": {"count": n}, "$set": {"last_fold": fold_id}}, upsert=True))
            except DuplicateKeyError:
                return  # the tally has this fold already (so the upsert's filter missed it)
            if result.upserted_id is not None:
                # A new hour: old ones go (not with a TTL index: FerretDB lacks them).
                # Other models' tallies too: one this old is written by no fold.
                cutoff = hour - DOWNLOAD_HISTORY
                await _retry_busy(lambda: self.download_tallies.delete_many({"_id.h": {"$lt": cutoff}}))
                await _retry_busy(lambda: self.downloads.delete_many({"_id": {"$lt": cutoff}}))

        # An event is n downloads; events from before batching carry no n: one each.
        per_hour: Counter[datetime] = Counter()
        for e in events:
            per_hour[e["hour"]] += e.get("n", 1)
        # The model may be gone: its events still count in the hourly tallies.
        await _all(_retry_busy(lambda: self.models.update_one(
            {"_id": oid, **not_yet}, {"$inc": {"download_count": sum(per_hour.values())},
                                      "$set": {"last_fold": fold_id}})),
            *(tally(hour, n) for hour, n in per_hour.items()))

    async def fold_leftover_downloads(self) -> int:
        """Fold the download events of models whose fold failed and that no download
        has come to fold since (gc). The number of models."""
        old = ObjectId.from_datetime(now() - _LEFTOVER_EVENTS)
        models = await self.download_events.distinct("model", {"_id": {"$lt": old}})
        for oid in models:
            await self._fold(oid)
        return len(models)

    @_guard
    async def delete_model(self, model_id: str) -> ModelDocument | None:
        oid = _oid(model_id)
        raw = await self.models.find_one_and_delete({"_id": oid}) if oid else None
        return _from_mongo(raw) if raw else None

    @staticmethod
    def _filter(q: ModelQuery) -> dict[str, Any]:
        f: dict[str, Any] = {}
        if q.algorithm is not None:
            f["algorithm"] = q.algorithm
        if q.status is not None:
            f["status"] = q.status
        if q.created_by is not None:
            f["created_by"] = q.created_by
        if q.created_before is not None:
            f["created_at"] = {"$lt": q.created_before}
        if q.tags:
            f["tags"] = {"$in": list(q.tags)}
        if q.latest_only:
            f["superseded"] = {"$ne": True}
        and_: list[dict[str, Any]] = []
        if q.text is not None:
            rx = {"$regex": re.escape(q.text), "$options": "i"}
            and_.append({"$or": [{"name": rx}, {"description": rx}, {"algorithm": rx}, {"tags": rx}]})
        if q.min_accuracy is not None:
            and_.append({"$or": [
                {"metrics.test_accuracy": {"$gte": q.min_accuracy}},
                {"metrics.test_accuracy": {"$exists": False}, "metrics.accuracy": {"$gte": q.min_accuracy}},
            ]})
        if and_:
            f["$and"] = and_
        return f

    @_guard
    async def find_models(self, query: ModelQuery) -> tuple[list[ModelDocument], int]:
        f = self._filter(query)
        direction = DESCENDING if query.sort_desc else ASCENDING
        cursor = self.models.find(f, sort=[(query.sort_field, direction), ("_id", direction)],
                                  skip=query.skip, limit=query.limit)
        docs = [_from_mongo(d) async for d in cursor]
        total = await self.models.count_documents(f)
        return docs, total

    @_guard
    async def models_named(self, name: str) -> list[ModelDocument]:
        return [_from_mongo(d) async for d in self.models.find({"name": name})]

    @_guard
    async def count_models(self) -> int:
        # From collection metadata, not a scan: /health must stay cheap.
        return await self.models.estimated_document_count()

    async def _aggregate_one(self, collection, pipeline: list[dict[str, Any]], field: str) -> int:
        docs = [d async for d in await collection.aggregate(pipeline)]
        return docs[0][field] if docs else 0

    @_guard
    async def statistics(self, since_added: datetime, since_downloads: datetime) -> RegistryStats:
        # One accumulator per $group: FerretDB (the test server) miscounts
        # when a $group has several, and real MongoDB runs these from indexes
        # or small scans either way.
        has_file = {"$match": {"file_metadata.file_id": {"$exists": True}}}
        has_files = {"$match": {"snapshot_digest": {"$exists": True}}}
        (groups, downloads, single, shards, file_bytes, snapshot_bytes, with_file, with_files, added,
         earlier, tallies) = await asyncio.gather(
            self.models.aggregate([{"$group": {"_id": {"a": "$algorithm", "s": "$status"}, "n": {"$sum": 1}}}]),
            self._aggregate_one(self.models, [{"$group": {"_id": None, "n": {"$sum": "$download_count"}}}], "n"),
            # Distinct content per kind of version, merged below: content shared by
            # an /upload and a snapshot's file counts once.
            self.models.aggregate([
                has_file, {"$group": {"_id": {"f": "$file_metadata.file_id", "s": "$file_metadata.size_bytes"}}},
            ]),
            self.models.aggregate([
                has_files, {"$unwind": "$files"},
                {"$group": {"_id": {"f": "$files.file_id", "s": "$files.size_bytes"}}},
            ]),
            self._aggregate_one(self.models, [
                has_file, {"$group": {"_id": None, "n": {"$sum": "$file_metadata.size_bytes"}}},
            ], "n"),
            self._aggregate_one(self.models, [
                has_files, {"$group": {"_id": None, "n": {"$sum": "$total_size_bytes"}}},
            ], "n"),
            self.models.count_documents({"file_metadata.file_id": {"$exists": True}}),
            self.models.count_documents({"snapshot_digest": {"$exists": True}}),
            self.models.count_documents({"created_at": {"$gte": since_added}}),
            self.downloads.find({"_id": {"$gte": since_downloads}}).to_list(None),
            self.download_tallies.aggregate([
                {"$match": {"_id.h": {"$gte": since_downloads}}},
                {"$group": {"_id": "$_id.h", "n": {"$sum": "$count"}}},
            ]),
        )
        sizes: dict[ObjectId, int] = {}
        for cursor in (single, shards):
            async for g in cursor:
                sizes[g["_id"]["f"]] = g["_id"]["s"]
        stored, model_bytes, with_files = sum(sizes.values()), file_bytes + snapshot_bytes, with_file + with_files
        by_algorithm: dict[str, int] = {}
        by_status: dict[str, int] = {}
        async for g in groups:
            a, st = g["_id"]["a"], g["_id"]["s"]
            by_algorithm[a] = by_algorithm.get(a, 0) + g["n"]
            by_status[st] = by_status.get(st, 0) + g["n"]
        by_hour = Counter({h["_id"]: h["count"] for h in earlier})  # download_hours of earlier versions
        async for t in tallies:
            by_hour[t["_id"]] += t["n"]
        return RegistryStats(by_algorithm, by_status, downloads, stored, with_files, model_bytes, added,
                             sum(by_hour.values()), dict(by_hour))

    # -- files -----------------------------------------------------------
    def file_writer(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileWriter:
        return _GridFSWriter(self, chunk_size)

    @_guard
    async def file_info(self, file_id: str) -> StoredFile | None:
        oid = _oid(file_id)
        raw = await self.files.find_one({"_id": oid}) if oid else None
        return _stored_file(raw) if raw else None

    @_guard_steps
    async def release_file(self, file_id: str) -> bool:
        oid = _oid(file_id)
        return oid is not None and await self.content.release(oid)

    # -- leases (see mongo_leases) ------------------------------------------------
    @_guard_steps
    async def lease_files(self, file_ids: list[str], owner: str, until: datetime) -> dict[str, str]:
        named = {oid: file_id for file_id in file_ids if (oid := _oid(file_id)) is not None}
        leased = await self.content.lease(list(named), owner, until)
        return {named[oid]: str(lease) for oid, lease in leased.items()}

    @_guard_steps
    async def renew_leases(self, lease_ids: list[str], until: datetime) -> None:
        await self.content.renew([oid for lease in lease_ids if (oid := _oid(lease)) is not None], until)

    @_guard_steps
    async def drop_leases(self, lease_ids: list[str]) -> list[str]:
        deleted = await self.content.drop([oid for lease in lease_ids if (oid := _oid(lease)) is not None])
        return [str(oid) for oid in deleted]

    @_guard_steps
    async def release_pending(self) -> list[str]:
        return [str(oid) for oid in await self.content.release_pending()]

    @_guard
    async def collect_garbage(self, min_age: timedelta, dry_run: bool) -> list[str]:
        # First what dead processes left of the lease protocol, so that the
        # releases below meet only live leases and tombstones.
        report = await self.content.collect(dry_run)
        cutoff = now() - min_age
        referenced = set(await self.models.distinct("file_metadata.file_id"))
        referenced |= set(await self.models.distinct("files.file_id"))
        # Committed content no model refers to (release_file re-checks references and leases).
        async for f in self.files.find({"uploadDate": {"$lt": cutoff}}, {"length": 1}):
            if f["_id"] in referenced:
                continue
            if dry_run or await self.content.release(f["_id"]):
                report.append(f"file {f['_id']} {f['length']} bytes (no model refers to it)")
        # Chunks without a files document: an upload that died before its
        # commit, or one still running. Chunk ids are made when they are
        # written, so a running upload's newest chunk is always young.
        # Upload sessions' chunks have no files document either, however old.
        # Sessions are read before files: one that completes in between has
        # its files document by then.
        sessions = set(await self.sessions.distinct("_id"))
        stored = set(await self.files.distinct("_id"))
        orphans = set(await self.chunks.distinct("files_id")) - stored - sessions
        # Read after the chunks: a writer records itself before its first chunk.
        writing = await self.live_uploads.live()
        for files_id in orphans:
            if files_id in writing:
                continue
            newest = await self.chunks.find_one({"files_id": files_id}, {"_id": 1}, sort=[("n", DESCENDING)])
            if newest is None or newest["_id"].generation_time > cutoff:
                continue
            count = await self.chunks.count_documents({"files_id": files_id})
            if not dry_run:
                await self.chunks.delete_many({"files_id": files_id})
            report.append(f"{count} orphan chunks of files_id {files_id} (upload never committed)")
        if not dry_run:
            await self.live_uploads.forget_stale()
            await self.session_locks.forget_lapsed(sessions)
            await self.model_locks.forget_lapsed()
            await self.fold_leftover_downloads()
        return report

    def settle_session_later(self, session_id: ObjectId, token: ObjectId) -> None:
        """_settle_session then release the lock, once the database is back (a writer's clean-up failed)."""
        task = asyncio.create_task(self._settle_session_when_back(session_id, token))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _settle_session_when_back(self, session_id: ObjectId, token: ObjectId) -> None:
        delay, deadline = 0.5, asyncio.get_running_loop().time() + SESSION_LOCK_TTL.total_seconds()
        # After that the lock has lapsed, and the request that takes it over settles the session.
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(delay)
            try:
                if await _settle_session(self, session_id, token):
                    await self.session_locks.release(session_id, token)
                return
            except PyMongoError:
                delay = min(delay * 2, 8.0)

    def remove_chunks_later(self, files_id: ObjectId) -> None:
        task = asyncio.create_task(self._remove_chunks_when_back(files_id))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _remove_chunks_when_back(self, files_id: ObjectId) -> None:
        delay = 1.0
        for _ in range(_CLEANUP_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                result = await self.chunks.delete_many({"files_id": files_id})
                log.info("removed %d chunks of cancelled upload %s", result.deleted_count, files_id)
                return
            except PyMongoError:
                delay = min(delay * 2, 30.0)
        log.warning("gave up removing chunks of cancelled upload %s; `model-service gc` will", files_id)

    @_guard_steps
    async def settle_file(self, file_id: str) -> None:
        await self.settle_files([file_id])

    @_guard_steps
    async def settle_files(self, file_ids: list[str]) -> None:
        # One claim each time a file is named (the same content twice: two claims).
        leases = []
        for file_id in file_ids:
            key = str(oid) if (oid := _oid(file_id)) is not None else file_id  # as StoredFile spells it
            if held := self._claims.get(key):
                leases.append(held.pop())
                if not held:
                    del self._claims[key]
        if leases:
            await self.content.drop(leases)

    @_guard
    async def find_blob(self, sha256: str) -> StoredFile | None:
        raw = await self.files.find_one({"metadata.sha256": sha256})
        return _stored_file(raw) if raw else None

    async def _blobs(self, sha256s: list[str]) -> dict[str, StoredFile]:
        found: dict[str, StoredFile] = {}
        for i in range(0, len(sha256s), 1000):
            async for raw in self.files.find({"metadata.sha256": {"$in": sha256s[i:i + 1000]}}):
                found[raw["metadata"]["sha256"]] = _stored_file(raw)
        return found

    async def _lease_blobs(self, sha256s: list[str], owner: str, until: datetime,
                           dropped: bool = True) -> dict[str, _Leased]:
        """Of these sha256s, the stored ones, each leased: (content, lease id) by sha256."""
        leased: dict[str, _Leased] = {}
        found = await self._blobs(list(dict.fromkeys(sha256s)))
        for _ in range(_LEASE_ATTEMPTS):
            got = await self.content.lease([ObjectId(f.file_id) for f in found.values()], owner, until, dropped)
            for sha256, f in found.items():
                if (lease := got.get(ObjectId(f.file_id))) is not None:
                    leased[sha256] = (f, lease)
            # Deleted before our lease: the same content may have been stored again since.
            gone = [sha256 for sha256 in found if sha256 not in leased]
            if not gone:
                break
            found = await self._blobs(gone)
        return leased

    def _remember_claims(self, claims: dict[str, _Leased]) -> dict[str, StoredFile]:
        for f, lease in claims.values():
            self._claims.setdefault(f.file_id, []).append(lease)
        return {sha256: f for sha256, (f, _) in claims.items()}

    @_guard_steps
    async def keep_blobs(self, sha256s: list[str], until: datetime) -> dict[str, StoredFile]:
        # A lease of its own per keep, never dropped: it simply ends (gc removes it
        # after), and a later keep never shortens an earlier one.
        kept = await self._lease_blobs(sha256s, KEEP_OWNER, until, dropped=False)
        return {sha256: f for sha256, (f, _) in kept.items()}

    @_guard_steps
    async def claim_blobs(self, sha256s: list[str]) -> dict[str, StoredFile]:
        return self._remember_claims(await self._lease_blobs(sha256s, claim_owner(), now() + CLAIM_GRACE))

    async def claim(self, sha256: str) -> StoredFile | None:
        """The stored copy of this content, claimed (a lease until CLAIM_GRACE; settle_file drops it), or None."""
        return self._remember_claims(await self._lease_blobs([sha256], claim_owner(), now() + CLAIM_GRACE)).get(sha256)

    async def claim_new(self, files_id: ObjectId) -> None:
        """Claim content about to be published under ``files_id`` (before its files document exists)."""
        lease = await self.content.insert(files_id, claim_owner(), now() + CLAIM_GRACE)
        self._claims.setdefault(str(files_id), []).append(lease)

    def abandon_claims(self, file_id: str) -> None:
        """Nobody will settle these claims (their commit failed): they end at CLAIM_GRACE."""
        for lease in self._claims.pop(file_id, []):
            self.content.forget(lease)

    # -- upload sessions -----------------------------------------------------
    @_guard
    async def open_session(self, session: UploadSession) -> None:
        await self.sessions.insert_one({
            "_id": ObjectId(session.id),
            "owner": session.owner,
            "offset": session.offset,
            "size_bytes": session.size_bytes,
            "checksum": session.checksum,
            "chunk_size": session.chunk_size,
            "created_at": session.created_at,
            "updated_at": session.updated_at,
            "tail": b"",  # the bytes past the last full chunk
        })

    @_guard
    async def get_session(self, session_id: str) -> UploadSession | None:
        oid = _session_oid(session_id)
        raw = await self.sessions.find_one({"_id": oid}, {"tail": 0}) if oid else None
        return _session(raw) if raw else None

    @_guard
    async def count_sessions(self, owner: str, updated_after: datetime) -> tuple[int, int]:
        live = {"updated_at": {"$gt": updated_after}}
        return (await self.sessions.count_documents({"owner": owner, **live}),
                await self.sessions.count_documents(live))

    def session_writer(self, session_id: str) -> SessionWriter:
        return _GridFSSessionWriter(self, session_id)

    @_guard
    async def delete_session(self, session_id: str) -> bool:
        oid = _session_oid(session_id)
        if oid is None:
            return False
        token = self.session_locks.new_token()
        try:
            await _lock_session(self, oid, token)
            # The document first: chunks left by a failure after it are orphans gc removes.
            if (await self.sessions.delete_one({"_id": oid})).deleted_count != 1:
                return False
            if await self.files.find_one({"_id": oid}, {"_id": 1}) is None:
                await self.chunks.delete_many({"files_id": oid})
            # else a commit published these chunks and stopped before removing the session.
            return True
        finally:
            self.session_hashes.forget(session_id)
            await self.session_locks.release(oid, token)

    @_guard
    async def sessions_updated_before(self, before: datetime) -> list[UploadSession]:
        return [_session(raw) async for raw in self.sessions.find({"updated_at": {"$lt": before}}, {"tail": 0})]

    async def read_file(self, file: StoredFile, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        end = file.size if length is None else min(file.size, offset + length)
        if offset >= end:
            return
        cs = file.chunk_size
        first, last = offset // cs, (end - 1) // cs
        # One cursor from the first chunk the range needs; small batches bound
        # the memory each download holds.
        cursor = self.chunks.find(
            {"files_id": ObjectId(file.file_id), "n": {"$gte": first, "$lte": last}},
            sort=[("n", ASCENDING)],
            batch_size=max(1, _READ_BATCH_BYTES // cs),
        )
        expected = first
        try:
            async for chunk in cursor:
                if chunk["n"] != expected:
                    raise FileMissing(f"file {file.file_id}: chunk {expected} is missing")
                data = chunk["data"]
                lo = offset - expected * cs if expected == first else 0
                hi = end - expected * cs if expected == last else len(data)
                expected += 1
                yield data[lo:hi] if (lo or hi != len(data)) else data
            if expected != last + 1:
                raise FileMissing(f"file {file.file_id}: chunk {expected} is missing")
        except _UNAVAILABLE as e:
            raise StorageUnavailable(f"MongoDB unreachable: {e}") from e
        finally:
            await cursor.close()


def _session(raw: dict[str, Any]) -> UploadSession:
    return UploadSession(str(raw["_id"]), raw["owner"], raw["offset"], raw["size_bytes"], raw["checksum"],
                         raw["chunk_size"], raw["created_at"], raw["updated_at"])


def _stored_file(raw: dict[str, Any]) -> StoredFile:
    meta = raw.get("metadata") or {}
    return StoredFile(str(raw["_id"]), raw["length"], meta.get("sha256", ""), raw["chunkSize"], raw["uploadDate"])


async def _publish(store: MongoStorage, files_id: ObjectId, size: int, chunk_size: int, sha256: str) -> StoredFile:
    """Make the chunks of ``files_id`` (all written) stored content, claimed; or, if the same
    content is already stored, claim that copy and remove these chunks."""
    existing = await store.claim(sha256)
    if existing is None:
        # Claimed before it is visible: no release can take it between the two.
        await store.claim_new(files_id)
        files_doc = {
            "_id": files_id,
            "length": size,
            "chunkSize": chunk_size,
            "uploadDate": now(),
            "filename": sha256,
            "metadata": {"sha256": sha256},
        }
        try:
            await _retry_busy(lambda: store.files.insert_one(files_doc))
            return _stored_file(files_doc)
        except DuplicateKeyError:
            # Someone committed the same content a moment ago.
            await store.settle_file(str(files_id))
            existing = await store.claim(sha256)
            if existing is None:
                raise
        except BaseException:
            # Stored or not (an answer lost), the commit failed: nobody will settle this claim.
            store.abandon_claims(str(files_id))
            raise
    # Same content is already stored: keep that copy, drop ours.
    if existing.file_id != str(files_id):
        await store.chunks.delete_many({"files_id": files_id})
    return existing


class _Chunks:
    """Cuts a stream of pieces into GridFS chunk documents, each chunk's bytes copied once."""

    def __init__(self, files_id: ObjectId, chunk_size: int, n: int = 0, tail: bytes = b"") -> None:
        self.files_id, self.chunk_size, self.n = files_id, chunk_size, n
        # The bytes after the last full chunk: views of pieces already received.
        self._tail: list[memoryview] = [memoryview(tail)] if tail else []
        self._tail_size = len(tail)

    def cut(self, pieces: list[bytes], final: bool = False) -> list[dict[str, Any]]:
        cs = self.chunk_size
        docs = []
        for piece in pieces:
            view = memoryview(piece)
            while view:
                take = min(cs - self._tail_size, len(view))
                self._tail.append(view[:take])
                self._tail_size += take
                view = view[take:]
                if self._tail_size == cs:
                    docs.append(self._chunk())
        if final and self._tail_size:
            docs.append(self._chunk())
        return docs

    def tail(self) -> bytes:
        return b"".join(self._tail)

    def clear(self) -> None:
        self._tail, self._tail_size = [], 0

    def _chunk(self) -> dict[str, Any]:
        doc = {"files_id": self.files_id, "n": self.n, "data": b"".join(self._tail)}
        self.n += 1
        self.clear()
        return doc


class _GridFSWriter(FileWriter):
    def __init__(self, store: MongoStorage, chunk_size: int) -> None:
        super().__init__(chunk_size)
        self._store = store
        self._files_id = ObjectId()
        self._chunks = _Chunks(self._files_id, chunk_size)

    async def _insert(self, docs: list[dict[str, Any]]) -> None:
        if not docs:
            return
        if docs[0]["n"] == 0:
            # The first chunks: gc must know they belong to a live upload.
            await self._store.live_uploads.add(self._files_id)
        # An insert the server has received completes even if the request is
        # cancelled (the client left): FileWriter shields this batch from the
        # request's cancellation, and cancel() waits for it, or a late insert
        # landing after _cancel's delete would leave orphan chunks.
        await _retry_busy(lambda: self._store.chunks.insert_many(docs, ordered=True))

    async def _store_batch(self, batch: list[bytes], offset: int) -> None:
        try:
            await self._insert(self._chunks.cut(batch))
        except PyMongoError as e:
            if (unavailable := _unavailable(e)) is not None:
                raise unavailable from e
            raise

    async def _commit(self) -> StoredFile:
        store = self._store
        try:
            last = asyncio.ensure_future(self._insert(self._chunks.cut([], final=True)))
            try:
                await asyncio.shield(last)  # as every batch's insert (see _insert)
            except asyncio.CancelledError:
                await asyncio.wait([last])
                raise
            return await _publish(store, self._files_id, self.size, self.chunk_size, self.sha256)
        except BaseException as e:
            await self._cancel()
            if (unavailable := _unavailable(e)) is not None:
                raise unavailable from e
            raise
        finally:
            await store.live_uploads.remove(self._files_id)

    async def _cancel(self) -> None:
        self._chunks.clear()
        try:
            await self._store.chunks.delete_many({"files_id": self._files_id})
        except PyMongoError as e:
            # The database is gone (which may be why we cancel). The chunks have
            # no files document, so no reader can see them; remove them once
            # the database is back. (`model-service gc` also finds them.)
            log.warning("upload %s cancelled while MongoDB is unreachable (%s); removing its chunks later",
                        self._files_id, e.__class__.__name__)
            self._store.remove_chunks_later(self._files_id)
        await self._store.live_uploads.remove(self._files_id)


# A writer renews its session's lock before each batch of chunks it inserts
# and before a checkpoint or commit, and while bytes arrive without filling a
# batch, once this much of SESSION_LOCK_TTL has passed since the last renewal.
_RENEW_AFTER = SESSION_LOCK_TTL.total_seconds() / 6


async def _lock_session(store: MongoStorage, oid: ObjectId, token: ObjectId) -> bool:
    """Take the session's write lock (Locks.acquire); SessionBusy while another request holds it."""
    try:
        return await store.session_locks.acquire(oid, token)
    except LockBusy:
        raise SessionBusy(f"upload session {oid} is being written") from None


async def _settle_session(store: MongoStorage, oid: ObjectId, token: ObjectId) -> bool:
    """Make a session whose last writer failed consistent again, while ``token`` holds its lock
    (False if it does not): no chunk beyond the stored offset, and no session left by a commit
    that went through. Afterwards the lock can be released as after any request.

    What is stored decides, not what the failed writer believed: a checkpoint or
    commit whose answer was lost may or may not have happened.
    """
    if not await store.session_locks.renew(oid, token):
        return False
    if await store.files.find_one({"_id": oid}, {"_id": 1}) is not None:
        await store.sessions.delete_one({"_id": oid})  # its commit published the content
        return True
    raw = await store.sessions.find_one({"_id": oid}, {"offset": 1, "chunk_size": 1})
    beyond = {"n": {"$gte": raw["offset"] // raw["chunk_size"]}} if raw else {}
    await store.chunks.delete_many({"files_id": oid, **beyond})
    return True


class _GridFSSessionWriter(SessionWriter):
    """Appends to an upload session: full chunks as GridFS chunks of the session's id,
    the rest (less than a chunk) in the session document as its ``tail``.

    A lock released the ordinary way leaves the session consistent (nothing
    beyond its offset, no files document under its id): a writer that fails
    settles the session first (_settle_session), at once or, with the database
    out of reach, once it is back. So only a request that takes over a lapsed
    lock has anything to discard, and the others skip that query (which the
    FerretDB test server answers with a scan of every chunk it stores).
    """

    def __init__(self, store: MongoStorage, session_id: str) -> None:
        super().__init__(store, session_id)
        self._store = store
        self._oid = _session_oid(session_id)
        self._token: ObjectId | None = None
        self._unsettled = False  # the session may hold more than its offset says: settle before releasing
        self._lost = False  # our lock lapsed and another request took the session
        self._renewed_at = 0.0
        self._tail = b""  # the stored tail (bytes past the last full chunk) this request started from
        self._chunks: _Chunks | None = None

    async def _acquire(self) -> UploadSession:
        store, oid = self._store, self._oid
        if oid is None:
            raise SessionMissing(f"no upload session {self.session_id}")
        with _storage_errors():
            # Known before the insert, and the insert shielded: a request cancelled
            # meanwhile (its client left) still releases the lock it may have taken.
            self._token = token = store.session_locks.new_token()
            acquiring = asyncio.ensure_future(_retry_busy(lambda: _lock_session(store, oid, token)))
            try:
                self._unsettled = await asyncio.shield(acquiring)  # until _discard_beyond has run
                self._renewed_at = time.monotonic()
                if self._unsettled and await store.files.find_one({"_id": oid}, {"_id": 1}) is not None:
                    # Its commit published the content, then stopped before removing the session.
                    await store.sessions.delete_one({"_id": oid})
                raw = await store.sessions.find_one({"_id": oid})
            except BaseException:
                await asyncio.wait([acquiring])
                if not acquiring.cancelled():
                    acquiring.exception()  # retrieved: the error raised here is the one that counts
                await self._release()
                raise
        if raw is None:
            self._unsettled = False  # what chunks a vanished session left are gc's orphans
            await self._release()
            raise SessionMissing(f"no upload session {self.session_id}")
        session = _session(raw)
        self._tail = raw["tail"]
        self._chunks = _Chunks(oid, session.chunk_size, session.offset // session.chunk_size, self._tail)
        return session

    async def _release(self) -> None:
        if self._token is None or self._oid is None:
            return
        token, self._token = self._token, None
        if self._unsettled and not self._lost:
            self._store.settle_session_later(self._oid, token)
        else:
            await self._store.session_locks.release(self._oid, token)

    async def _discard_beyond(self, offset: int) -> None:
        if not self._unsettled:
            return  # its last writer released the lock the ordinary way: nothing is there
        # The chunk holding ``offset`` is never stored before a commit (the
        # session document keeps that tail), so from there on all is leftover.
        with _storage_errors():
            await _retry_busy(lambda: self._store.chunks.delete_many(
                {"files_id": self._oid, "n": {"$gte": offset // self.chunk_size}}))
        self._unsettled = False

    async def _read_prefix(self) -> AsyncIterator[bytes]:
        session = self.session
        full = session.offset // session.chunk_size * session.chunk_size
        prefix = StoredFile(self.session_id, full, "", session.chunk_size, session.created_at)
        async for piece in self._store.read_file(prefix):
            yield piece
        if self._tail:
            yield self._tail

    async def _renew(self) -> None:
        store, oid, token = self._store, self._oid, self._token
        if not await _retry_busy(lambda: store.session_locks.renew(oid, token)):
            self._lost = True
            raise SessionBusy(f"upload session {self.session_id}: its lock lapsed and another request took it")
        self._renewed_at = time.monotonic()

    async def _insert(self, docs: list[dict[str, Any]]) -> None:
        # Each batch is shielded by FileWriter (and the last one by _commit), as _GridFSWriter's:
        # _cancel runs only once an insert the server has is done.
        if docs:
            await self._renew()  # and so no chunk lands in a session another request took over
            await _retry_busy(lambda: self._store.chunks.insert_many(docs, ordered=True))

    async def _store_batch(self, batch: list[bytes], offset: int) -> None:
        with _storage_errors():
            docs = self._chunks.cut(batch)
            if docs:
                await self._insert(docs)
            elif time.monotonic() - self._renewed_at > _RENEW_AFTER:
                await self._renew()

    async def _checkpoint(self) -> UploadSession:
        store, session = self._store, self.session
        try:
            with _storage_errors():
                await self._renew()
                tail, at = self._chunks.tail(), now()
                # Conditional on the offset we started from: a writer that lost
                # its lock changes nothing.
                result = await _retry_busy(lambda: store.sessions.update_one(
                    {"_id": self._oid, "offset": session.offset},
                    {"$set": {"offset": self.size, "tail": tail, "updated_at": at}}))
            if result.matched_count != 1:
                raise SessionMissing(f"no upload session {self.session_id}")
        except BaseException:
            await self._cancel()
            raise
        return replace(session, offset=self.size, updated_at=at)

    async def _commit(self) -> StoredFile:
        store = self._store
        try:
            with _storage_errors():
                last = asyncio.ensure_future(self._insert(self._chunks.cut([], final=True)))
                try:
                    await asyncio.shield(last)
                except asyncio.CancelledError:
                    await asyncio.wait([last])
                    raise
                await self._renew()
                stored = await _publish(store, self._oid, self.size, self.chunk_size, self.sha256)
        except BaseException:
            # Published or not (an insert whose answer was lost), _settle_session finds out.
            await self._cancel()
            raise
        try:
            await _retry_busy(lambda: store.sessions.delete_one({"_id": self._oid}))
        except PyMongoError as e:
            # The content is stored: the session goes when the database is back.
            log.warning("upload session %s completed but not removed: %s", self.session_id, e.__class__.__name__)
            self._unsettled = True
        return stored

    async def _cancel(self) -> None:
        # FileWriter.cancel waited for any batch still being inserted: nothing lands after the delete.
        if self._chunks is not None:
            self._chunks.clear()
        if self._lost or self._token is None or self.session is None:
            return
        try:
            # Our lock may have lapsed: whatever lies beyond the offset is then the new holder's.
            self._lost = not await _settle_session(self._store, self._oid, self._token)
            self._unsettled = False
        except PyMongoError as e:
            log.info("upload session %s: its clean-up waits for the database (%s)", self.session_id,
                     e.__class__.__name__)
            self._unsettled = True
