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
from typing import Any, AsyncIterator, Callable

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from . import clock, errors
from .config import Settings, format_size
from .errors import ApiError
from .http.body import read_limited
from .storage.base import FileWriter, Storage, StoredFile

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
    return ApiError(errors.FILE_TOO_LARGE, f"file is larger than MAX_FILE_SIZE ({format_size(limit)}, {limit} bytes)")


def body_limit(request: web.Request, settings: Settings) -> int:
    multipart = request.content_type.startswith("multipart/")
    return settings.max_file_size + (settings.max_json_size + _BOUNDARY_ALLOWANCE if multipart else 0)


def check_declared_length(request: web.Request, settings: Settings) -> None:
    if request.content_length is not None and request.content_length > body_limit(request, settings):
        raise too_large(settings.max_file_size)


@contextmanager
def multipart_errors():
    """aiohttp's own parse errors in a multipart body become a clear 400."""
    try:
        yield
    except (ValueError, HttpProcessingError) as e:
        raise ApiError(errors.INVALID_MULTIPART, f"malformed multipart body: {e}") from None


def expected_checksum(request: web.Request) -> str | None:
    value = request.headers.get("X-Checksum-Sha256") or request.query.get("sha256")
    if value is None:
        return None
    m = _SHA256_RE.fullmatch(value.strip())
    if not m:
        raise ApiError(errors.INVALID_CHECKSUM, "X-Checksum-Sha256 / sha256 must be 64 hexadecimal characters")
    return m.group(1).lower()


def clean_filename(name: str | None) -> str | None:
    """A file name safe to store and to echo in Content-Disposition."""
    if name is None or name == "":
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ApiError(errors.INVALID_FILENAME, "filename must not contain control characters")
    # Keep only the last path component, whichever separator the client used.
    base = os.path.basename(name.replace("\\", "/"))
    if base in ("", ".", ".."):
        raise ApiError(errors.INVALID_FILENAME, f"filename {name[:100]!r} has no file name part")
    try:
        encoded = base.encode()
    except UnicodeEncodeError:
        # Undecodable bytes in a header arrive as lone surrogates.
        raise ApiError(errors.INVALID_FILENAME, "filename must be valid UTF-8") from None
    if len(encoded) > 255:
        raise ApiError(errors.INVALID_FILENAME, "filename must be at most 255 bytes")
    return base


def raw_body_filename(request: web.Request) -> str | None:
    name = request.query.get("filename")
    if name is None and "Content-Disposition" in request.headers:
        raw = request.headers["Content-Disposition"]
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in raw):
            raise ApiError(errors.INVALID_FILENAME, "Content-Disposition must not contain control characters")
        _, params = parse_content_disposition(raw)
        name = content_disposition_filename(params, "filename")
        if name is None and "filename" in raw.lower():
            # A filename was sent but cannot be read: say so, do not guess.
            raise ApiError(errors.INVALID_FILENAME, "Content-Disposition has a filename that cannot be parsed")
    return clean_filename(name)


async def body_pieces(request: web.Request) -> AsyncIterator[bytes]:
    """The raw body, each piece as aiohttp received it: iter_any() joins the pieces
    already buffered into a new bytes object, a copy of every byte at upload speed."""
    content = request.content
    # Not iter_chunks(): on an empty body (aiohttp's one shared EMPTY_PAYLOAD, whose
    # "end already reported" flag is process-wide) it never ends after the first time.
    while not content.at_eof():
        piece, _ = await content.readchunk()  # (b"", True) ends an HTTP chunk; b"" with False, the body
        if piece:
            yield piece


async def fill(writer: FileWriter, pieces: AsyncIterator[bytes], settings: Settings) -> None:
    """Write every piece; on return ``writer.sha256`` and ``writer.size`` cover them all."""
    async for piece in pieces:
        if writer.size + len(piece) > settings.max_file_size:
            raise too_large(settings.max_file_size)
        await writer.write(piece)
    await writer.flush()


async def finish(writer: FileWriter, sha256: str | None) -> StoredFile:
    if sha256 is not None and writer.sha256 != sha256:
        raise ApiError(errors.CHECKSUM_MISMATCH,
                       f"uploaded content has sha256 {writer.sha256}, not {sha256} as declared")
    return await writer.commit()


async def store_stream(
    storage: Storage, pieces: AsyncIterator[bytes], settings: Settings, sha256: str | None
) -> StoredFile:
    async with storage.file_writer(settings.gridfs_chunk_size) as writer:
        await fill(writer, pieces, settings)
        return await finish(writer, sha256)


# What may follow a multipart body's closing boundary (an epilogue) before the
# body is refused.
_MAX_EPILOGUE = 64 * 1024
# The API needs two parts (metadata and file); a few unknown ones are read past,
# more are refused: each costs parsing on the event loop, and 40,000 empty parts
# (2 MB) once held the loop for seconds.
MAX_PARTS = 4
# What may come before the first boundary (a preamble, which clients do not send).
_MAX_PREAMBLE = 1024


class _BoundedMultipartReader(MultipartReader):
    """aiohttp's reader, except that it refuses a long preamble.

    aiohttp skips the preamble line by line without limit: 2 MB of empty lines
    held the event loop for seconds, since lines already buffered are read
    without a pause.
    """

    async def _read_until_first_boundary(self) -> None:
        seen = 0
        while True:
            line = await self._readline()
            if line == b"":
                raise ValueError(f"could not find the starting boundary {self._boundary!r}")
            seen += len(line)
            line = line.rstrip()
            if line == self._boundary:
                return
            if line == self._boundary + b"--":
                self._at_eof = True
                return
            if seen > _MAX_PREAMBLE:
                raise ValueError(f"more than {_MAX_PREAMBLE} bytes before the first boundary")


async def receive_multipart(
    request: web.Request, storage: Storage, settings: Settings, sha256: str | None,
    parse_metadata: Callable[[bytes], Any] | None = None,
) -> tuple[Received | None, Any]:
    """Read a whole multipart body: the ``file`` part streamed into the store,
    the ``metadata`` part (when ``parse_metadata`` is given) parsed by it.

    The file is committed only after the closing boundary and the end of the
    body have arrived: a body cut short, or one promising more than it sends,
    never leaves a truncated file.
    """
    metadata = None
    async with storage.file_writer(settings.gridfs_chunk_size) as writer:
        file_part = None
        with multipart_errors():
            reader = _BoundedMultipartReader(request.headers, request.content,
                                             max_field_size=request.protocol.max_field_size,
                                             max_headers=request.protocol.max_headers)
            parts = 0
            async for part in reader:
                parts += 1
                if parts > MAX_PARTS:
                    raise ApiError(errors.TOO_MANY_PARTS,
                                   f"a multipart body may have at most {MAX_PARTS} parts ('metadata' and 'file')")
                if isinstance(part, MultipartReader):
                    raise ApiError(errors.INVALID_MULTIPART, "a part may not itself be a multipart body")
                if part.name == "file" and file_part is None:
                    file_part = (clean_filename(part.filename) or "",
                                 part.headers.get("Content-Type", "application/octet-stream"))
                    await fill(writer, part_pieces(part), settings)
                elif part.name == "metadata" and parse_metadata is not None and metadata is None:
                    metadata = parse_metadata(await read_limited(part.read_chunk, "metadata part",
                                                                 settings.max_json_size))
                else:
                    await part.release()
            if not reader.at_eof():
                raise ApiError(errors.INVALID_MULTIPART, "multipart body ended before its closing boundary")
            await read_limited(request.content.read, "data after the multipart body", _MAX_EPILOGUE)
        if parse_metadata is not None and metadata is None:
            raise ApiError(errors.MISSING_METADATA, "multipart registration needs a 'metadata' JSON part")
        if file_part is None:
            return None, metadata
        stored = await finish(writer, sha256)
    return Received(stored, *file_part), metadata


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
