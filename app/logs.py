"""Logging: one line per request, as text (default) or JSON (LOG_FORMAT=json).

Every request gets an id: the client's X-Request-ID when it sends a sane one,
otherwise a new one. It is echoed in the response and in every log line about
that request, so a client's report can be found in the logs. Stack traces go
to the log only; clients see a plain JSON error.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import warnings
from datetime import datetime, timezone

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = web.RequestKey("request_id", str)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Fields a request's log line carries besides the message.
_REQUEST_FIELDS = ("request_id", "method", "route", "path", "status", "bytes", "duration_ms", "remote")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _REQUEST_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} [request_id={rid}]" if rid and record.name != "app.access" else text


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every unparseable request (a NUL in a header, say) as an
    ERROR with a stack trace. That is the client's mistake, already answered
    with 400: keep one INFO line, no trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            record.msg = "bad request: %s"
            record.args = (str(record.exc_info[1]).replace("\n", " "),)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())
    # No line shows where it was logged from, nor thread or process: the
    # logging HOWTO's "Optimization" switches spare each record a walk up the
    # stack and three lookups (the access log writes one per request).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiohttp warns (through `warnings`) about each malformed multipart
    # Content-Disposition it is sent; the request itself gets its 400.
    warnings.filterwarnings("ignore", category=BadContentDispositionHeader)


def request_id(request: web.BaseRequest) -> str | None:
    return request.get(REQUEST_ID)


def assign_request_id(request: web.Request) -> None:
    """The client's X-Request-ID when it is sane, else a new one (app/middleware.py, first thing)."""
    incoming = request.headers.get(REQUEST_ID_HEADER)
    # An id only has to be unique, not secret: the Mersenne Twister, not a
    # getrandom() system call per request.
    request[REQUEST_ID] = (incoming if incoming is not None and _SANE_ID.fullmatch(incoming)
                           else f"{random.getrandbits(64):016x}")


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare: also reaches streamed downloads, whose headers are
    # sent before the handler returns.
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, route template, status, bytes, duration."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            resource = request.match_info.route.resource  # type: ignore[attr-defined]
        except (AttributeError, AssertionError):
            # A request the parser rejected never reached the router.
            resource = None
        template = resource.canonical if resource is not None else None
        size = response.content_length if response.content_length is not None else response.body_length
        fields = {
            "request_id": request_id(request),
            "method": request.method,
            "route": template,
            "path": request.path,
            "status": response.status,
            "bytes": size,
            "duration_ms": round(time * 1000, 1),
            "remote": request.remote,
        }
        self.logger.info(
            "%s %s %s %d %dB %.1fms id=%s", request.remote, request.method, request.path_qs,
            response.status, size, time * 1000, fields["request_id"], extra=fields,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
