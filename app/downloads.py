"""Sending a model file the way nginx sends a static file, plus checksum headers.

Ranges, conditional requests and HEAD follow RFC 9110. The body is streamed
from the storage reader through ``prefetch`` (the next chunk is read while the
previous one is written), so memory per download stays a few chunks whatever
the file size. If the store fails mid-body the connection is aborted: the
client sees fewer bytes than Content-Length promised, never a short response
that looks complete.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import socket
import struct
from contextlib import aclosing
from typing import Iterable
from urllib.parse import quote

from aiohttp import web

from . import clock, errors, metrics, views
from .appkeys import DOWNLOAD_SLOTS, LEASES, SETTINGS, STORAGE
from .errors import ApiError
from .http import preconditions, ranges, sendfile
from .http.json import error_response
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
    headers = file_headers(doc, f)
    etag = headers["ETag"]

    decided = preconditions.evaluate(request.headers, etag, f.uploaded_at)
    if decided == preconditions.NOT_MODIFIED:
        return web.Response(status=304, headers={k: headers[k] for k in NOT_MODIFIED_HEADERS})
    if decided == preconditions.PRECONDITION_FAILED:
        return error_response(errors.PRECONDITION_FAILED, "the file does not match the request's preconditions",
                              {"ETag": etag})

    wanted = None
    # Range is defined for GET only; HEAD answers as a GET without Range would.
    if request.method == "GET" and preconditions.if_range_allows(request.headers, etag, f.uploaded_at,
                                                                 date_is_strong(doc, others)):
        try:
            wanted = ranges.parse(request.headers.get("Range"), f.size)
        except ranges.Unsatisfiable as e:
            return error_response(errors.RANGE_NOT_SATISFIABLE, f"{e} (file size {f.size})",
                                  {"Content-Range": f"bytes */{f.size}", "Accept-Ranges": "bytes"})

    # The body as (preamble, offset, count) pieces of file, then a trailer.
    trailer = b""
    if wanted is None:
        status, parts = 200, [(b"", 0, f.size)]
    elif len(wanted) == 1:
        r = wanted[0]
        status, parts = 206, [(b"", r.start, r.length)]
        headers["Content-Range"] = r.content_range(f.size)
    else:
        boundary = secrets.token_hex(16)
        headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        status = 206
        parts = [(_part_header(boundary, r, f.size), r.start, r.length) for r in wanted]
        trailer = f"\r\n--{boundary}--\r\n".encode()
    length = sum(len(pre) + count for pre, _, count in parts) + len(trailer)

    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    if request.method == "HEAD":
        await response.prepare(request)
        return response

    # The lease first: a model deleted or replaced while this waits for a slot
    # keeps its file until this download has sent it.
    async with request.app[LEASES].reading(f.file_id), request.app[DOWNLOAD_SLOTS].slot():
        return await _stream(request, doc, f, response, parts, trailer, counted=wanted is None or any(
            r.start == 0 for r in wanted))


async def _stream(request, doc, f, response, parts, trailer, counted: bool) -> web.StreamResponse:
    storage = request.app[STORAGE]
    timeout = request.app[SETTINGS].download_timeout
    # A response that carries byte 0 is a download; later ranges resume one.
    if counted:
        metrics.DOWNLOADS.labels(metrics.algorithm_label(doc["algorithm"])).inc()
        try:
            await storage.record_download(doc["id"], clock.now())
        except StorageError as e:
            # A lost count is not worth a failed download.
            metrics.STORAGE_ERRORS.labels("count_download").inc()
            log.warning("download of model %s not counted: %s", doc["id"], e)

    writer = await response.prepare(request)
    metrics.ACTIVE_DOWNLOADS.inc()
    sent = 0
    path = storage.local_path(f) if sendfile.usable(request) else None
    try:
        for preamble, offset, count in parts:
            if preamble:
                await response.write(preamble)
            if not count:
                continue
            if path is not None:
                sent += await sendfile.send_range(request, writer, path, offset, count, timeout)
                continue
            pieces = storage.read_file(f, offset, count)
            if storage.read_ahead:
                pieces = prefetch(pieces, storage.read_ahead)
            # aclosing: whichever way the loop ends, the reader (and its
            # database cursor) is closed now, not when collected.
            async with aclosing(pieces):
                async for piece in pieces:
                    # A client that stops reading holds a cursor: give up
                    # on it after DOWNLOAD_TIMEOUT without progress.
                    async with asyncio.timeout(timeout):
                        await response.write(piece)
                    sent += len(piece)
        if trailer:
            await response.write(trailer)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError) as e:
        # The client went away; the reader is already closed.
        log.debug("client left download of %s: %s", doc["id"], e)
    except TimeoutError:
        log.info("download of model %s dropped: client made no progress for %g s", doc["id"], timeout)
        _reset(request)
    except (StorageUnavailable, FileMissing, sendfile.FileGone) as e:
        metrics.STORAGE_ERRORS.labels("download").inc()
        log.error("download of model %s aborted mid-body: %s", doc["id"], e)
        # Abort, not close: the client must see a truncated body, not a complete one.
        if request.transport is not None:
            request.transport.abort()
    finally:
        metrics.ACTIVE_DOWNLOADS.dec()
        metrics.DOWNLOAD_BYTES.inc(sent)
    return response


def _reset(request: web.Request) -> None:
    """Drop the connection with an RST, as nginx's ``reset_timedout_connection``.

    A plain close leaves the kernel delivering the megabytes already queued for
    the socket to a client that stopped reading, at its pace, for minutes.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone
    transport.abort()


def _part_header(boundary: str, r: ranges.ByteRange, size: int) -> bytes:
    return (f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: {r.content_range(size)}\r\n\r\n").encode()
