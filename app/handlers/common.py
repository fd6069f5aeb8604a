"""What several handler modules share: finding the model a URL names, the caller, the 201 answer."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .. import errors, registry, urls, validation
from ..appkeys import READ_CACHE, STORAGE
from ..auth import caller_name, is_admin
from ..errors import ApiError
from ..http.json import json_response
from ..read_cache import freeze
from ..schemas import RegistrationAnswer


def not_found(model_id: str) -> ApiError:
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
        raise not_found(model_id)
    return doc


async def model_alone_or_404(request: web.Request) -> tuple[Mapping, tuple]:
    """``model_or_404``'s model and no other versions: the shape ``named_models_or_404`` answers in.

    A download's lookup: frozen and kept (app/read_cache.py) while the model
    is unchanged; its download_count may lag, downloads never show it.
    """
    model_id = request_model_id(request)

    async def lookup() -> tuple[Mapping, tuple]:
        doc = await request.app[STORAGE].get_model(model_id)
        if doc is None:
            raise not_found(model_id)
        return freeze(doc), ()

    return await request.app[READ_CACHE].get(("download", model_id), lookup, counts=False)


async def named_model_or_404(request: web.Request) -> dict:
    """The latest version of {name}, or the one ``?version=`` asks for."""
    return (await _named_models(request, *named_target(request)))[0]


def named_target(request: web.Request) -> tuple[str, str | None]:
    """The {name} of the URL and the ``?version=`` it asks for (None: the latest), validated."""
    return validation.model_name(request.match_info["name"]), validation.version_param(request.query.get("version"))


async def named_models_or_404(request: web.Request) -> tuple[Mapping, tuple[Mapping, ...]]:
    """``named_model_or_404``'s model, and the versions the URL may also have named:
    every version of the name for "the latest", none for a pinned ``?version=``.

    A download's lookup, frozen and kept as ``model_alone_or_404``'s."""
    target = named_target(request)

    async def lookup() -> tuple[Mapping, tuple[Mapping, ...]]:
        return freeze(await _named_models(request, *target))

    return await request.app[READ_CACHE].get(("download_named", *target), lookup, counts=False)


async def _named_models(request: web.Request, name: str, wanted: str | None) -> tuple[dict, list[dict]]:
    docs = await request.app[STORAGE].models_named(name)
    if wanted is None:
        doc = registry.latest(docs)
    else:
        doc = next((d for d in docs if d["version"] == wanted), None)
    if doc is None:
        what = f"{name} {wanted}" if wanted else name
        raise ApiError(errors.NOT_FOUND, f"no model named {what}")
    return doc, (docs if wanted is None else [])


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


def created(doc: dict) -> web.Response:
    return json_response(
        RegistrationAnswer(success=True, message="Model registered successfully", model_id=doc["id"],
                           version=doc["version"], download_url=urls.download_url(doc["id"])),
        status=201,
        headers={"Location": urls.model_url(doc["id"])},
    )
