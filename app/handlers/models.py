"""The registry API under /api/v1/models: register, list, read, update, delete, versions."""

from __future__ import annotations

import math

from aiohttp import web

from .. import errors, registry, urls, validation, views
from ..appkeys import LEASES, SETTINGS, STORAGE
from ..auth import caller_name, is_admin
from ..errors import ApiError
from ..http.json import cacheable_json, json_response
from ..json_bodies import read_json_object
from ..schemas import DeleteAnswer, ModelList, Pagination, RegistrationAnswer, UpdateAnswer, VersionList


def _not_found(model_id: str) -> ApiError:
    return ApiError(errors.NOT_FOUND, f"no model with id {model_id}")


def request_model_id(request: web.Request) -> str:
    """The {id} of the URL, validated; 400 when it is not an ObjectId.

    A fixed path such as /api/v1/models/statistics reaches an {id} route only
    with a method the fixed path lacks: that is a 405, not a malformed id.
    """
    try:
        return validation.model_id(request.match_info["id"])
    except ApiError:
        for resource in request.app.router.resources():
            if resource.canonical == request.path:
                allowed = {route.method for route in resource if route.method != "*"}
                raise web.HTTPMethodNotAllowed(request.method, allowed) from None
        raise


async def model_or_404(request: web.Request) -> dict:
    model_id = request_model_id(request)
    doc = await request.app[STORAGE].get_model(model_id)
    if doc is None:
        raise _not_found(model_id)
    return doc


def created(doc: dict) -> web.Response:
    return json_response(
        RegistrationAnswer(success=True, message="Model registered successfully", model_id=doc["id"],
                           version=doc["version"], download_url=urls.download_url(doc["id"])),
        status=201,
        headers={"Location": urls.model_url(doc["id"])},
    )


async def register(request: web.Request) -> web.Response:
    if request.content_type.startswith("multipart/"):
        from .files import register_with_file

        return await register_with_file(request)
    fields = with_caller(request, validation.registration(await read_json_object(request)))
    doc = await registry.create(request.app[STORAGE], fields)
    return created(doc)


def with_caller(request: web.Request, fields: dict) -> dict:
    """created_by is the name of the API key that made the request.

    Only an admin key may record someone else (an import, a migration); any
    other key naming another creator is refused, not silently corrected.
    """
    caller = caller_name(request)
    if caller is None:
        return fields
    claimed = fields.get("created_by", caller)
    if claimed != caller and not is_admin(request):
        raise ApiError(errors.FORBIDDEN,
                       f"created_by: only an admin key may set it to another name than this key's ({caller!r})")
    return {**fields, "created_by": claimed}


async def list_models(request: web.Request) -> web.Response:
    query, page, limit = validation.listing(request.query, request.app[SETTINGS].max_page_size)
    docs, total = await request.app[STORAGE].find_models(query)
    return json_response(ModelList(
        models=[views.summary(d) for d in docs],
        pagination=Pagination(page=page, limit=limit, total=total, pages=math.ceil(total / limit)),
    ))


async def get_model(request: web.Request) -> web.Response:
    return cacheable_json(request, views.full(await model_or_404(request)))


async def update_model(request: web.Request) -> web.Response:
    model_id = request_model_id(request)
    fields = validation.update(await read_json_object(request))
    doc = await registry.update(request.app[STORAGE], model_id, fields)
    if doc is None:
        raise _not_found(model_id)
    return json_response(UpdateAnswer(success=True, message="Model updated successfully", model=views.full(doc)))


async def delete_model(request: web.Request) -> web.Response:
    model_id = request_model_id(request)
    if await registry.delete(request.app[STORAGE], request.app[LEASES], model_id) is None:
        raise _not_found(model_id)
    return json_response(DeleteAnswer(success=True, message="Model deleted successfully", deleted_id=model_id))


async def create_version(request: web.Request) -> web.Response:
    source = await model_or_404(request)
    updates = with_caller(request, validation.new_version(await read_json_object(request)))
    fields = registry.new_version_fields(source, updates)
    doc = await registry.create(request.app[STORAGE], fields, parent_id=source["id"])
    return created(doc)


async def list_versions(request: web.Request) -> web.Response:
    source = await model_or_404(request)
    docs = await registry.versions_of(request.app[STORAGE], source["name"])
    return json_response(VersionList(name=source["name"], versions=[views.summary(d) for d in docs]))


async def named_model_or_404(request: web.Request) -> dict:
    """The latest version of {name}, or the one ``?version=`` asks for."""
    return (await named_models_or_404(request))[0]


async def named_models_or_404(request: web.Request) -> tuple[dict, list[dict]]:
    """``named_model_or_404``'s model, and the versions the URL may also have named:
    every version of the name for "the latest", none for a pinned ``?version=``."""
    name = validation.model_name(request.match_info["name"])
    wanted = validation.version_param(request.query.get("version"))
    docs = await request.app[STORAGE].models_named(name)
    if wanted is None:
        doc = registry.latest(docs)
    else:
        doc = next((d for d in docs if d["version"] == wanted), None)
    if doc is None:
        what = f"{name} {wanted}" if wanted else name
        raise ApiError(errors.NOT_FOUND, f"no model named {what}")
    return doc, (docs if wanted is None else [])


async def by_name(request: web.Request) -> web.Response:
    return cacheable_json(request, views.full(await named_model_or_404(request)))

