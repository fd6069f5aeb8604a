"""JSON request bodies, within MAX_JSON_SIZE."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import errors
from .appkeys import SETTINGS
from .errors import ApiError
from .http.body import read_limited
from .http.expect import invite_body
from .http.json import parse_json_object


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over MAX_JSON_SIZE."""
    return parse_json_object(await read_json_bytes(request, request.app[SETTINGS].max_json_size))


async def read_json_bytes(request: web.Request, limit: int) -> bytes:
    """The raw body of a JSON request, refusing bodies over ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(errors.PAYLOAD_TOO_LARGE, f"JSON body is larger than {limit} bytes")
    await invite_body(request)
    return await read_limited(request.content.read, "JSON body", limit)
