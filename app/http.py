"""JSON in and out, and the one error shape every failure takes.

JSON bodies are read with orjson and written with msgspec, which encodes the
answers of ``schemas`` (and plain data) directly. Every error, including aiohttp's own 404
and 405 and anything unexpected, leaves as
``{"error": {"code": ..., "message": ...}}`` with the matching status.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import msgspec
import orjson
from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from . import errors, preconditions
from .appkeys import SETTINGS
from .errors import ApiError, ErrorCode
from .logs import request_id
from .metrics import STORAGE_ERRORS
from .storage.base import StorageUnavailable, ValueRefused

log = logging.getLogger("app.http")


def _plain(value: object) -> object:
    # MongoDB hands 64-bit integers back as bson.Int64, an int subclass msgspec
    # does not encode by itself; only values msgspec cannot encode come here.
    if isinstance(value, int):
        return int(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__} as JSON")


_encode = msgspec.json.Encoder(enc_hook=_plain).encode


class BodyTimeout(TimeoutError):
    """The client stopped sending a request body the service was waiting for (BODY_TIMEOUT).

    Raised into whatever reads the body (app/connections.py sets it on the
    request's payload), so an upload unwinds as on any other failure and its
    partial file is discarded. A TimeoutError, so aiohttp's lingering read of an
    unfinished body treats it as the end of that body.
    """


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_encode(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def cacheable_json(request: web.Request, data: Any) -> web.Response:
    """A JSON answer with an ETag of its bytes; 304 when the client has them.

    Pollers (inference servers checking for a new version) then cost one
    small request and no body.
    """
    body = _encode(data)
    etag = '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'
    # no-cache: reuse only after revalidating, which is what the ETag is for.
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and preconditions.weak_match(if_none_match, etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


def error_response(error: ErrorCode, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _error_body(error.status, error.code, message, headers)


def _error_body(status: int, code: str, message: str, headers: dict[str, str] | None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


# Expect: 100-continue. aiohttp answers it before any middleware runs, which
# would invite the body of a request about to be refused (no key, rate
# limited, no such model, too large). Routes that take a body use
# ``defer_expect`` instead, and the handler calls ``invite_body`` once every
# check has passed, right before it reads.
_INVITED = web.RequestKey("body_invited", bool)


def _expects_continue(request: web.BaseRequest) -> bool:
    return request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


async def defer_expect(request: web.Request) -> web.StreamResponse | None:
    """A route's expect handler: 417 for an unknown expectation, else nothing yet."""
    expect = request.headers.get("Expect", "")
    if request.version >= HttpVersion11 and expect.lower() != "100-continue":
        # Middlewares do not run on this path, so build the error body here.
        response = error_response(errors.EXPECTATION_FAILED, f"unsupported Expect: {expect[:100]!r}")
        response.force_close()
        return response
    return None


async def invite_body(request: web.Request) -> None:
    """Send ``100 Continue`` if the client waits for it; call right before reading the body."""
    if _expects_continue(request) and not request.get(_INVITED):
        request[_INVITED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim answer is not part of the response's size.
        request.writer.output_size = 0


def _body_not_invited(request: web.BaseRequest) -> bool:
    return _expects_continue(request) and not request.get(_INVITED)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over MAX_JSON_SIZE."""
    limit = request.app[SETTINGS].max_json_size
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(errors.PAYLOAD_TOO_LARGE, f"JSON body is larger than {limit} bytes")
    await invite_body(request)
    return parse_json_object(await read_limited(request.content.read, "JSON body", limit))


async def read_limited(read, what: str, limit: int) -> bytes:
    """Everything ``read(n)`` yields until EOF; 413 once it passes ``limit``.

    Reads at most one byte past the limit, so a chunked body that never ends
    costs no more than that.
    """
    buf = bytearray()
    while True:
        piece = await read(limit + 1 - len(buf))
        if not piece:
            return bytes(buf)
        buf += piece
        if len(buf) > limit:
            raise ApiError(errors.PAYLOAD_TOO_LARGE, f"{what} is larger than {limit} bytes")


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


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await _errors_answered(request, handler)
    if response.status >= 400 and _body_not_invited(request) and not response.prepared:
        # The client is still holding its body back: it will not send it
        # now, so this connection cannot carry another request.
        response.force_close()
    return response


async def _errors_answered(request: web.Request, handler) -> web.StreamResponse:
    try:
        if request.version < HttpVersion10:
            # aiohttp's C parser takes a request line without a version as
            # HTTP/0.9 yet reads headers and a body: refuse it rather than act
            # on a request a proxy in front may have framed differently.
            raise ApiError(errors.BAD_REQUEST, "HTTP/1.0 or later is required", {"Connection": "close"})
        return await handler(request)
    except ApiError as e:
        return error_response(e.error, e.message, e.headers)
    except ValueRefused as e:
        return error_response(errors.VALIDATION_ERROR, f"the model store cannot hold this value: {e}")
    except StorageUnavailable as e:
        STORAGE_ERRORS.labels("request").inc()
        log.warning("storage unavailable during %s %s: %s", request.method, request.path, e,
                    extra={"request_id": request_id(request)})
        return error_response(errors.STORAGE_UNAVAILABLE, "the model store is unreachable; retry shortly",
                              {"Retry-After": "5"})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.reason
        if e.status == 404:
            message = f"no route for {request.path}"
        elif e.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        return status_error_response(e.status, message, headers or None)
    except BodyTimeout as e:
        log.info("request body stalled in %s %s: %s", request.method, request.path, e,
                 extra={"request_id": request_id(request)})
        return error_response(errors.REQUEST_TIMEOUT, str(e), {"Connection": "close"})
    except HttpProcessingError as e:
        # The body broke HTTP framing (shorter than its Content-Length, a bad
        # chunk): the client's fault, and whatever was stored is already undone.
        log.info("malformed request body in %s %s: %s", request.method, request.path, e,
                 extra={"request_id": request_id(request)})
        return error_response(errors.BAD_REQUEST, f"malformed request body: {e.message}", {"Connection": "close"})
    except ConnectionError as e:
        # The client left while we read its body; nobody is there to answer.
        # 499 (nginx's "client closed request") keeps it apart from real errors.
        log.info("client left during %s %s: %s", request.method, request.path, e,
                 extra={"request_id": request_id(request)})
        return error_response(errors.CLIENT_CLOSED_REQUEST, "the client closed the connection")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path,
                      extra={"request_id": request_id(request)})
        # The trace stays in the log; the client gets the id to quote.
        return error_response(errors.INTERNAL_ERROR,
                              f"internal server error (request id {request_id(request)})")
