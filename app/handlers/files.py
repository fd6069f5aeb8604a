"""Model files: upload, download (by id or by name), file info, and a version's files (manifest, one file)."""

from __future__ import annotations

import math
from urllib.parse import unquote_to_bytes

import msgspec
from aiohttp import web

from .. import downloads, errors, registry, snapshots, upload_sessions, uploads, urls
from ..appkeys import LEASES, SETTINGS, STORAGE, UPLOAD_SLOTS
from ..errors import ApiError
from ..http import preconditions
from ..http.expect import invite_body
from ..http.json import json_response
from ..render import file_metadata, files
from ..schemas import FileInfo, SnapshotManifest, UploadAnswer
from ..storage.base import ModelDocument
from .common import model_alone_or_404, model_or_404, named_models_or_404


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
    stored = await uploads.store_stream(storage, uploads.body_pieces(request), settings, sha256)
    content_type = request.headers.get("Content-Type") or "application/octet-stream"
    return uploads.Received(stored, filename or "", content_type)


async def upload(request: web.Request) -> web.Response:
    doc = await model_or_404(request)
    if "digest" in request.query:
        fm = await _attach_blob(request, doc)
    else:
        received = await _receive(request)
        fm = await registry.attach_file(request.app[STORAGE], doc, received, request.app[LEASES])
    return json_response(UploadAnswer(success=True, model_id=doc["id"], file_metadata=file_metadata(fm)), status=201)


async def _attach_blob(request: web.Request, doc: ModelDocument):
    """?digest=sha256:<hex> with no body: the model's file is that stored blob (an upload session's result)."""
    sha256 = upload_sessions.digest_param(request.query["digest"])
    if request.body_exists:
        raise ApiError(errors.INVALID_PARAMETER, "?digest= attaches a stored blob: send no body with it")
    filename = uploads.clean_filename(request.query.get("filename"))
    return await registry.attach_blob(request.app[STORAGE], doc, sha256, filename, request.app[LEASES])


async def download(request: web.Request) -> web.StreamResponse:
    return await downloads.send(request, lambda: model_alone_or_404(request))


async def download_by_name(request: web.Request) -> web.StreamResponse:
    return await downloads.send(request, lambda: named_models_or_404(request))


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


def _manifest(request: web.Request, doc: ModelDocument) -> web.Response:
    found = snapshots.entries(doc)
    if not found:
        raise ApiError(errors.NO_FILE, f"model {doc['id']} has no file uploaded yet")
    etag = downloads.snapshot_etag(doc)
    # no-cache: reuse only after revalidating; a warm cache does that with one 304.
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Model-Id": doc["id"], "X-Model-Name": doc["name"],
               "X-Model-Version": doc["version"]}
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and preconditions.weak_match(if_none_match, etag):
        return web.Response(status=304, headers=headers)
    return json_response(SnapshotManifest(
        id=doc["id"], name=doc["name"], version=doc["version"], files=files(found),
        snapshot_digest=snapshots.digest_of(doc), total_size_bytes=snapshots.total_size(doc)), headers=headers)


async def _counted_manifest(request: web.Request, doc: ModelDocument) -> web.Response:
    response = _manifest(request, doc)
    # A pull starts with the manifest: that is the snapshot's one download
    # (README); the files it then reads are not counted again.
    if request.method == "GET" and response.status == 200:
        await downloads.count_download(request, doc)
    return response


async def manifest(request: web.Request) -> web.Response:
    return await _counted_manifest(request, await model_or_404(request))


async def manifest_by_name(request: web.Request) -> web.Response:
    doc, _ = await named_models_or_404(request)
    return await _counted_manifest(request, doc)


def requested_path(request: web.Request) -> str:
    """The file path a ``.../files/{path}`` URL names.

    Decoded from the raw URL one segment at a time, strictly: an encoded
    "/" (%2F) is part of a segment, not a separator, and no path component
    can hold one; percent-encoding that is not UTF-8 is refused (the router's
    own decoding would keep it as text and look for a file named "%ff").
    The path rules are downloads.send_file's to apply.
    """
    template = request.match_info.route.resource.canonical.split("/")
    decoded = []
    for segment in request.rel_url.raw_path.split("/")[template.index("{path}"):]:
        try:
            part = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(errors.INVALID_PATH,
                           f'path segment "{segment}": percent-encoding that is not UTF-8') from None
        if "/" in part:
            raise ApiError(errors.INVALID_PATH,
                           f'path segment "{segment}": an encoded "/" (%2F) cannot be part of a file name')
        decoded.append(part)
    return "/".join(decoded)


async def version_file(request: web.Request) -> web.StreamResponse:
    path = requested_path(request)
    return await downloads.send_file(request, lambda: model_alone_or_404(request), path)


async def version_file_by_name(request: web.Request) -> web.StreamResponse:
    path = requested_path(request)
    return await downloads.send_file(request, lambda: named_models_or_404(request), path)
