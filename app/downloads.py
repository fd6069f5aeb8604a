"""Downloads of model files: the application's side of them.

Three representations are sent: a single-file version's file (``/download``,
as always), one file of any version (``/files/{path}``), and a committed
snapshot's deterministic tar (``/download``, app/snapshot_tar.py). For each
this looks the content up, names it in headers (checksums, X-Model-*), and
around its body takes the leases, the slot, the count and the metrics;
app/http/fileresponse.py answers the request (preconditions, ranges, sendfile)
knowing none of that. Bodies are read through ``prefetch`` (the next chunk is
read while the previous one is written).

The lease is taken just before the response starts. Content deleted between
the lookup and the lease (its model replaced or deleted, by any process) is
ContentGone: the download then looks its URL up again and answers with what
the model points at now, or 404 if the model went too.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import aclosing
from datetime import datetime
from urllib.parse import quote

from aiohttp import web

from . import clock, errors, metrics, render, snapshots, urls
from .appkeys import COUNTS, DOWNLOAD_SLOTS, LEASES, SETTINGS, STORAGE
from .errors import ApiError
from .http import fileresponse, preconditions, sendfile
from .logs import REQUEST_ID_HEADER, request_id
from .snapshot_tar import TarLayout
from .storage.base import ContentGone, FileMissing, ModelDocument, Storage, StorageUnavailable, StoredFile
from .streaming import prefetch

log = logging.getLogger("app.downloads")


def stored_file(doc: ModelDocument) -> StoredFile:
    fm = doc.get("file_metadata")
    if not fm:
        if snapshots.is_snapshot(doc):
            raise ApiError(errors.NO_FILE, f"model {doc['id']} is a snapshot of {len(snapshots.entries(doc))} "
                           f"files, not one file: GET {urls.files_url(doc['id'])} lists them")
        raise ApiError(errors.NO_FILE, f"model {doc['id']} has no file uploaded yet")
    return StoredFile(fm["file_id"], fm["size_bytes"], fm["checksum"].removeprefix("sha256:"),
                      fm["chunk_size"], fm["uploaded_at"])


def _header_text(value: str) -> str:
    # Header values are ASCII on the wire; anything else is percent-encoded.
    return value if value.isascii() and value.isprintable() else quote(value, safe="")


def content_disposition(filename: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() else "_" for c in filename)
    fallback = fallback.replace("\\", "\\\\").replace('"', '\\"')
    value = f'attachment; filename="{fallback}"'
    if not filename.isascii():
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


def _model_headers(doc: ModelDocument) -> dict[str, str]:
    return {
        "X-Model-Id": doc["id"],
        "X-Model-Name": doc["name"],
        "X-Model-Algorithm": _header_text(doc["algorithm"]),
        "X-Model-Version": doc["version"],
    }


def file_headers(doc: ModelDocument, f: StoredFile, filename: str,
                 content_type: str = "application/octet-stream") -> dict[str, str]:
    # A copy: the response's headers are its own to change.
    return dict(_file_headers(doc["id"], doc["name"], doc["algorithm"], doc["version"], f.sha256, f.uploaded_at,
                              filename, content_type))


# Computed once per file and model fields (base64, the HTTP date, the
# disposition's quoting: ~19 us a download otherwise); keyed by all it reads.
@functools.lru_cache(maxsize=4096)
def _file_headers(model_id: str, name: str, algorithm: str, version: str, sha256: str, uploaded_at: datetime,
                  filename: str, content_type: str) -> dict[str, str]:
    digest = base64.b64encode(bytes.fromhex(sha256)).decode()
    return {
        "Content-Type": content_type,
        "Content-Disposition": content_disposition(filename),
        "Accept-Ranges": "bytes",
        "ETag": f'"{sha256}"',
        "Last-Modified": preconditions.http_date(uploaded_at),
        **_model_headers({"id": model_id, "name": name, "algorithm": algorithm, "version": version}),
        "X-File-Checksum": f"sha256:{sha256}",
        "Repr-Digest": f"sha-256=:{digest}:",
    }


# Headers a 304 repeats (RFC 9110 section 15.4.5), so caches can refresh.
# X-Model-* too: a by-name poller learns which version it has, even when a
# new version with identical content became the latest.
NOT_MODIFIED_HEADERS = ("ETag", "Last-Modified", "Accept-Ranges", "X-File-Checksum", "Repr-Digest",
                         "X-Model-Id", "X-Model-Name", "X-Model-Version")
# The tar has no checksum of its own to name (its ETag is the snapshot digest).
TAR_NOT_MODIFIED_HEADERS = ("ETag", "Last-Modified", "Accept-Ranges", "X-Snapshot-Digest",
                            "X-Model-Id", "X-Model-Name", "X-Model-Version")
TAR_CONTENT_TYPE = "application/x-tar"


def snapshot_etag(doc: ModelDocument) -> str:
    """The strong ETag of a version's whole content: its snapshot digest's hex (the manifest's, the tar's)."""
    return f'"{snapshots.digest_of(doc).removeprefix("sha256:")}"'


def _validators(doc: ModelDocument, path: str | None) -> tuple[str, datetime] | None:
    """ETag and Last-Modified of what a URL of ``doc`` serves: ``/download`` (path None) or ``/files/{path}``."""
    if path is None:
        if snapshots.is_snapshot(doc):
            return snapshot_etag(doc), doc["created_at"]
        fm = doc.get("file_metadata")
        return (f'"{fm["checksum"].removeprefix("sha256:")}"', fm["uploaded_at"]) if fm else None
    entry = snapshots.find(doc, path)
    if entry is None:
        return None
    f = snapshots.stored_file(doc, entry)
    return f'"{f.sha256}"', f.uploaded_at


def date_is_strong(doc: ModelDocument, others: Iterable[ModelDocument] = (), path: str | None = None) -> bool:
    """Whether the Last-Modified of what ``doc`` serves at ``path`` names only this content (RFC 9110 8.8.2.2).

    Not when the model's previous content was stored in the same second, nor,
    for ``others`` (the other versions a by-name URL may have served), when
    one of them serves another content at that URL stamped with that second.
    """
    fm = doc.get("file_metadata")
    if fm and fm.get(render.LAST_MODIFIED_SHARED):
        return False
    etag, modified = _validators(doc, path)
    return not any(
        o["id"] != doc["id"] and (v := _validators(o, path)) is not None and v[0] != etag
        and preconditions.same_second(v[1], modified)
        for o in others
    )


def _file_reader(storage: Storage, f: StoredFile):
    def read(offset: int, count: int) -> AsyncIterator[bytes]:
        pieces = storage.read_file(f, offset, count)
        return prefetch(pieces, storage.read_ahead) if storage.read_ahead else pieces
    return read


# What a download URL names: its model, and the other versions a by-name URL may
# have served (for date_is_strong). Raises ApiError (404) as the URL's lookup does.
Lookup = Callable[[], Awaitable[tuple[ModelDocument, Iterable[ModelDocument]]]]

# Lookups per download: content replaced again each time between the lookup and
# the lease is a store being rewritten faster than it can be read (503, retry).
_LOOKUPS = 3


async def _with_current(lookup: Lookup, answer: Callable[[ModelDocument, Iterable[ModelDocument]],
                                                         Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """``answer`` for what the URL names now: looked up again when its content went before it was leased."""
    for _ in range(_LOOKUPS):
        doc, others = await lookup()
        try:
            return await answer(doc, others)
        except ContentGone as e:
            log.info("content of model %s went before its download started; looking it up again: %s", doc["id"], e)
    raise ApiError(errors.STORAGE_UNAVAILABLE,
                   f"the model's file was replaced or deleted {_LOOKUPS} times while this download started; retry",
                   {"Retry-After": "1"})


async def send(request: web.Request, lookup: Lookup) -> web.StreamResponse:
    """``/download``: a single-file version's file, or a committed snapshot's tar."""
    return await _with_current(lookup, lambda doc, others: _send_download(request, doc, others))


async def send_file(request: web.Request, lookup: Lookup, path: str) -> web.StreamResponse:
    """``/files/{path}``: one file of a version, as ``/download`` sends one; never counted as a download."""
    return await _with_current(lookup, lambda doc, others: _send_one_file(request, doc, path, others))


# The representation of a version's file (a single-file version's /download, any version's
# /files/{path}), kept with the document it was built from. The read cache hands out one frozen
# document object for as long as its model is unchanged (app/read_cache.py), and the representation
# depends on nothing else when no other versions are involved (by id, or a pinned ?version=), so
# finding that same object here means it still holds. A changed model is a new object and builds
# anew. About 8 us of a 16 KB download otherwise. Bounded in entries, and a version of more than
# _MAX_BUILT_FILES files keeps nothing: its document (up to MBs) would outlive the read cache's own
# bound on bytes here.
_built: dict[tuple[int, str | None], tuple[ModelDocument, fileresponse.Representation, StoredFile]] = {}
_MAX_BUILT = 1024
_MAX_BUILT_FILES = 64

Build = Callable[[Storage, ModelDocument, Iterable[ModelDocument], str | None],
                 tuple[fileresponse.Representation, StoredFile]]


def _representation(storage: Storage, doc: ModelDocument, others: Iterable[ModelDocument], path: str | None,
                    build: Build) -> tuple[fileresponse.Representation, StoredFile]:
    """``build``'s representation of ``path`` of ``doc`` (None: /download), from _built when kept."""
    key = (id(doc), path)
    hit = _built.get(key)
    if hit is not None and hit[0] is doc and not others:
        return hit[1], hit[2]
    representation, f = build(storage, doc, others, path)
    # A store without read stamps keeps no documents: each read is a new object, never found again.
    if not others and snapshots.file_count(doc) <= _MAX_BUILT_FILES and storage.read_stamp(False) is not None:
        while len(_built) >= _MAX_BUILT:
            del _built[next(iter(_built))]
        # The document itself is kept, so its id cannot be reused by another object meanwhile.
        _built[key] = (doc, representation, f)
    return representation, f


async def _send_download(request: web.Request, doc: ModelDocument,
                         others: Iterable[ModelDocument]) -> web.StreamResponse:
    if snapshots.is_snapshot(doc):
        return await _send_tar(request, doc, others)
    representation, f = _representation(request.app[STORAGE], doc, others, None, _whole_file)
    return await _send(request, doc, representation, [f.file_id], counts=True)


def _whole_file(storage: Storage, doc: ModelDocument, others: Iterable[ModelDocument],
                _path: None) -> tuple[fileresponse.Representation, StoredFile]:
    f = stored_file(doc)
    representation = fileresponse.Representation(
        headers=file_headers(doc, f, doc["file_metadata"]["filename"]), size=f.size, last_modified=f.uploaded_at,
        date_is_strong=date_is_strong(doc, others), not_modified_headers=NOT_MODIFIED_HEADERS,
        read=_file_reader(storage, f), path=storage.local_path(f), name=f"model {doc['id']}")
    return representation, f


async def _send_one_file(request: web.Request, doc: ModelDocument, path: str,
                         others: Iterable[ModelDocument]) -> web.StreamResponse:
    representation, f = _representation(request.app[STORAGE], doc, others, path, _one_file)
    return await _send(request, doc, representation, [f.file_id], counts=False)


def _one_file(storage: Storage, doc: ModelDocument, others: Iterable[ModelDocument],
              path: str) -> tuple[fileresponse.Representation, StoredFile]:
    entry = snapshots.find(doc, path)
    if entry is None:
        # The rules after the lookup: a single-file version's path is its
        # upload's filename, which the upload rules allowed (an NFD name, a ":").
        if (problem := snapshots.path_problem(path)) is not None:
            raise ApiError(errors.INVALID_PATH, f'path "{_shown(path)}": {problem}')
        if not snapshots.entries(doc):
            raise ApiError(errors.NO_FILE, f"model {doc['id']} has no file uploaded yet")
        raise ApiError(errors.NOT_FOUND, f"model {doc['id']} has no file {_shown(path)}")
    f = snapshots.stored_file(doc, entry)
    headers = {**file_headers(doc, f, path.rpartition("/")[2], entry["content_type"]), **_UNTRUSTED_TYPE}
    representation = fileresponse.Representation(
        headers=headers, size=f.size,
        last_modified=f.uploaded_at, date_is_strong=date_is_strong(doc, others, path),
        not_modified_headers=NOT_MODIFIED_HEADERS, read=_file_reader(storage, f), path=storage.local_path(f),
        name=f"file {_shown(path)} of model {doc['id']}")
    return representation, f


# A file's Content-Type is whatever its committer declared, and this origin
# also serves the web UI: a browser must neither sniff nor run it (it is an
# attachment anyway), even opened directly.
_UNTRUSTED_TYPE = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


def _shown(path: str) -> str:
    return quote(path, safe="/")


async def _send_tar(request: web.Request, doc: ModelDocument, others: Iterable[ModelDocument]) -> web.StreamResponse:
    found = snapshots.entries(doc)
    files = [snapshots.stored_file(doc, e) for e in found]
    # The entries' mtime: the version's creation, whole seconds (Last-Modified's too).
    created: datetime = doc["created_at"]
    layout = TarLayout([(e["path"], e["size_bytes"]) for e in found], int(created.timestamp()))
    storage = request.app[STORAGE]
    digest = snapshots.digest_of(doc)

    async def read(offset: int, count: int) -> AsyncIterator[bytes]:
        for piece in layout.pieces(offset, offset + count):
            if isinstance(piece, bytes):
                yield piece
                continue
            index, at, length = piece
            async with aclosing(storage.read_file(files[index], at, length)) as content:
                async for chunk in content:
                    yield chunk

    def read_ahead(offset: int, count: int) -> AsyncIterator[bytes]:
        return prefetch(read(offset, count), storage.read_ahead) if storage.read_ahead else read(offset, count)

    local = [storage.local_path(f) for f in files]
    spans = None
    if all(path is not None for path in local):
        def spans(offset: int, count: int) -> Iterator[bytes | fileresponse.LocalRange]:
            for piece in layout.pieces(offset, offset + count):
                if isinstance(piece, bytes):
                    yield piece
                else:
                    index, at, length = piece
                    yield fileresponse.LocalRange(local[index], at, length)

    headers = {
        "Content-Type": TAR_CONTENT_TYPE,
        "Content-Disposition": content_disposition(f"{doc['name']}-{doc['version']}.tar"),
        "Accept-Ranges": "bytes",
        "ETag": snapshot_etag(doc),
        "Last-Modified": preconditions.http_date(created),
        **_model_headers(doc),
        "X-Snapshot-Digest": digest,
    }
    representation = fileresponse.Representation(
        headers=headers, size=layout.size, last_modified=created, date_is_strong=date_is_strong(doc, others),
        not_modified_headers=TAR_NOT_MODIFIED_HEADERS, read=read_ahead, spans=spans,
        name=f"snapshot tar of model {doc['id']}")
    return await _send(request, doc, representation, [f.file_id for f in files], counts=True)


async def _send(request: web.Request, doc: ModelDocument, representation: fileresponse.Representation,
                file_ids: list[str], *, counts: bool) -> web.StreamResponse:
    # The request id goes with the answers fileresponse starts itself; the middleware adds it to the rest.
    return await fileresponse.send(request, representation, timeout=request.app[SETTINGS].download_timeout,
                                   sending=lambda transfer: _Downloading(request, doc, file_ids, transfer, counts),
                                   aborts=(StorageUnavailable, FileMissing, sendfile.FileGone),
                                   started_headers={REQUEST_ID_HEADER: request_id(request)})


async def count_download(request: web.Request, doc: ModelDocument) -> None:
    """One download of the version: the metric in the tally (applied within FLUSH_SECONDS,
    app/metrics.py); its download_count and the hourly tally within COUNT_FLUSH_INTERVAL (app/counts.py)."""
    metrics.TALLY.add(metrics.downloads(doc["algorithm"]))
    await request.app[COUNTS].add(doc["id"], clock.this_hour())


class _Downloading:
    """Around a download's body: its leases, its slot, its count and its metrics (ContentGone
    before anything is sent if the content went since the lookup). A class, not a generator:
    one is entered per download (see leases._Reading)."""

    __slots__ = ("_request", "_doc", "_transfer", "_counts", "_reading", "_slot")

    def __init__(self, request: web.Request, doc: ModelDocument, file_ids: list[str],
                 transfer: fileresponse.Transfer, counts: bool) -> None:
        self._request, self._doc, self._transfer, self._counts = request, doc, transfer, counts
        self._reading = request.app[LEASES].reading(*file_ids)
        self._slot = request.app[DOWNLOAD_SLOTS].slot()

    async def __aenter__(self) -> None:
        # The leases first: a model deleted or replaced while this waits for a
        # slot keeps its files until this download has sent them.
        await self._reading.__aenter__()
        try:
            await self._slot.__aenter__()
            try:
                # A response that carries byte 0 is a download; later ranges resume one.
                if self._counts and self._transfer.whole:
                    await count_download(self._request, self._doc)
            except BaseException:
                await self._slot.__aexit__(None, None, None)
                raise
        except BaseException:
            await self._reading.__aexit__(None, None, None)
            raise
        metrics.TALLY.active_downloads += 1

    async def __aexit__(self, kind, error, trace) -> bool:
        try:
            metrics.TALLY.active_downloads -= 1
            metrics.TALLY.add(metrics.DOWNLOAD_BYTES, self._transfer.sent)
        finally:
            await self._slot.__aexit__(None, None, None)
            await self._reading.__aexit__(None, None, None)
        if isinstance(error, (StorageUnavailable, FileMissing, sendfile.FileGone)):
            # The response has already aborted the connection.
            metrics.STORAGE_ERRORS.labels("download").inc()
            log.error("download of model %s aborted mid-body: %s", self._doc["id"], error)
            return True
        return False
