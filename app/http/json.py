"""JSON in and out, and the one error shape every failure takes.

JSON bodies are read with orjson and written with msgspec, which encodes the
answers of ``schemas`` (and plain data) directly. Every error leaves as
``{"error": {"code": ..., "message": ...}}`` with the matching status
(app/middleware.py turns exceptions into these).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import msgspec
import orjson
from aiohttp import web

from .. import errors
from ..errors import ApiError, ErrorCode
from . import preconditions


def _plain(value: object) -> object:
    # MongoDB hands 64-bit integers back as bson.Int64, an int subclass msgspec
    # does not encode by itself; only values msgspec cannot encode come here.
    if isinstance(value, int):
        return int(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__} as JSON")


_encode = msgspec.json.Encoder(enc_hook=_plain).encode


def encoded(data: Any) -> bytes:
    return _encode(data)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return json_body_response(_encode(data), status, headers)


def json_body_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer already encoded (app/read_cache.py keeps such bodies)."""
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


class Tagged(NamedTuple):
    """A JSON body and the ETag of its bytes."""

    body: bytes
    etag: str


def tagged(data: Any) -> Tagged:
    body = _encode(data)
    return Tagged(body, '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"')


def conditional_json(request: web.Request, answer: Tagged) -> web.Response:
    """A JSON answer with an ETag of its bytes; 304 when the client has them.

    Pollers (inference servers checking for a new version) then cost one
    small request and no body.
    """
    # no-cache: reuse only after revalidating, which is what the ETag is for.
    headers = {"ETag": answer.etag, "Cache-Control": "no-cache"}
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and preconditions.weak_match(if_none_match, answer.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=answer.body, content_type="application/json", headers=headers)


def error_response(error: ErrorCode, message: str, headers: dict[str, str] | None = None,
                   details: dict[str, object] | None = None) -> web.Response:
    return _error_body(error.status, error.code, message, headers, details)


def _error_body(status: int, code: str, message: str, headers: dict[str, str] | None,
                details: dict[str, object] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message, **(details or {})}}, status, headers)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(errors.INVALID_JSON, "request body must be a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(errors.INVALID_JSON, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(errors.INVALID_JSON, "request body must be a JSON object")
    return data


# The statuses aiohttp (or the connection layer) answers on its own, as the declared errors they are.
_STATUS_ERRORS = {e.status: e for e in (errors.BAD_REQUEST, errors.NOT_FOUND, errors.METHOD_NOT_ALLOWED,
                                        errors.REQUEST_TIMEOUT, errors.PAYLOAD_TOO_LARGE, errors.URI_TOO_LONG,
                                        errors.HEADERS_TOO_LARGE)}


def status_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The answer to a bare HTTP status that aiohttp or the connection layer chose."""
    if status in _STATUS_ERRORS:
        return error_response(_STATUS_ERRORS[status], message, headers)
    # Another status aiohttp raised on its own (a 403 from the UI's static
    # files): no declaration fits it, so it keeps its status under a generic code.
    return _error_body(status, "http_error", message, headers)
