"""Resumable upload sessions (POST/PATCH/GET/PUT/DELETE /api/v1/uploads): the protocol.

Follows the OCI distribution spec's blob uploads: a session is opened, chunks
are appended at its offset, and completing it with the content's digest
stores the content as a blob, exactly as PUT /api/v1/blobs does
(registry.store_blob). The session lives in the store (Storage.open_session,
SessionWriter), so a restart or another replica continues it.

A chunk counts only whole: its bytes become durable and the offset moves in
the writer's checkpoint, after every check passed (Content-Range, size,
Content-Digest). A request that fails, or whose client leaves mid-body, leaves
the offset where it was and its bytes are discarded.

The handlers (app/handlers/upload_sessions.py) parse the request, call these
and render what they return.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import AsyncIterator, Awaitable, Callable

import http_sf
from bson import ObjectId

from . import clock, errors, registry, urls
from .config import Settings
from .errors import ApiError
from .metrics import UPLOAD_SESSION_BYTES
from .storage.base import SessionBusy, SessionMissing, SessionWriter, Storage, StoredFile, UploadSession
from .uploads import too_large

_SESSION_ID_RE = re.compile(r"[0-9a-f]{24}")
# RFC 9110's Content-Range, and OCI's bare "<start>-<end>". At most 18 digits: any
# larger number is beyond every MAX_FILE_SIZE and stays a plain int compare.
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)|([0-9]{1,18})-([0-9]{1,18})")
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_DIGEST_RULE = "must be sha256: followed by 64 lowercase hexadecimal characters"
# A full cap frees up when a session completes, is cancelled or expires; soon, for most.
_CAP_RETRY_AFTER = "60"


@dataclass(frozen=True)
class Chunk:
    """What a PATCH (or a completing PUT) says about the bytes it carries."""

    start: int | None  # None: at the session's offset (no Content-Range: an OCI "streamed" chunk)
    length: int | None  # bytes promised (Content-Range, else Content-Length); None: a chunked body
    total: int | None  # Content-Range's complete length, when numeric
    sha256: bytes | None  # Content-Digest's sha-256, verified before the chunk counts


def not_found(session_id: str) -> ApiError:
    return ApiError(errors.UPLOAD_NOT_FOUND, f"no upload session {session_id[:80]!r}")


def invalid_range(message: str) -> ApiError:
    return ApiError(errors.INVALID_CONTENT_RANGE, f"{message}; nothing changed")


def digest_param(value: str | None) -> str:
    """?digest=sha256:<hex> as hex; 400 invalid_digest when missing or malformed."""
    m = _DIGEST_RE.fullmatch(value or "")
    if m is None:
        raise ApiError(errors.INVALID_DIGEST, f"?digest= {_DIGEST_RULE}, got {(value or '')[:80]!r}")
    return m.group(1)


def content_digest(header: str | None) -> bytes | None:
    """The sha-256 of a Content-Digest (RFC 9530, a structured dictionary); other algorithms are ignored."""
    if header is None:
        return None
    try:
        members = http_sf.parse(header.encode("ascii"), tltype="dictionary")
    except (UnicodeEncodeError, ValueError, http_sf.StructuredFieldError) as e:
        raise ApiError(errors.INVALID_DIGEST, f"Content-Digest is not a structured dictionary: {e}") from None
    member = members.get("sha-256")
    if member is None:
        return None
    value = member[0]
    if not isinstance(value, bytes) or len(value) != 32:
        raise ApiError(errors.INVALID_DIGEST, "Content-Digest: sha-256 must be a byte sequence of 32 bytes "
                                              "(sha-256=:<base64>:)")
    return value


def chunk_of(content_range: str | None, content_length: int | None, content_digest_header: str | None,
             settings: Settings) -> Chunk:
    """The chunk a request's headers describe; 400 invalid_content_range, 413 beyond MAX_FILE_SIZE."""
    sha256 = content_digest(content_digest_header)
    if content_length is not None and content_length > settings.max_file_size:
        raise too_large(settings.max_file_size)
    if content_range is None:
        return Chunk(None, content_length, None, sha256)
    m = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
    if m is None:
        raise invalid_range(f"Content-Range must be 'bytes <start>-<end>/<total or *>' or '<start>-<end>', "
                            f"got {content_range[:80]!r}")
    start, end = int(m[1] or m[4]), int(m[2] or m[5])
    total = int(m[3]) if m[3] not in (None, "*") else None
    if end < start:
        raise invalid_range(f"Content-Range ends ({end}) before it starts ({start})")
    length = end - start + 1
    if content_length is not None and content_length != length:
        raise invalid_range(f"Content-Length {content_length} is not the {length} bytes of Content-Range "
                            f"{start}-{end}")
    if total is not None and end >= total:
        raise invalid_range(f"Content-Range {start}-{end} goes past its total {total}")
    if end + 1 > settings.max_file_size:
        raise too_large(settings.max_file_size)
    return Chunk(start, length, total, sha256)


def owner_of(identity: object | None) -> str:
    """Who a session belongs to: the API key's sha256 hex, "" when auth is off."""
    return identity.digest.hex() if identity is not None else ""


def expires_at(session: UploadSession, settings: Settings) -> datetime:
    return session.updated_at + settings.upload_session_ttl


def range_header(session: UploadSession) -> dict[str, str]:
    """Location, and Range: 0-<offset-1> (OCI's form) once there are bytes."""
    headers = {"Location": urls.upload_url(session.id)}
    if session.offset:
        headers["Range"] = f"0-{session.offset - 1}"
    return headers


async def open_session(storage: Storage, settings: Settings, owner: str, size_bytes: int | None,
                       checksum: str | None) -> UploadSession | StoredFile:
    """A new session; or, when ``checksum`` names a stored blob (of ``size_bytes``, if given), that blob."""
    if size_bytes is not None and size_bytes > settings.max_file_size:
        raise too_large(settings.max_file_size)
    sha256 = checksum.removeprefix("sha256:") if checksum else None
    if sha256 is not None:
        blob = await registry.keep_blob(storage, sha256, settings.blob_grace)
        if blob is not None and size_bytes in (None, blob.size):
            return blob
    at = clock.now()
    # Counted, then inserted: replicas racing can pass a cap by the POSTs in flight (README).
    mine, everyone = await storage.count_sessions(owner, at - settings.upload_session_ttl)
    if mine >= settings.max_upload_sessions:
        raise ApiError(errors.TOO_MANY_UPLOAD_SESSIONS,
                       f"this API key has {mine} open upload sessions (MAX_UPLOAD_SESSIONS "
                       f"{settings.max_upload_sessions}); complete or DELETE one first",
                       {"Retry-After": _CAP_RETRY_AFTER})
    if everyone >= settings.max_upload_sessions_total:
        raise ApiError(errors.UPLOAD_SESSIONS_FULL,
                       f"{everyone} upload sessions are open (MAX_UPLOAD_SESSIONS_TOTAL "
                       f"{settings.max_upload_sessions_total}); retry later", {"Retry-After": _CAP_RETRY_AFTER})
    session = UploadSession(str(ObjectId()), owner, 0, size_bytes, sha256, settings.gridfs_chunk_size, at, at)
    await storage.open_session(session)
    return session


async def find(storage: Storage, settings: Settings, owner: str, session_id: str) -> UploadSession:
    """The caller's live session; 404 upload_not_found alike for malformed, unknown, expired and another key's."""
    session = await storage.get_session(session_id) if _SESSION_ID_RE.fullmatch(session_id) else None
    if session is None or session.owner != owner or expires_at(session, settings) <= clock.now():
        raise not_found(session_id)
    return session


@asynccontextmanager
async def _writing(storage: Storage, session_id: str) -> AsyncIterator[SessionWriter]:
    """The session's writer, its lock taken: 409 upload_busy while another request holds it."""
    try:
        async with storage.session_writer(session_id) as writer:
            yield writer
    except SessionBusy:
        raise ApiError(errors.UPLOAD_BUSY, f"another request is writing upload session {session_id}; retry",
                       {"Retry-After": "1"}) from None
    except SessionMissing:
        raise not_found(session_id) from None


async def _receive(writer: SessionWriter, chunk: Chunk, pieces: AsyncIterator[bytes], settings: Settings,
                   invite: Callable[[], Awaitable[None]]) -> int:
    """Append the chunk's bytes after checking where it goes; how many. Raising discards them."""
    session = writer.session
    start = session.offset if chunk.start is None else chunk.start
    if start != session.offset:
        raise ApiError(errors.UPLOAD_OFFSET_MISMATCH,
                       f"the chunk starts at {start}, the session's offset is {session.offset}; nothing changed",
                       range_header(session), {"offset": session.offset})
    size = session.size_bytes
    if chunk.total is not None and size is not None and chunk.total != size:
        raise invalid_range(f"Content-Range's total {chunk.total} is not the {size} bytes announced")
    if chunk.length is not None:
        if start + chunk.length > settings.max_file_size:
            raise too_large(settings.max_file_size)
        if size is not None and start + chunk.length > size:
            raise invalid_range(f"the chunk ends at {start + chunk.length}, past the {size} bytes announced")
    await invite()
    end = start + chunk.length if chunk.length is not None else None
    running = hashlib.sha256() if chunk.sha256 is not None else None
    if running is not None:
        writer.hash_also(running)  # in a thread, beside the content's own sha256
    async for piece in pieces:
        reach = writer.size + len(piece)
        if end is not None and reach > end:
            raise invalid_range(f"the body goes past the {chunk.length} bytes of its Content-Range")
        if reach > settings.max_file_size:
            raise too_large(settings.max_file_size)
        if size is not None and reach > size:
            raise invalid_range(f"the body goes past the {size} bytes announced")
        await writer.write(piece)
    await writer.flush()  # writer.sha256 and running cover every piece
    got = writer.size - start
    if end is not None and got != chunk.length:
        raise invalid_range(f"the body has {got} bytes, not the {chunk.length} of its Content-Range")
    if running is not None and running.digest() != chunk.sha256:
        raise ApiError(errors.DIGEST_MISMATCH,
                       f"the chunk's {got} bytes do not match its Content-Digest; the offset stays {start}")
    return got


async def append(storage: Storage, settings: Settings, owner: str, session_id: str, chunk: Chunk,
                 pieces: AsyncIterator[bytes], invite: Callable[[], Awaitable[None]]) -> UploadSession:
    """PATCH: one chunk at the offset; the session after it."""
    await find(storage, settings, owner, session_id)
    async with _writing(storage, session_id) as writer:
        got = await _receive(writer, chunk, pieces, settings, invite)
        if got == 0:
            raise invalid_range("the chunk is empty")
        session = await writer.checkpoint()
    UPLOAD_SESSION_BYTES.inc(got)
    return session


async def complete(storage: Storage, settings: Settings, owner: str, session_id: str, sha256: str,
                   chunk: Chunk | None, pieces: AsyncIterator[bytes],
                   invite: Callable[[], Awaitable[None]]) -> StoredFile:
    """PUT ?digest=: the last chunk, if any, then the whole content becomes the blob sha256:<hex>.

    Content that is not the size or digest announced leaves the session as it
    is (with this request's chunk, if that chunk passed its own checks).
    """
    await find(storage, settings, owner, session_id)
    async with _writing(storage, session_id) as writer:
        got = await _receive(writer, chunk, pieces, settings, invite) if chunk is not None else 0
        session = writer.session
        problem = None
        if session.size_bytes is not None and writer.size != session.size_bytes:
            problem = ApiError(errors.SIZE_MISMATCH, f"the content has {writer.size} bytes, not the "
                                                     f"{session.size_bytes} announced; the session stays")
        elif writer.sha256 != sha256:
            problem = ApiError(errors.DIGEST_MISMATCH, f"the content ({writer.size} bytes) has "
                                                       f"sha256:{writer.sha256}, not sha256:{sha256} as ?digest= "
                                                       "says; the session stays")
        elif session.checksum is not None and session.checksum != sha256:
            problem = ApiError(errors.DIGEST_MISMATCH, f"?digest= sha256:{sha256} is not the checksum "
                                                       f"sha256:{session.checksum} announced; the session stays")
        if problem is not None:
            if got:
                await writer.checkpoint()
                UPLOAD_SESSION_BYTES.inc(got)
            raise problem
        stored = await registry.store_blob(storage, writer, sha256, settings.blob_grace)
    UPLOAD_SESSION_BYTES.inc(got)
    return stored


async def cancel(storage: Storage, settings: Settings, owner: str, session_id: str) -> None:
    """DELETE: the session and its bytes go."""
    await find(storage, settings, owner, session_id)
    try:
        deleted = await storage.delete_session(session_id)
    except SessionBusy:
        raise ApiError(errors.UPLOAD_BUSY, f"another request is writing upload session {session_id}; retry",
                       {"Retry-After": "1"}) from None
    if not deleted:
        raise not_found(session_id)


async def remove_expired(storage: Storage, ttl: timedelta, dry_run: bool) -> list[str]:
    """`model-service gc`: sessions idle for UPLOAD_SESSION_TTL and their bytes; one line each."""
    lines = []
    for session in await storage.sessions_updated_before(clock.now() - ttl):
        try:
            if not dry_run and not await storage.delete_session(session.id):
                continue
        except SessionBusy:
            continue  # written to right now: not idle after all
        lines.append(f"upload session {session.id} {session.offset} bytes (idle since {clock.iso(session.updated_at)})")
    return lines
