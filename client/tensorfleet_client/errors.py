"""Exceptions the client raises, one class per kind of failure a caller may handle.

Every exception carries the HTTP ``status`` (None when no response arrived),
the server's error ``code`` and its ``message``, taken from the service's
``{"error": {"code": ..., "message": ...}}`` body.
"""

from __future__ import annotations

from typing import Any


class ModelServiceError(Exception):
    """Base class: something the Model Service (or the way to it) refused or failed."""

    default_code = "error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or self.default_code
        self.headers = headers or {}

    def __str__(self) -> str:
        if self.status is not None:
            return f"{self.message} (HTTP {self.status}, {self.code})"
        return self.message


class BadRequest(ModelServiceError):
    """400: the request was malformed or failed validation."""

    default_code = "bad_request"


class Unauthorized(ModelServiceError):
    """401: the API key is missing or wrong."""

    default_code = "unauthorized"


class Forbidden(ModelServiceError):
    """403: the API key may not do this."""

    default_code = "forbidden"


class NotFound(ModelServiceError):
    """404: no such model, no file uploaded yet (code ``no_file``), or no such route."""

    default_code = "not_found"


class Conflict(ModelServiceError):
    """409: for example a version that already exists."""

    default_code = "conflict"


class PreconditionFailed(ModelServiceError):
    """412: the file changed under a conditional request."""

    default_code = "precondition_failed"


class PayloadTooLarge(ModelServiceError):
    """413: the file is larger than the service's MAX_FILE_SIZE."""

    default_code = "payload_too_large"


class RateLimited(ModelServiceError):
    """429, still refused after the retries."""

    default_code = "rate_limited"


class ServerError(ModelServiceError):
    """5xx, still failing after the retries."""

    default_code = "server_error"


class ServiceUnavailable(ServerError):
    """503: the service is up but its store is not (code ``storage_unavailable``)."""

    default_code = "service_unavailable"


class ConnectionFailed(ModelServiceError):
    """The service could not be reached, or the connection kept failing mid-transfer."""

    default_code = "connection_failed"


class ChecksumMismatch(ModelServiceError):
    """The bytes do not hash to what the server says they should.

    Raised by downloads (nothing is left at the target) and by uploads the
    service refused with 422 ``checksum_mismatch``.
    """

    default_code = "checksum_mismatch"

    def __init__(self, message: str, *, expected: str | None = None, actual: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.expected = expected
        self.actual = actual


class ProtocolError(ModelServiceError):
    """The server answered something the client cannot make sense of."""

    default_code = "protocol_error"


class InsufficientSpace(ModelServiceError):
    """The file the server describes is larger than the free space where it would be written."""

    default_code = "insufficient_space"


class NotCached(ModelServiceError):
    """MODEL_SERVICE_OFFLINE is set and the model asked for is not in the cache."""

    default_code = "not_cached"


_BY_STATUS: dict[int, type[ModelServiceError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_for(status: int, body: Any, headers: dict[str, str] | None = None,
              fallback_message: str | None = None) -> ModelServiceError:
    """The exception for an error response, from its status and JSON body (if any)."""
    code = message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        message = body["error"].get("message")
    message = message or fallback_message or f"HTTP {status}"
    if code == "checksum_mismatch":
        cls: type[ModelServiceError] = ChecksumMismatch
    elif status in _BY_STATUS:
        cls = _BY_STATUS[status]
    elif status >= 500:
        cls = ServerError
    else:
        cls = ModelServiceError
    return cls(message, status=status, code=code, headers=headers)
