"""Downloads of model files: the application's side of them.

Looks the file up, names it in headers (checksums, X-Model-*), and around its
body takes the lease, the slot, the count and the metrics; app/http/fileresponse.py
answers the request (preconditions, ranges, sendfile) knowing none of that. The
body is read through ``prefetch`` (the next chunk is read while the previous one
is written).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from urllib.parse import quote

from aiohttp import web

from . import clock, errors, metrics, views
from .appkeys import DOWNLOAD_SLOTS, LEASES, SETTINGS, STORAGE
from .errors import ApiError
from .http import fileresponse, preconditions, sendfile
from .storage.base import FileMissing, ModelDocument, StorageError, StorageUnavailable, StoredFile
from .streaming import prefetch

log = logging.getLogger("app.downloads")


def stored_file(doc: ModelDocument) -> StoredFile:
    fm = doc.get("file_metadata")
    if not fm:
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


def file_headers(doc: ModelDocument, f: StoredFile) -> dict[str, str]:
    digest = base64.b64encode(bytes.fromhex(f.sha256)).decode()
    return {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": content_disposition(doc["file_metadata"]["filename"]),
        "Accept-Ranges": "bytes",
        "ETag": f'"{f.sha256}"',
        "Last-Modified": preconditions.http_date(f.uploaded_at),
        "X-Model-Id": doc["id"],
        "X-Model-Name": doc["name"],
        "X-Model-Algorithm": _header_text(doc["algorithm"]),
        "X-Model-Version": doc["version"],
        "X-File-Checksum": f"sha256:{f.sha256}",
        "Repr-Digest": f"sha-256=:{digest}:",
    }


# Headers a 304 repeats (RFC 9110 section 15.4.5), so caches can refresh.
# X-Model-* too: a by-name poller learns which version it has, even when a
# new version with identical content became the latest.
NOT_MODIFIED_HEADERS = ("ETag", "Last-Modified", "Accept-Ranges", "X-File-Checksum", "Repr-Digest",
                         "X-Model-Id", "X-Model-Name", "X-Model-Version")


def date_is_strong(doc: ModelDocument, others: Iterable[ModelDocument] = ()) -> bool:
    """Whether the file's Last-Modified names only this content (RFC 9110 section 8.8.2.2).

    Not when the model's previous file was uploaded in the same second, nor,
    for ``others`` (the other versions a by-name URL may have served), when
    one of them has another content uploaded in that second.
    """
    fm = doc["file_metadata"]
    if fm.get(views.LAST_MODIFIED_SHARED):
        return False
    return not any(
        o["id"] != doc["id"] and o.get("file_metadata") and o["file_metadata"]["checksum"] != fm["checksum"]
        and preconditions.same_second(o["file_metadata"]["uploaded_at"], fm["uploaded_at"])
        for o in others
    )


async def send(request: web.Request, doc: ModelDocument,
               others: Iterable[ModelDocument] = ()) -> web.StreamResponse:
    f = stored_file(doc)
    storage = request.app[STORAGE]

    def read(offset: int, count: int):
        pieces = storage.read_file(f, offset, count)
        return prefetch(pieces, storage.read_ahead) if storage.read_ahead else pieces

    representation = fileresponse.Representation(
        headers=file_headers(doc, f), size=f.size, last_modified=f.uploaded_at,
        date_is_strong=date_is_strong(doc, others), not_modified_headers=NOT_MODIFIED_HEADERS,
        read=read, path=storage.local_path(f), name=f"model {doc['id']}")
    return await fileresponse.send(request, representation, timeout=request.app[SETTINGS].download_timeout,
                                   sending=lambda transfer: _downloading(request, doc, f, transfer),
                                   aborts=(StorageUnavailable, FileMissing, sendfile.FileGone))


@asynccontextmanager
async def _downloading(request: web.Request, doc: ModelDocument, f: StoredFile,
                       transfer: fileresponse.Transfer) -> AsyncIterator[None]:
    """Around a download's body: its lease, its slot, its count and its metrics."""
    # The lease first: a model deleted or replaced while this waits for a slot
    # keeps its file until this download has sent it.
    async with request.app[LEASES].reading(f.file_id), request.app[DOWNLOAD_SLOTS].slot():
        # A response that carries byte 0 is a download; later ranges resume one.
        if transfer.whole:
            metrics.DOWNLOADS.labels(metrics.algorithm_label(doc["algorithm"])).inc()
            try:
                await request.app[STORAGE].record_download(doc["id"], clock.now())
            except StorageError as e:
                # A lost count is not worth a failed download.
                metrics.STORAGE_ERRORS.labels("count_download").inc()
                log.warning("download of model %s not counted: %s", doc["id"], e)
        metrics.ACTIVE_DOWNLOADS.inc()
        try:
            yield
        except (StorageUnavailable, FileMissing, sendfile.FileGone) as e:
            # The response has already aborted the connection.
            metrics.STORAGE_ERRORS.labels("download").inc()
            log.error("download of model %s aborted mid-body: %s", doc["id"], e)
        finally:
            metrics.ACTIVE_DOWNLOADS.dec()
            metrics.DOWNLOAD_BYTES.inc(transfer.sent)
