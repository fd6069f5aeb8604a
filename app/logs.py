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
from collections.abc import Callable
from datetime import datetime, timezone
from time import strftime
from time import time as wall_time

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


ACCESS_LOGGER = "app.access"
_ACCESS_MESSAGE = "%s %s %s %d %dB %.1fms id=%s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {key: getattr(record, key, None) for key in _REQUEST_FIELDS}
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self._line(record.created, record.levelname, record.name, record.getMessage(), fields, exception)

    def access_line(self, created: float, message: str, fields: dict[str, object]) -> str:
        """What ``format`` writes for an access record made at ``created`` (AccessLogger)."""
        return self._line(created, "INFO", ACCESS_LOGGER, message, fields)

    @staticmethod
    def _line(created: float, level: str, name: str, message: str, fields: dict[str, object],
              exception: str | None = None) -> str:
        line = {
            "time": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": level,
            "logger": name,
            "message": message,
        }
        for key, value in fields.items():
            if value is not None:
                line[key] = value
        if exception:
            line["exception"] = exception
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second: int | None = None
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} [request_id={rid}]" if rid and record.name != ACCESS_LOGGER else text

    def access_line(self, created: float, message: str, fields: dict[str, object]) -> str:
        """What ``format`` writes for an access record made at ``created`` (AccessLogger)."""
        # asctime as formatTime writes it, its seconds formatted once a second.
        second = int(created)
        if second != self._second:
            self._second, self._second_text = second, strftime(self.default_time_format, self.converter(second))
        asctime = self.default_msec_format % (self._second_text, int((created - second) * 1000))
        return f"{asctime} INFO {ACCESS_LOGGER}: {message}"


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


# Where AccessLogger writes its lines, once configure() has set up the only
# handler they would reach: straight to it, without a LogRecord, the logger's
# walk to the root and the formatter's generic path (together about a third
# of a get-by-id at LOG_LEVEL=INFO; README, Performance). None: through logging.
_write_access_line: Callable[[float, str, dict[str, object]], None] | None = None


def configure(level: str, fmt: str = "text") -> None:
    global _write_access_line
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    _write_access_line = _line_writer(handler, formatter) if not access.handlers and access.propagate else None
    logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())
    # No line shows where it was logged from, nor thread or process: the
    # logging HOWTO's "Optimization" switches spare each record a walk up the
    # stack and three lookups (the access log writes one per request).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiohttp warns (through `warnings`) about each malformed multipart
    # Content-Disposition it is sent; the request itself gets its 400.
    warnings.filterwarnings("ignore", category=BadContentDispositionHeader)


def _line_writer(handler: logging.StreamHandler, formatter: JsonFormatter | TextFormatter):
    def write(created: float, message: str, fields: dict[str, object]) -> None:
        line = formatter.access_line(created, message, fields) + handler.terminator
        # The handler's own lock: a line never interleaves with another thread's record.
        with handler.lock:
            handler.stream.write(line)
            handler.stream.flush()
    return write


def request_id(request: web.BaseRequest) -> str | None:
    return request.get(REQUEST_ID)


def assign_request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is sane, else a new one (app/middleware.py, first thing)."""
    incoming = request.headers.get(REQUEST_ID_HEADER)
    # An id only has to be unique, not secret: the Mersenne Twister, not a
    # getrandom() system call per request.
    assigned = request[REQUEST_ID] = (incoming if incoming is not None and _SANE_ID.fullmatch(incoming)
                                      else f"{random.getrandbits(64):016x}")
    return assigned


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
        args = (request.remote, request.method, request.path_qs, response.status, size, time * 1000,
                fields["request_id"])
        write = _write_access_line
        if write is not None:
            try:
                write(wall_time(), _ACCESS_MESSAGE % args, fields)
                return
            except (TypeError, ValueError, OSError):
                pass  # a value the message cannot show, a closed stream: logging reports it as for any record
        self.logger.info(_ACCESS_MESSAGE, *args, extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
