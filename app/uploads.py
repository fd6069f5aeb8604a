"""Receiving a model file: streamed into the store while counting and hashing.

The body is never held in memory: each piece the network delivers goes to the
storage writer, which keeps at most a batch of chunks. The size limit is
checked from Content-Length before reading and again on every piece (chunked
bodies have no length). Any failure on the way (too large, checksum mismatch,
client gone, database lost) leaves the writer's ``async with`` through an
exception, which cancels it: no file, no chunks, no temp file.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from . import clock
from .config import Settings, format_size
from .http import ApiError, error_response
from .storage.base import Storage, StoredFile

# Multipart bodies carry boundaries (and, at registration, a metadata part of
# up to MAX_JSON_SIZE) besides the file.
_BOUNDARY_ALLOWANCE = 64 * 1024
_SHA256_RE = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")
_PIECE = 1024 * 1024


@dataclass(frozen=True)
class Received:
    stored: StoredFile
    filename: str
    content_type: str


def too_large(limit: int) -> ApiError:
    return ApiError(413, "file_too_large", f"file is larger than MAX_FILE_SIZE ({format_size(limit)}, {limit} bytes)")


def body_limit(request: web.Request, settings: Settings) -> int:
    multipart = request.content_type.startswith("multipart/")
    return settings.max_file_size + (settings.max_json_size + _BOUNDARY_ALLOWANCE if multipart else 0)


def check_declared_length(request: web.Request, settings: Settings) -> None:
    if request.content_length is not None and request.content_length > body_limit(request, settings):
        raise too_large(settings.max_file_size)


def expect_handler(settings: Settings):
    """Answer ``Expect: 100-continue`` with 413 when the declared body is too large.

    curl sends that header with large uploads and waits: refusing here spares
    the client sending hundreds of MB only to have them thrown away.
    """

    async def handler(request: web.Request):
        if request.version < (1, 1) or request.headers.get("Expect", "").lower() != "100-continue":
            return None
        try:
            check_declared_length(request, settings)
        except ApiError as e:
            # Middlewares do not run on this path, so build the error body here.
            return error_response(e.status, e.code, e.message, {"Connection": "close"})
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    return handler


@contextmanager
def multipart_errors():
    """aiohttp's own parse errors in a multipart body become a clear 400."""
    try:
        yield
    except (ValueError, HttpProcessingError) as e:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {e}") from None


def expected_checksum(request: web.Request) -> str | None:
    value = request.headers.get("X-Checksum-Sha256") or request.query.get("sha256")
    if value is None:
        return None
    m = _SHA256_RE.fullmatch(value.strip())
    if not m:
        raise ApiError(400, "invalid_checksum", "X-Checksum-Sha256 / sha256 must be 64 hexadecimal characters")
    return m.group(1).lower()


def clean_filename(name: str | None) -> str | None:
    """A file name safe to store and to echo in Content-Disposition."""
    if name is None or name == "":
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ApiError(400, "invalid_filename", "filename must not contain control characters")
    # Keep only the last path component, whichever separator the client used.
    base = os.path.basename(name.replace("\\", "/"))
    if base in ("", ".", ".."):
        raise ApiError(400, "invalid_filename", f"filename {name[:100]!r} has no file name part")
    if len(base.encode()) > 255:
        raise ApiError(400, "invalid_filename", "filename must be at most 255 bytes")
    return base


def raw_body_filename(request: web.Request) -> str | None:
    name = request.query.get("filename")
    if name is None and "Content-Disposition" in request.headers:
        _, params = parse_content_disposition(request.headers["Content-Disposition"])
        name = content_disposition_filename(params, "filename")
    return clean_filename(name)


async def store_stream(
    storage: Storage, pieces: AsyncIterator[bytes], settings: Settings, sha256: str | None
) -> StoredFile:
    max_file_size = settings.max_file_size
    async with storage.file_writer(settings.gridfs_chunk_size) as writer:
        async for piece in pieces:
            if writer.size + len(piece) > max_file_size:
                raise too_large(max_file_size)
            await writer.write(piece)
        if sha256 is not None and writer.sha256 != sha256:
            raise ApiError(422, "checksum_mismatch",
                           f"uploaded content has sha256 {writer.sha256}, not {sha256} as declared")
        return await writer.commit()


async def receive_part(part: BodyPartReader, storage: Storage, settings: Settings, sha256: str | None) -> Received:
    """Store a multipart ``file`` part."""
    filename = clean_filename(part.filename)
    content_type = part.headers.get("Content-Type", "application/octet-stream")
    stored = await store_stream(storage, part_pieces(part), settings, sha256)
    return Received(stored, filename or "", content_type)


async def part_pieces(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        piece = await part.read_chunk(_PIECE)
        if not piece:
            return
        yield piece


def file_metadata(received: Received, format_hint: str | None, default_name: str) -> dict:
    """The model's file_metadata; format is the model's, else the file name's extension."""
    stored = received.stored
    ext = os.path.splitext(received.filename)[1].lstrip(".").lower()
    return {
        "file_id": stored.file_id,
        "filename": received.filename or default_name,
        "size_bytes": stored.size,
        "checksum": f"sha256:{stored.sha256}",
        "format": format_hint or ext or None,
        "content_type": received.content_type,
        "chunk_size": stored.chunk_size,
        "uploaded_at": clock.now(),
    }
