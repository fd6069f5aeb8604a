"""The model lifecycle: operations that span several storage calls.

Numbering versions: version numbers are computed from the name's latest version. Within one
process, registrations of the same name take turns (a lock per name), so they
never race each other; across processes two can still pick the same number,
and the unique (name, version) index turns the loser into DuplicateModel,
which numbers again.

Attaching a file: a stored upload is claimed (settled) once a model points at
it, and released again if none does; the file a model stops pointing at is
released (storage.release_file), which a download still reading it, in any
process, holds back with its lease until it is done (app/leases.py). The
service releases through its lease keeper (``leases``), so that its own leases
lingering after their last reader do not hold the release back.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import AsyncIterator

from bson import ObjectId

from . import clock, errors, snapshots, versions
from .errors import ApiError
from .http import preconditions
from .leases import FileLeases
from .locks import KeyedLocks
from .metrics import REGISTRATIONS, UPLOAD_BYTES, UPLOADS, algorithm_label
from .render import LAST_MODIFIED_SHARED
from .schemas import FileEntryIn
from .storage.base import (
    DuplicateModel,
    FileWriter,
    ModelDocument,
    ModelQuery,
    RegistryStats,
    Storage,
    StoredFile,
    StoredFileMetadata,
)
from .uploads import Received, file_metadata

_NUMBERING_ATTEMPTS = 8
_name_locks = KeyedLocks()


def latest(docs: list[ModelDocument]) -> ModelDocument | None:
    return max(docs, key=lambda d: versions.key(d["version"]), default=None)


async def latest_of(storage: Storage, name: str) -> ModelDocument | None:
    return latest(await storage.models_named(name))


# Stored on each model: whether a higher version of its name exists. Listings
# of latest versions filter on it: a plain field filter works on any MongoDB
# wire server, where grouping by name would need $group with $first.
SUPERSEDED = "superseded"
_SETTLE_ATTEMPTS = 8


async def settle_latest(storage: Storage, name: str) -> bool:
    """Mark every version of ``name`` superseded except the highest; whether anything changed.

    Called after every registration and deletion, by whichever process made
    it; made of single-document writes only. Marking a lower version
    superseded is always right once a higher one exists, so concurrent
    registrations cannot undo each other. Un-marking (the latest was deleted)
    can race a new registration: the state is read again after writing, and
    the loop ends only once a read finds nothing to change.
    """
    changed = False
    for _ in range(_SETTLE_ATTEMPTS):
        docs = await storage.models_named(name)
        top = latest(docs)
        changes = [(d["id"], d is not top) for d in docs if bool(d.get(SUPERSEDED)) != (d is not top)]
        if not changes:
            break
        changed = True
        for model_id, superseded in changes:
            await storage.update_model(model_id, {SUPERSEDED: superseded})
    return changed


async def statistics(storage: Storage) -> RegistryStats:
    """The totals behind /statistics, /metrics and the detailed health check."""
    now = clock.now()
    # Hourly buckets: the last 24 of them, this hour included.
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    return await storage.statistics(now - timedelta(days=7), this_hour - timedelta(hours=23))


async def versions_of(storage: Storage, name: str) -> list[ModelDocument]:
    """Every version of a name, newest first."""
    docs = await storage.models_named(name)
    docs.sort(key=lambda d: versions.key(d["version"]), reverse=True)
    return docs


async def update(storage: Storage, model_id: str, fields: ModelDocument) -> ModelDocument | None:
    """Set validated fields (none: just read); the model as it is now, None if there is none."""
    if not fields:
        return await storage.get_model(model_id)
    return await storage.update_model(model_id, {**fields, "updated_at": clock.now()})


async def create(storage: Storage, fields: ModelDocument, parent_id: str | None = None) -> ModelDocument:
    """Insert a model built from validated fields, numbering its version.

    With ``parent_id`` it is a new version of that model; otherwise its parent
    is the name's latest version, if there is one.
    """
    async with _name_locks(fields["name"]):
        return await _create(storage, dict(fields), parent_id)


def model_document(fields: ModelDocument, version: str, parent_model_id: str | None = None,
                   created_at: datetime | None = None) -> ModelDocument:
    """A new model as storage holds it: defaults, the given fields, then what only the registry sets."""
    stamp = created_at or clock.now()
    return {
        "id": str(ObjectId()),
        "hyperparameters": {},
        "metrics": {},
        "dataset_info": {},
        "tags": [],
        "status": "active",
        **fields,
        "version": version,
        "parent_model_id": parent_model_id,
        "created_at": stamp,
        "updated_at": stamp,
        "download_count": 0,
    }


async def _create(storage: Storage, fields: ModelDocument, parent_id: str | None) -> ModelDocument:
    explicit = fields.pop("version", None)
    breaking = fields.pop("breaking_changes", False)
    for _ in range(_NUMBERING_ATTEMPTS):
        latest = await latest_of(storage, fields["name"])
        if explicit:
            version = explicit
        elif latest is None:
            version = versions.FIRST
        else:
            version = versions.bump(latest["version"], breaking)
        doc = model_document(fields, version, parent_id or (latest["id"] if latest else None))
        try:
            await storage.insert_model(doc)
            REGISTRATIONS.labels(algorithm_label(doc["algorithm"])).inc()
            await settle_latest(storage, doc["name"])
            return doc
        except DuplicateModel:
            if explicit:
                raise ApiError(errors.VERSION_EXISTS,
                               f"{fields['name']} {version} already exists") from None
    raise ApiError(errors.VERSION_CONFLICT,
                   f"could not number a new version of {fields['name']}: too many concurrent registrations")


def new_version_fields(source: ModelDocument, updates: ModelDocument) -> ModelDocument:
    """The source model's metadata with the request's fields replacing its own."""
    inherited = ("name", "algorithm", "hyperparameters", "metrics", "dataset_info", "tags", "status",
                 "description", "created_by", "format")
    base = {k: source[k] for k in inherited if source.get(k) is not None}
    return {**base, **updates}


async def settle_all_latest(storage: Storage, page: int = 500) -> int:
    """settle_latest for every name with several versions (or a stale mark); how many names changed.

    For stores written before the mark existed; ``model-service gc`` runs it.
    """
    counts: dict[str, int] = {}
    marked: set[str] = set()
    skip = 0
    while True:
        docs, _ = await storage.find_models(ModelQuery(sort_field="name", sort_desc=False, skip=skip, limit=page))
        for d in docs:
            counts[d["name"]] = counts.get(d["name"], 0) + 1
            if d.get(SUPERSEDED):
                marked.add(d["name"])
        if len(docs) < page:
            break
        skip += page
    return sum([await settle_latest(storage, name)
                for name in sorted(n for n, c in counts.items() if c > 1 or n in marked)])


async def delete(storage: Storage, model_id: str, leases: FileLeases | None = None) -> ModelDocument | None:
    """Delete a model and release its files (each kept while another model shares it)."""
    doc = await storage.delete_model(model_id)
    if doc is not None:
        await _release_all(storage, snapshots.file_ids(doc), leases)
    if doc is not None and not doc.get(SUPERSEDED):
        await settle_latest(storage, doc["name"])
    return doc


@asynccontextmanager
async def _claiming(storage: Storage, received: Received) -> AsyncIterator[None]:
    """Settle the uploaded file after the block; if the block fails, no model points at it: release it too."""
    file_id = received.stored.file_id
    try:
        yield
    except BaseException:
        await storage.settle_file(file_id)
        await storage.release_file(file_id)
        raise
    await storage.settle_file(file_id)


def _count_upload(doc: ModelDocument, received: Received) -> None:
    UPLOADS.labels(algorithm_label(doc["algorithm"])).inc()
    UPLOAD_BYTES.inc(received.stored.size)


def _date_shared(replaced: ModelDocument, fm: StoredFileMetadata) -> ModelDocument:
    """The new file's metadata marked if its Last-Modified second is shared with the content it replaces.

    Replacing a file within the second it was uploaded leaves two contents with
    one Last-Modified: marked, an If-Range date naming that second is not
    trusted (downloads.date_is_strong). A committed snapshot's files and tar
    are dated by its creation.
    """
    current = replaced.get("file_metadata")
    shared = ((current and current["checksum"] != fm["checksum"]
               and preconditions.same_second(current["uploaded_at"], fm["uploaded_at"]))
              or (snapshots.is_snapshot(replaced) and preconditions.same_second(replaced["created_at"],
                                                                                 fm["uploaded_at"])))
    return {"file_metadata": {**fm, LAST_MODIFIED_SHARED: True}} if shared else {}


async def attach_file(storage: Storage, doc: ModelDocument, received: Received,
                      leases: FileLeases | None = None) -> StoredFileMetadata:
    """Point the model at its new file, then release whatever file it had before; the new file_metadata."""
    fm = file_metadata(received, doc.get("format"), f"{doc['name']}-{doc['version']}")
    async with _claiming(storage, received):
        # A committed snapshot becomes a single-file version: its files go, in the same update.
        # update_model is atomic across processes: ``previous`` is exactly the
        # document this swap replaced, however many uploads race (any replica),
        # and so is the document _date_shared judges.
        previous = await storage.update_model(
            doc["id"], {"file_metadata": fm, "updated_at": fm["uploaded_at"],
                        **dict.fromkeys(snapshots.SNAPSHOT_FIELDS)},
            return_previous=True, amend=lambda replaced: _date_shared(replaced, fm))
        if previous is None:
            # The model was deleted while its file was uploading.
            raise ApiError(errors.NOT_FOUND, f"no model with id {doc['id']}")
    await _release_all(storage, [f for f in snapshots.file_ids(previous) if f != fm["file_id"]], leases)
    _count_upload(doc, received)
    return fm


async def attach_blob(storage: Storage, doc: ModelDocument, sha256: str,
                      filename: str | None, leases: FileLeases | None = None) -> StoredFileMetadata:
    """Point a model at a stored blob (POST /models/{id}/upload?digest=), as an upload's file is attached:
    claimed first, so no release or gc removes it in between; 422 missing_blobs if it is not stored."""
    blob = (await storage.claim_blobs([sha256])).get(sha256)
    if blob is None:
        raise ApiError(errors.MISSING_BLOBS, f"blob sha256:{sha256} is not stored; upload it first (PUT "
                                             "/api/v1/blobs/<digest> or an upload session); nothing changed",
                       details={"missing": [f"sha256:{sha256}"]})
    return await attach_file(storage, doc, Received(blob, filename or "", "application/octet-stream"), leases)


async def _release_all(storage: Storage, file_ids: list[str], leases: FileLeases | None) -> None:
    """Release content a model no longer refers to (a download's lease holds it back until it is done).

    Through the service's lease keeper when there is one (``leases``, the
    app's LEASES): its idle lingering leases then do not delay the release.
    """
    if leases is not None:
        await leases.release(file_ids)
        return
    for file_id in file_ids:
        await storage.release_file(file_id)


async def create_snapshot(storage: Storage, fields: ModelDocument, files: list[FileEntryIn],
                          parent_id: str | None = None) -> ModelDocument:
    """Register a version (validated fields, checked paths) with all these files in one insert, or nothing.

    The blobs are claimed before the insert and settled after it, as an upload's
    file is: a release or gc in between cannot remove content the new version
    is about to refer to. A blob not stored (or stored with another size)
    fails the commit with 422 missing_blobs, listing each such digest once.
    """
    claimed = await storage.claim_blobs([f.checksum.removeprefix("sha256:") for f in files])
    try:
        missing = list(dict.fromkeys(
            f.checksum for f in files
            if (blob := claimed.get(f.checksum.removeprefix("sha256:"))) is None or blob.size != f.size_bytes))
        if missing:
            raise ApiError(errors.MISSING_BLOBS,
                           f"{len(missing)} blob(s) of this commit are not stored (or are stored with another "
                           "size); PUT /api/v1/blobs/<digest> each of them, then commit again; nothing was created",
                           details={"missing": missing})
        entries = snapshots.sort_entries(
            snapshots.Entry(path=f.path, size_bytes=f.size_bytes, checksum=f.checksum,
                            content_type=f.content_type or snapshots.content_type_for(f.path),
                            file_id=(blob := claimed[f.checksum.removeprefix("sha256:")]).file_id,
                            chunk_size=blob.chunk_size)
            for f in files)
        return await create(storage, {**fields, "files": entries,
                                       "snapshot_digest": snapshots.snapshot_digest(entries),
                                       "total_size_bytes": sum(e["size_bytes"] for e in entries)}, parent_id)
    finally:
        # A failed commit only drops its claims: the blobs stay for BLOB_GRACE, so a retry
        # (another version number, say) need not upload them again.
        await storage.settle_files([blob.file_id for blob in claimed.values()])


async def keep_blob(storage: Storage, sha256: str, grace: timedelta) -> StoredFile | None:
    """The stored blob sha256:<hex>, kept for ``grace`` from now (BLOB_GRACE: a commit is about to name it)."""
    return (await storage.keep_blobs([sha256], clock.now() + grace)).get(sha256)


async def store_blob(storage: Storage, writer: FileWriter, sha256: str, grace: timedelta) -> StoredFile:
    """The writer's content becomes the blob sha256:<hex>: PUT /api/v1/blobs and a completed upload session.

    Committed (deduplicated onto a stored copy), kept for ``grace`` as a blob a
    commit is about to name, and its commit's claim settled. Content that
    hashes otherwise is refused (422 digest_mismatch) before the commit; the
    caller's writer block then discards it.
    """
    if writer.sha256 != sha256:
        raise ApiError(errors.DIGEST_MISMATCH,
                       f"the content ({writer.size} bytes) has sha256:{writer.sha256}, not sha256:{sha256}; "
                       "nothing was kept")
    stored = await writer.commit()
    try:
        await keep_blob(storage, sha256, grace)
    finally:
        await storage.settle_file(stored.file_id)
    UPLOAD_BYTES.inc(stored.size)
    return stored


async def create_with_file(storage: Storage, fields: ModelDocument, received: Received) -> ModelDocument:
    """Register a model (validated fields) whose file is already stored; the file is released if that fails."""
    async with _claiming(storage, received):
        fields = {**fields, "file_metadata": file_metadata(received, fields.get("format"), fields["name"])}
        doc = await create(storage, fields)
        _count_upload(doc, received)
    return doc
