"""Model files: upload, download (by id or by name), and file info."""

from __future__ import annotations

import math

import msgspec
from aiohttp import web

from .. import downloads, errors, metrics, registry, uploads, urls, validation
from ..appkeys import LEASES, SETTINGS, STORAGE, UPLOAD_SLOTS
from ..errors import ApiError
from ..http import preconditions
from ..http.expect import invite_body
from ..http.json import json_response, parse_json_object
from ..locks import KeyedLocks
from ..schemas import FileInfo, UploadAnswer
from ..views import LAST_MODIFIED_SHARED, file_metadata
from .models import created, model_or_404, named_models_or_404, with_caller


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


# Uploads to one model take turns swapping its file in: the swap returns the
# file it replaced, and that must be exact even on a database whose
# find-and-modify is not atomic (FerretDB, the test server).
_model_locks = KeyedLocks()


async def attach(request: web.Request, doc: dict, received: uploads.Received) -> dict:
    """Point the model at its new file, then release whatever file it had before."""
    storage = request.app[STORAGE]
    fm = uploads.file_metadata(received, doc.get("format"), f"{doc['name']}-{doc['version']}")
    try:
        async with _model_locks(doc["id"]):
            # Replacing a file within the second it was uploaded leaves two
            # contents with one Last-Modified: mark it, so an If-Range date
            # naming that second is not trusted (downloads.date_is_strong).
            current = (await storage.get_model(doc["id"]) or {}).get("file_metadata")
            if (current and current["checksum"] != fm["checksum"]
                    and preconditions.same_second(current["uploaded_at"], fm["uploaded_at"])):
                fm[LAST_MODIFIED_SHARED] = True
            previous = await storage.update_model(doc["id"], {"file_metadata": fm, "updated_at": fm["uploaded_at"]},
                                                  return_previous=True)
    except BaseException:
        # The model does not point at the new file: it must not outlive this request.
        await storage.settle_file(received.stored.file_id)
        await storage.release_file(received.stored.file_id)
        raise
    await storage.settle_file(received.stored.file_id)
    if previous is None:
        # The model was deleted while its file was uploading.
        await storage.release_file(received.stored.file_id)
        raise ApiError(errors.NOT_FOUND, f"no model with id {doc['id']}")
    old = previous.get("file_metadata")
    if old and old["file_id"] != fm["file_id"]:
        await request.app[LEASES].release(old["file_id"])
    return fm


def _upload_answer(model_id: str, fm: dict) -> web.Response:
    return json_response(UploadAnswer(success=True, model_id=model_id, file_metadata=file_metadata(fm)), status=201)


async def upload(request: web.Request) -> web.Response:
    doc = await model_or_404(request)
    received = await _receive(request)
    fm = await attach(request, doc, received)
    count_upload(doc, received)
    return _upload_answer(doc["id"], fm)


def count_upload(doc: dict, received: uploads.Received) -> None:
    metrics.UPLOADS.labels(metrics.algorithm_label(doc["algorithm"])).inc()
    metrics.UPLOAD_BYTES.inc(received.stored.size)


async def register_with_file(request: web.Request) -> web.Response:
    """POST /api/v1/models as multipart: a ``metadata`` JSON part and a ``file`` part.

    Either order works. The model is created only once both parts have
    arrived intact; if anything fails, the stored file is released again.
    """
    settings, storage = request.app[SETTINGS], request.app[STORAGE]
    uploads.check_declared_length(request, settings)
    sha256 = uploads.expected_checksum(request)
    async with request.app[UPLOAD_SLOTS].slot(request):
        await invite_body(request)
        received, fields = await uploads.receive_multipart(
            request, storage, settings, sha256,
            parse_metadata=lambda raw: with_caller(request, validation.registration(parse_json_object(raw))),
        )
    if received is None:
        raise ApiError(errors.MISSING_FILE, "multipart registration needs a 'file' part")
    try:
        fields["file_metadata"] = uploads.file_metadata(received, fields.get("format"), fields["name"])
        doc = await registry.create(storage, fields)
        count_upload(doc, received)
    except BaseException:
        await storage.settle_file(received.stored.file_id)
        await storage.release_file(received.stored.file_id)
        raise
    await storage.settle_file(received.stored.file_id)
    return created(doc)


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

