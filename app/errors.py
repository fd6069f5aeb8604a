"""Every error the API answers with, declared once: its ``error.code``, status and meaning.

A raise names a declaration (``raise ApiError(errors.NOT_FOUND, "no model with
id ...")``), so the status cannot drift from the code, and the OpenAPI
document lists the same declarations (openapi.error_response, and the table in
its description). Declaring a code twice fails at import.
"""

from __future__ import annotations

from dataclasses import dataclass

from .http import ranges


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    description: str


# In declaration order, which is the order of the OpenAPI description's table.
REGISTRY: dict[str, ErrorCode] = {}


def declare(code: str, status: int, description: str) -> ErrorCode:
    if code in REGISTRY:
        raise ValueError(f"error code {code} is declared twice")
    REGISTRY[code] = ErrorCode(code, status, description)
    return REGISTRY[code]


class ApiError(Exception):
    """A failure the client is told about: ``{"error": {"code", "message"}}`` with the code's status."""

    def __init__(self, error: ErrorCode, message: str, headers: dict[str, str] | None = None,
                 details: dict[str, object] | None = None) -> None:
        if not isinstance(error, ErrorCode):
            raise TypeError(f"ApiError needs a declared ErrorCode (app.errors), got {error!r}")
        super().__init__(message)
        self.error = error
        self.message = message
        self.headers = headers
        # Members the error object carries beside code and message (missing_blobs' "missing").
        self.details = details

    @property
    def status(self) -> int:
        return self.error.status

    @property
    def code(self) -> str:
        return self.error.code


INVALID_ID = declare("invalid_id", 400, "a model id path segment is not 24 hexadecimal characters")
INVALID_JSON = declare("invalid_json", 400,
                        "the body is not a JSON object (empty, malformed, or another JSON type)")
VALIDATION_ERROR = declare("validation_error", 400,
                            "a field or name breaks a rule (the message names the field and the rule), or "
                            "the database refuses a value")
IMMUTABLE_FIELD = declare("immutable_field", 400,
                           "the body sets a field the server owns (id, name, version, created_at, ...)")
UNKNOWN_FIELD = declare("unknown_field", 400, "the body has a field the operation does not take")
INVALID_PARAMETER = declare("invalid_parameter", 400, "a query parameter is out of range or malformed")
INVALID_CHECKSUM = declare("invalid_checksum", 400,
                            "X-Checksum-Sha256 / ?sha256= is not 64 hexadecimal characters")
INVALID_FILENAME = declare("invalid_filename", 400,
                            "the upload's file name has control characters, no name part, or over 255 bytes")
MISSING_FILE = declare("missing_file", 400, "a multipart body has no 'file' part")
BAD_REQUEST = declare("bad_request", 400, "the request broke HTTP itself: no HTTP version, or a body shorter "
                                           "than its Content-Length or with a malformed chunk")
CLIENT_CLOSED_REQUEST = declare("client_closed_request", 499,
                                 "logged only: the client left while its body was being read (nginx's 499)")
INVALID_MULTIPART = declare("invalid_multipart", 400,
                             "a multipart body that cannot be parsed (no boundary, a malformed part header)")
TOO_MANY_PARTS = declare("too_many_parts", 400,
                         "a multipart body has more parts than the API reads ('metadata' and 'file')")
INVALID_PATH = declare("invalid_path", 400,
                       "a snapshot file path breaks a path rule (the message names the path and the rule)")
PATH_CONFLICT = declare("path_conflict", 400,
                        "two snapshot paths are the same (also after case folding), or one is a folder of another")
INVALID_DIGEST = declare("invalid_digest", 400,
                         "a blob digest (or ?digest=) is not sha256: followed by 64 lowercase hexadecimal "
                         "characters, or a Content-Digest header is malformed")
INVALID_CONTENT_RANGE = declare("invalid_content_range", 400,
                                "an upload session chunk's Content-Range is malformed, disagrees with its "
                                "Content-Length, its body or the session's size_bytes, or the chunk is empty; "
                                "nothing changed")
MISSING_METADATA = declare("missing_metadata", 400, "a multipart registration has no 'metadata' part")
UNAUTHORIZED = declare("unauthorized", 401,
                        "no API key, or an unknown one (ENABLE_AUTH=true); see WWW-Authenticate")
FORBIDDEN = declare("forbidden", 403, "the API key's scope does not allow this operation")
NOT_FOUND = declare("not_found", 404, "no model with that id, name or version (also: no route for the path)")
NO_FILE = declare("no_file", 404, "the model exists but has no file uploaded yet "
                  "(/info of a snapshot of several files: its files are listed under /files)")
UPLOAD_NOT_FOUND = declare("upload_not_found", 404,
                           "no such upload session: never opened, completed, cancelled, expired "
                           "(UPLOAD_SESSION_TTL), opened by another API key, or a malformed id")
METHOD_NOT_ALLOWED = declare("method_not_allowed", 405,
                              "the path exists but not with this method (Allow lists the methods)")
VERSION_EXISTS = declare("version_exists", 409,
                          "a model with this name and the requested version already exists")
UPLOAD_BUSY = declare("upload_busy", 409,
                      "another request is writing this upload session; retry after Retry-After")
VERSION_CONFLICT = declare("version_conflict", 409,
                            "too many concurrent registrations of the name to number a new version")
REQUEST_TIMEOUT = declare("request_timeout", 408,
                          "the request head (HEADER_TIMEOUT) or body (BODY_TIMEOUT) stopped arriving; the "
                          "connection is closed")
PRECONDITION_FAILED = declare("precondition_failed", 412, "If-Match / If-Unmodified-Since did not hold")
PAYLOAD_TOO_LARGE = declare("payload_too_large", 413,
                             "a JSON body (or a multipart 'metadata' part) is over MAX_JSON_SIZE")
FILE_TOO_LARGE = declare("file_too_large", 413, "the file is over MAX_FILE_SIZE")
URI_TOO_LONG = declare("uri_too_long", 414, "the request line is longer than MAX_URL_LENGTH")
RANGE_NOT_SATISFIABLE = declare("range_not_satisfiable", 416, "no requested range overlaps the file, or more "
                                                               f"than {ranges.MAX_RANGES} ranges")
UPLOAD_OFFSET_MISMATCH = declare("upload_offset_mismatch", 416,
                                 "the chunk does not start at the session's offset (error.offset, and Range: "
                                 "0-<offset-1>); nothing changed")
EXPECTATION_FAILED = declare("expectation_failed", 417, "an Expect header other than 100-continue")
CHECKSUM_MISMATCH = declare("checksum_mismatch", 422,
                             "the received content's SHA-256 differs from the declared one")
DIGEST_MISMATCH = declare("digest_mismatch", 422,
                           "the blob's bytes do not hash to the digest in its URL (nothing was kept), or an "
                           "upload session's chunk or content does not hash to its Content-Digest, ?digest= "
                           "or the checksum announced (the chunk is not counted; the session stays)")
SIZE_MISMATCH = declare("size_mismatch", 422,
                        "an upload session's content is not the size_bytes announced when it was opened; "
                        "the session stays")
MISSING_BLOBS = declare("missing_blobs", 422,
                        "a commit lists files whose blobs are not stored (or are stored with another size); "
                        "error.missing lists their digests and nothing was created")
RATE_LIMITED = declare("rate_limited", 429,
                        "RATE_LIMIT or DOWNLOAD_RATE_LIMIT exceeded for this client; retry after Retry-After")
TOO_MANY_CLIENT_UPLOADS = declare("too_many_client_uploads", 429,
                                  "this client already has MAX_UPLOADS_PER_CLIENT uploads in progress; retry "
                                  "after Retry-After")
TOO_MANY_UPLOAD_SESSIONS = declare("too_many_upload_sessions", 429,
                                   "this API key has MAX_UPLOAD_SESSIONS open upload sessions; finish or DELETE "
                                   "one, or retry after Retry-After")
HEADERS_TOO_LARGE = declare("headers_too_large", 431, "a request header is longer than MAX_HEADER_SIZE")
INTERNAL_ERROR = declare("internal_error", 500, "an unexpected failure (logged server-side; no details are sent)")
STORAGE_UNAVAILABLE = declare("storage_unavailable", 503,
                               "the database or data folder is unreachable; retry after Retry-After seconds")
SHUTTING_DOWN = declare("shutting_down", 503, "the instance is draining after SIGTERM; retry (on another instance)")
TOO_MANY_DOWNLOADS = declare("too_many_downloads", 503,
                              "MAX_CONCURRENT_DOWNLOADS bodies are streaming here and no slot freed within "
                              "DOWNLOAD_QUEUE_SECONDS; retry after Retry-After")
TOO_MANY_UPLOADS = declare("too_many_uploads", 503,
                           "MAX_CONCURRENT_UPLOADS uploads are in progress here and none finished within "
                           "UPLOAD_QUEUE_SECONDS; retry after Retry-After")
UPLOAD_SESSIONS_FULL = declare("upload_sessions_full", 503,
                               "MAX_UPLOAD_SESSIONS_TOTAL upload sessions are open; retry after Retry-After")
TOO_MANY_CONNECTIONS = declare("too_many_connections", 503,
                               "MAX_CONNECTIONS connections are in the middle of a request here; retry after "
                               "Retry-After")
