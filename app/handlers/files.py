"""Model files: upload, download (by id or by name), and file info."""

from __future__ import annotations

import math

import msgspec
from aiohttp import web

from .. import downloads, errors, registry, uploads, urls
from ..appkeys import LEASES, SETTINGS, STORAGE, UPLOAD_SLOTS
from ..errors import ApiError
from ..http.expect import invite_body
from ..http.json import json_response
from ..schemas import FileInfo, UploadAnswer
from ..views import file_metadata
from .common import model_or_404, named_models_or_404


async def _receive(request: web.Request) -> uploads.Received:
    """Stream the request's file (raw body or multipart ``file`` part) into the store."""
    settings = request.app[SETTINGS]
    uploads.check_declared_length(request, settings)
    sha256 = uploads.expected_checksum(request)
    # The body is invited (100 Continue) only once the upload has a slot.
    async with request.app[UPLOAD_SLOTS].slot(request):
        await invite_body(request)
        return await _store_body(request, sha256)


async def _store_body(request: web.Request, sha256: str | None) -> uploads.Received:
    settings, storage = request.app[SETTINGS], request.app[STORAGE]
    if request.content_type.startswith("multipart/"):
        received, _ = await uploads.receive_multipart(request, storage, settings, sha256)
        if received is None:
            raise ApiError(errors.MISSING_FILE, "multipart body has no 'file' part")
        return received
    filename = uploads.raw_body_filename(request)
    stored = await uploads.store_stream(storage, request.content.iter_any(), settings, sha256)
    content_type = request.headers.get("Content-Type") or "application/octet-stream"
    return uploads.Received(stored, filename or "", content_type)


async def upload(request: web.Request) -> web.Response:
    doc = await model_or_404(request)
    received = await _receive(request)
    fm = await registry.attach_file(request.app[STORAGE], request.app[LEASES], doc, received)
    return json_response(UploadAnswer(success=True, model_id=doc["id"], file_metadata=file_metadata(fm)), status=201)


async def download(request: web.Request) -> web.StreamResponse:
    return await downloads.send(request, await model_or_404(request))


async def download_by_name(request: web.Request) -> web.StreamResponse:
    return await downloads.send(request, *await named_models_or_404(request))


async def info(request: web.Request) -> web.Response:
    doc = await model_or_404(request)
    f = downloads.stored_file(doc)
    fm = doc["file_metadata"]
    return json_response(FileInfo(
        **msgspec.structs.asdict(file_metadata(fm)),
        model_id=doc["id"],
        chunk_count=math.ceil(f.size / f.chunk_size),
        download_url=urls.download_url(doc["id"]),
    ))

