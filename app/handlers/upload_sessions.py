"""Resumable upload sessions under /api/v1/uploads: parse, call app.upload_sessions, render."""

from __future__ import annotations

import msgspec
from aiohttp import web

from .. import auth, clock, errors, upload_sessions, uploads, urls
from ..appkeys import SETTINGS, STORAGE, UPLOAD_SLOTS
from ..errors import ApiError
from ..http.expect import invite_body
from ..http.json import json_response, parse_json_object
from ..json_bodies import read_json_bytes
from ..schemas import BlobAnswer, UploadSessionAnswer, UploadSessionRequest
from ..storage.base import StoredFile, UploadSession

_FIELDS = {"size_bytes", "checksum"}


def _owner(request: web.Request) -> str:
    return upload_sessions.owner_of(auth.identity(request))


def _session_id(request: web.Request) -> str:
    return request.match_info["upload_id"]


def _answer(request: web.Request, session: UploadSession, status: int) -> web.Response:
    body = UploadSessionAnswer(
        id=session.id, offset=session.offset, size_bytes=session.size_bytes,
        checksum=f"sha256:{session.checksum}" if session.checksum else None,
        expires_at=clock.iso(upload_sessions.expires_at(session, request.app[SETTINGS])))
    return json_response(body, status=status, headers=upload_sessions.range_header(session))


def _blob_answer(stored: StoredFile) -> web.Response:
    return json_response(BlobAnswer(digest=f"sha256:{stored.sha256}", size_bytes=stored.size), status=201,
                         headers={"Location": urls.blob_url(stored.sha256)})


async def _request_body(request: web.Request) -> UploadSessionRequest:
    raw = await read_json_bytes(request, request.app[SETTINGS].max_json_size)
    if not raw.strip():
        return UploadSessionRequest()
    body = parse_json_object(raw)
    unknown = set(body) - _FIELDS
    if unknown:
        raise ApiError(errors.UNKNOWN_FIELD,
                       f"{sorted(unknown)[0]}: unknown field (allowed: {', '.join(sorted(_FIELDS))})")
    try:
        return msgspec.convert(body, UploadSessionRequest)
    except msgspec.ValidationError as e:
        field = "checksum" if "checksum" in str(e) else "size_bytes"
        rule = ("must be sha256: followed by 64 lowercase hexadecimal characters" if field == "checksum"
                else "must be a whole number of bytes, 0 or more")
        raise ApiError(errors.VALIDATION_ERROR, f"{field}: {rule}") from None


async def open_session(request: web.Request) -> web.Response:
    """POST /api/v1/uploads: 202 a new session, or 201 when ``checksum`` names a stored blob."""
    body = await _request_body(request)
    opened = await upload_sessions.open_session(request.app[STORAGE], request.app[SETTINGS], _owner(request),
                                                body.size_bytes, body.checksum)
    if isinstance(opened, StoredFile):
        return _blob_answer(opened)
    return _answer(request, opened, 202)


def _chunk(request: web.Request) -> upload_sessions.Chunk:
    return upload_sessions.chunk_of(request.headers.get("Content-Range"), request.content_length,
                                    request.headers.get("Content-Digest"), request.app[SETTINGS])


async def append(request: web.Request) -> web.Response:
    """PATCH /api/v1/uploads/<id>: one chunk at the session's offset."""
    settings = request.app[SETTINGS]
    chunk = _chunk(request)
    if not request.body_exists:
        raise ApiError(errors.INVALID_CONTENT_RANGE, "the chunk is empty; nothing changed")
    async with request.app[UPLOAD_SLOTS].slot(request):
        session = await upload_sessions.append(
            request.app[STORAGE], settings, _owner(request), _session_id(request), chunk,
            uploads.body_pieces(request), lambda: invite_body(request))
    return _answer(request, session, 202)


async def status(request: web.Request) -> web.Response:
    """GET / HEAD /api/v1/uploads/<id>: the offset (to resume from)."""
    session = await upload_sessions.find(request.app[STORAGE], request.app[SETTINGS], _owner(request),
                                         _session_id(request))
    return _answer(request, session, 200)


async def complete(request: web.Request) -> web.Response:
    """PUT /api/v1/uploads/<id>?digest=sha256:<hex>: the last chunk (optional), then the blob."""
    settings = request.app[SETTINGS]
    sha256 = upload_sessions.digest_param(request.query.get("digest"))
    chunk = _chunk(request) if request.body_exists or "Content-Range" in request.headers else None
    async with request.app[UPLOAD_SLOTS].slot(request):
        stored = await upload_sessions.complete(
            request.app[STORAGE], settings, _owner(request), _session_id(request), sha256, chunk,
            uploads.body_pieces(request), lambda: invite_body(request))
    return _blob_answer(stored)


async def cancel(request: web.Request) -> web.Response:
    """DELETE /api/v1/uploads/<id>: the session and its bytes go."""
    await upload_sessions.cancel(request.app[STORAGE], request.app[SETTINGS], _owner(request), _session_id(request))
    return web.Response(status=204)
