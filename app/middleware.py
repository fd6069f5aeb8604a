"""The request middleware: each request's id, metrics, drain accounting and error answer, in one layer.

Every failure, including aiohttp's own 404 and 405 and anything unexpected,
leaves as ``{"error": {"code": ..., "message": ...}}``. One layer, not one per
concern: each aiohttp middleware is a coroutine and a call more per request,
and these four ran on every request (about 5% of a get-by-id). The optional
rate limit and authentication come after it, as their own layers, so that
their refusals get the JSON answer, the metrics and the request id too.
"""

from __future__ import annotations

import logging
from time import perf_counter

from aiohttp import HttpVersion10, web
from aiohttp.http_exceptions import HttpProcessingError

from . import errors, logs, metrics
from .drain import Drain
from .errors import ApiError
from .http.body import BodyTimeout
from .http.expect import body_not_invited
from .http.json import error_response, status_error_response
from .logs import REQUEST_ID_HEADER, request_id
from .metrics import STORAGE_ERRORS
from .storage.base import StorageUnavailable, ValueRefused

# The name the error log has always had (operators filter on it).
log = logging.getLogger("app.http")


def request_middleware(drain: Drain):
    """The middleware every request passes first; ``drain`` counts it and, once draining, refuses it."""
    tally = metrics.TALLY

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        request_id_ = logs.assign_request_id(request)
        started = perf_counter()
        # Metrics see the status the error answer chose; 500 if something escapes.
        status = 500
        try:
            try:
                if request.version < HttpVersion10:
                    # aiohttp's C parser takes a request line without a version as
                    # HTTP/0.9 yet reads headers and a body: refuse it rather than act
                    # on a request a proxy in front may have framed differently.
                    raise ApiError(errors.BAD_REQUEST, "HTTP/1.0 or later is required", {"Connection": "close"})
                # Health endpoints answer for themselves (503, "draining").
                if drain.draining and not request.path.startswith("/health"):
                    raise ApiError(errors.SHUTTING_DOWN, "the service is shutting down; retry on another instance",
                                   {"Retry-After": "1", "Connection": "close"})
                drain.in_flight += 1
                try:
                    response = await handler(request)
                finally:
                    drain.in_flight -= 1
            except Exception as e:
                response = _failure_answer(request, e)
                if response is None:
                    raise
            if response.status >= 400 and body_not_invited(request) and not response.prepared:
                # The client is still holding its body back: it will not send it
                # now, so this connection cannot carry another request.
                response.force_close()
            status = response.status
            # Echoed here rather than from on_response_prepare, a signal each response would
            # send (about 3 us of a get-by-id). A response its handler has already started, a
            # download's (app/downloads.py), was given the id with its headers.
            if not response.prepared:
                response.headers[REQUEST_ID_HEADER] = request_id_
            return response
        except web.HTTPException as e:
            # A redirect (below 400) leaves as aiohttp raised it.
            status = e.status
            e.headers[REQUEST_ID_HEADER] = request_id_
            raise
        finally:
            route = request.match_info.route
            resource = route.resource if route is not None else None
            tally.request(resource, request.method, status, perf_counter() - started)

    return middleware


def _failure_answer(request: web.Request, e: Exception) -> web.StreamResponse | None:
    """The JSON answer to a failure of the handler, or None for one to re-raise (a redirect)."""
    if isinstance(e, ApiError):
        return error_response(e.error, e.message, e.headers, e.details)
    if isinstance(e, ValueRefused):
        return error_response(errors.VALIDATION_ERROR, f"the model store cannot hold this value: {e}")
    if isinstance(e, StorageUnavailable):
        STORAGE_ERRORS.labels("request").inc()
        log.warning("storage unavailable during %s %s: %s", request.method, request.path, e,
                    extra={"request_id": request_id(request)})
        return error_response(errors.STORAGE_UNAVAILABLE, "the model store is unreachable; retry shortly",
                              {"Retry-After": "5"})
    if isinstance(e, web.HTTPException):
        if e.status < 400:
            return None
        message = e.reason
        if e.status == 404:
            message = f"no route for {request.path}"
        elif e.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        return status_error_response(e.status, message, headers or None)
    if isinstance(e, BodyTimeout):
        log.info("request body stalled in %s %s: %s", request.method, request.path, e,
                 extra={"request_id": request_id(request)})
        return error_response(errors.REQUEST_TIMEOUT, str(e), {"Connection": "close"})
    if isinstance(e, HttpProcessingError):
        # The body broke HTTP framing (shorter than its Content-Length, a bad
        # chunk): the client's fault, and whatever was stored is already undone.
        log.info("malformed request body in %s %s: %s", request.method, request.path, e,
                 extra={"request_id": request_id(request)})
        return error_response(errors.BAD_REQUEST, f"malformed request body: {e.message}", {"Connection": "close"})
    if isinstance(e, ConnectionError):
        # The client left while we read its body; nobody is there to answer.
        # 499 (nginx's "client closed request") keeps it apart from real errors.
        log.info("client left during %s %s: %s", request.method, request.path, e,
                 extra={"request_id": request_id(request)})
        return error_response(errors.CLIENT_CLOSED_REQUEST, "the client closed the connection")
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=e,
              extra={"request_id": request_id(request)})
    # The trace stays in the log; the client gets the id to quote.
    return error_response(errors.INTERNAL_ERROR, f"internal server error (request id {request_id(request)})")
