"""Blobs: content stored by its sha256, before a snapshot's commit refers to it.

A client hashes its files, asks which blobs are missing, PUTs only those, then
commits the version (POST /api/v1/models with "files"). A blob no version
refers to is kept for BLOB_GRACE from when it was last stored or asked about
(so a commit that follows finds it), then ``model-service gc`` removes it.
"""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

from .. import clock, errors, registry, uploads
from ..appkeys import SETTINGS, STORAGE, UPLOAD_SLOTS
from ..errors import ApiError
from ..http.expect import invite_body
from ..http.json import json_response
from ..json_bodies import read_json_object
from ..schemas import MAX_BLOB_DIGESTS, BlobAnswer, BlobsMissingAnswer, BlobsMissingRequest

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_DIGEST_RULE = "must be sha256: followed by 64 lowercase hexadecimal characters"


def _digest(request: web.Request) -> str:
    """The {digest} of the URL as hex; 400 invalid_digest otherwise."""
    raw = request.match_info["digest"]
    m = _DIGEST_RE.fullmatch(raw)
    if m is None:
        raise ApiError(errors.INVALID_DIGEST, f"blob digest {_DIGEST_RULE}, got {raw[:80]!r}")
    return m.group(1)


async def missing(request: web.Request) -> web.Response:
    """POST /api/v1/blobs/missing: which of these digests are not stored (each once, in request order)."""
    body = await read_json_object(request)
    unknown = set(body) - {"digests"}
    if unknown:
        raise ApiError(errors.UNKNOWN_FIELD, f"{sorted(unknown)[0]}: unknown field (allowed: digests)")
    try:
        wanted = list(dict.fromkeys(msgspec.convert(body, BlobsMissingRequest).digests))
    except msgspec.ValidationError as e:
        where = re.search(r"`\$\.digests(\[\d+\])?`", str(e))
        if "digests" not in body:
            raise ApiError(errors.VALIDATION_ERROR, "digests: is required") from None
        if where and where.group(1):
            raise ApiError(errors.VALIDATION_ERROR, f"digests{where.group(1)}: {_DIGEST_RULE}") from None
        raise ApiError(errors.VALIDATION_ERROR,
                       f"digests: must be a list of 1 to {MAX_BLOB_DIGESTS} digests") from None
    settings = request.app[SETTINGS]
    # Those present are kept for BLOB_GRACE: the commit this answer leads to will find them.
    present = await request.app[STORAGE].keep_blobs([d[7:] for d in wanted], clock.now() + settings.blob_grace)
    return json_response(BlobsMissingAnswer(missing=[d for d in wanted if d[7:] not in present]))


async def put_blob(request: web.Request) -> web.Response:
    """PUT /api/v1/blobs/sha256:<hex>: 201 stored, 200 already stored (body unread), 422 digest_mismatch."""
    sha256 = _digest(request)
    settings, storage = request.app[SETTINGS], request.app[STORAGE]
    known = await registry.keep_blob(storage, sha256, settings.blob_grace)
    if known is not None:
        response = json_response(BlobAnswer(digest=f"sha256:{sha256}", size_bytes=known.size))
        if request.body_exists:
            # Its body was not read, nor invited (Expect: 100-continue): this
            # connection cannot carry another request after it.
            response.force_close()
        return response
    uploads.check_declared_length(request, settings)
    async with request.app[UPLOAD_SLOTS].slot(request):
        await invite_body(request)
        # Leaving the writer's block other than by its commit discards what it wrote.
        async with storage.file_writer(settings.gridfs_chunk_size) as writer:
            await uploads.fill(writer, uploads.body_pieces(request), settings)
            stored = await registry.store_blob(storage, writer, sha256, settings.blob_grace)
    return json_response(BlobAnswer(digest=f"sha256:{sha256}", size_bytes=stored.size), status=201)


async def head_blob(request: web.Request) -> web.Response:
    """HEAD /api/v1/blobs/sha256:<hex>: 200 with the blob's Content-Length, or 404."""
    sha256 = _digest(request)
    blob = await request.app[STORAGE].find_blob(sha256)
    if blob is None:
        raise ApiError(errors.NOT_FOUND, f"no blob sha256:{sha256}")
    return web.Response(status=200, headers={"Content-Length": str(blob.size), "ETag": f'"{sha256}"',
                                             "Content-Type": "application/octet-stream"})
