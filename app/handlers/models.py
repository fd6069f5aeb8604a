"""The registry API under /api/v1/models: register, list, read, update, delete, versions."""

from __future__ import annotations

import math

from aiohttp import web

from .. import errors, registry, render, snapshots, uploads, validation
from ..appkeys import COUNTS, LEASES, READ_CACHE, SETTINGS, STORAGE, UPLOAD_SLOTS
from ..errors import ApiError
from ..http.expect import invite_body
from ..http.json import conditional_json, encoded, json_body_response, json_response, parse_json_object, tagged
from ..json_bodies import read_json_bytes, read_json_object
from ..schemas import DeleteAnswer, ModelList, Pagination, UpdateAnswer, VersionList
from .common import created, model_or_404, named_model_or_404, named_target, not_found, request_model_id, with_caller


async def _read_model_body(request: web.Request) -> dict:
    """A registration or new-version body: at most MAX_JSON_SIZE, plus room for a commit's list of files."""
    settings = request.app[SETTINGS]
    allowance = settings.max_files_per_version * snapshots.BODY_ALLOWANCE_PER_FILE
    raw = await read_json_bytes(request, settings.max_json_size + allowance)
    body = parse_json_object(raw)
    if len(raw) > settings.max_json_size and not isinstance(body.get("files"), list):
        raise ApiError(errors.PAYLOAD_TOO_LARGE, f"JSON body is larger than {settings.max_json_size} bytes")
    return body


async def _create(request: web.Request, fields: dict, parent_id: str | None = None) -> web.Response:
    """Register the validated fields: a commit of a snapshot when they list files."""
    storage = request.app[STORAGE]
    files = fields.pop("files", None)
    if files is None:
        return created(await registry.create(storage, fields, parent_id))
    snapshots.check_paths([f.path for f in files], request.app[SETTINGS].max_files_per_version)
    return created(await registry.create_snapshot(storage, fields, files, parent_id))


async def register(request: web.Request) -> web.Response:
    if request.content_type.startswith("multipart/"):
        return await register_with_file(request)
    fields = with_caller(request, validation.registration(await _read_model_body(request)))
    return await _create(request, fields)


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
            parse_metadata=lambda raw: with_caller(
                request, _single_file(validation.registration(parse_json_object(raw)))),
        )
    if received is None:
        raise ApiError(errors.MISSING_FILE, "multipart registration needs a 'file' part")
    return created(await registry.create_with_file(storage, fields, received))


def _single_file(fields: dict) -> dict:
    if "files" in fields:
        raise ApiError(errors.VALIDATION_ERROR, "files: a snapshot is committed with a JSON body, not with a "
                                                "multipart file (store its blobs with PUT /api/v1/blobs/<digest>)")
    return fields


async def list_models(request: web.Request) -> web.Response:
    # This process's own downloads first: the answer shows counts (a write moves the cache's stamp).
    await request.app[COUNTS].settle()

    async def page_body() -> bytes:
        query, page, limit = validation.listing(request.query, request.app[SETTINGS].max_page_size)
        docs, total = await request.app[STORAGE].find_models(query)
        return encoded(ModelList(
            models=[render.summary(d) for d in docs],
            pagination=Pagination(page=page, limit=limit, total=total, pages=math.ceil(total / limit)),
        ))

    # The query string is the listing's whole input: the same string, the same page, until a model
    # changes. Kept by the string as sent, so a hit neither parses nor validates it (a third of a
    # cached listing); one that fails validation raises in page_body and is kept nowhere.
    key = ("list", request.rel_url.raw_query_string)
    return json_body_response(await request.app[READ_CACHE].get(key, page_body))


async def get_model(request: web.Request) -> web.Response:
    model_id = request_model_id(request)
    await request.app[COUNTS].settle()

    async def answer():
        return tagged(render.full(await model_or_404(request)))

    return conditional_json(request, await request.app[READ_CACHE].get(("model", model_id), answer))


async def update_model(request: web.Request) -> web.Response:
    model_id = request_model_id(request)
    fields = validation.update(await read_json_object(request))
    await request.app[COUNTS].settle()  # the answer shows the model
    doc = await registry.update(request.app[STORAGE], model_id, fields)
    if doc is None:
        raise not_found(model_id)
    return json_response(UpdateAnswer(success=True, message="Model updated successfully", model=render.full(doc)))


async def delete_model(request: web.Request) -> web.Response:
    model_id = request_model_id(request)
    if await registry.delete(request.app[STORAGE], model_id, request.app[LEASES]) is None:
        raise not_found(model_id)
    return json_response(DeleteAnswer(success=True, message="Model deleted successfully", deleted_id=model_id))


async def create_version(request: web.Request) -> web.Response:
    source = await model_or_404(request)
    updates = with_caller(request, validation.new_version(await _read_model_body(request)))
    files = updates.pop("files", None)
    fields = registry.new_version_fields(source, updates)
    return await _create(request, fields if files is None else {**fields, "files": files}, source["id"])


async def list_versions(request: web.Request) -> web.Response:
    await request.app[COUNTS].settle()
    source = await model_or_404(request)
    docs = await registry.versions_of(request.app[STORAGE], source["name"])
    return json_response(VersionList(name=source["name"], versions=[render.summary(d) for d in docs]))


async def by_name(request: web.Request) -> web.Response:
    await request.app[COUNTS].settle()

    async def answer():
        return tagged(render.full(await named_model_or_404(request)))

    return conditional_json(request, await request.app[READ_CACHE].get(("by_name", *named_target(request)), answer))
