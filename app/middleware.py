"""The error middleware: every failure, including aiohttp's own 404 and 405 and
anything unexpected, leaves as ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging

from aiohttp import HttpVersion10, web
from aiohttp.http_exceptions import HttpProcessingError

from . import errors
from .errors import ApiError
from .http.body import BodyTimeout
from .http.expect import body_not_invited
from .http.json import error_response, status_error_response
from .logs import request_id
from .metrics import STORAGE_ERRORS
from .storage.base import StorageUnavailable, ValueRefused

# The name the error log has always had (operators filter on it).
log = logging.getLogger("app.http")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await _errors_answered(request, handler)
    if response.status >= 400 and body_not_invited(request) and not response.prepared:
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
        return error_response(e.error, e.message, e.headers, e.details)
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
