"""The service's OpenAPI 3.1 document, built as plain data.

``build(settings)`` returns the document served at ``/api/v1/openapi.json``
(and rendered at ``/docs``). It is written to be checked, not admired:
tests/test_openapi.py validates it as OpenAPI 3.1, compares its operations
with the application's router in both directions, and validates real responses
against the schemas, and schemathesis is meant to run against it. So every
schema here states what the service really sends and accepts:

- ``components.schemas`` is generated from the Structs of ``app.schemas``, the
  same declarations validation converts bodies into and handlers answer with;
- limits come from the code (those declarations, ranges.MAX_RANGES, the batch
  size) and from the running settings (MAX_FILE_SIZE, MAX_PAGE_SIZE, MAX_JSON_SIZE);
- each error response lists the exact ``error.code`` values the route can
  answer with that status, as an ``enum`` in its schema and as ``x-error-codes``;
- response objects are closed (``additionalProperties: false``) where the
  handler builds them field by field;
- what depends on configuration (API keys, rate limits, the download cap) is
  in the document only when the running settings turn it on.

Layout: shared schemas, parameters, headers and error responses first, then
one small builder per operation (``operations``; the route table app/routes.py
says at which path and method each is served, and with which API key scope),
then the cross-cutting additions (auth, rate limits, request ids) and ``build``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import downloads, errors, routes, snapshots
from . import schemas as shapes
from .config import Settings, format_size
from .errors import ErrorCode
from .handlers.batch import MAX_IDS
from .http import ranges
from .limits import UNLIMITED_PATHS
from .logs import REQUEST_ID_HEADER
from .urls import BLOBS, MODELS

OPENAPI_VERSION = "3.1.0"

Json = dict[str, Any]


# --------------------------------------------------------------------------- helpers

def ref(name: str, kind: str = "schemas") -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def nullable(schema: Json) -> Json:
    """``schema`` or null (JSON Schema 2020-12 style: a type list, or anyOf for refs)."""
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "type": [schema["type"], "null"]}


def closed(properties: Json, required: list[str] | None = None, **extra: Any) -> Json:
    """An object with exactly these properties (all required unless ``required`` says otherwise)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def json_content(schema: Json, example: Any = None) -> Json:
    media: Json = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


BINARY = {"type": "string", "format": "binary"}


# --------------------------------------------------------------------------- error responses

# Each code's status and meaning are declared in app/errors.py; these are the statuses' names.
_REASONS = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
            405: "Method not allowed", 408: "Request timeout", 409: "Conflict", 412: "Precondition failed",
            413: "Payload too large", 414: "URI too long", 416: "Range not satisfiable", 417: "Expectation failed",
            422: "Unprocessable content", 429: "Too many requests", 431: "Header fields too large",
            500: "Internal error", 503: "Service unavailable"}


def error_response(*codes: ErrorCode, headers: Json | None = None, body: bool = True) -> Json:
    """A response in the one error shape whose ``error.code`` is one of ``codes`` (all of one status).

    ``body=False`` is for HEAD, which sends the same status and headers without content.
    """
    status = codes[0].status
    for e in codes:
        if e.status != status:
            raise ValueError(f"error code {e.code} is a {e.status}, not a {status}")
    names = [e.code for e in codes]
    out: Json = {
        "description": f"{_REASONS[status]}: " + "; ".join(f"`{e.code}` ({e.description})" for e in codes),
        "x-error-codes": names,
    }
    if headers:
        out["headers"] = headers
    if body:
        schema = {"allOf": [ref("Error"), {"properties": {"error": {"properties": {"code": {"enum": names}}}}}]}
        out["content"] = json_content(schema, {"error": {"code": names[0], "message": codes[0].description}})
    return out


# Codes that a whole group of inputs can produce, combined per operation below.
BODY_CODES = (errors.INVALID_JSON, errors.VALIDATION_ERROR, errors.IMMUTABLE_FIELD, errors.UNKNOWN_FIELD)
# What a commit's list of files adds (the blobs' absence is a 422).
COMMIT_CODES = (errors.INVALID_PATH, errors.PATH_CONFLICT)


# --------------------------------------------------------------------------- schemas

# What uploads.clean_filename accepts: no control characters, and a last path
# component (after / or \\) that is neither empty, "." nor "..". Empty means "not given".
_NAME_CHAR = r"[^/\\\x00-\x1f\x7f]"
FILENAME = (r"^$|^(?:[^\x00-\x1f\x7f]*[/\\])?(?:[^./\\\x00-\x1f\x7f]|\.[^./\\\x00-\x1f\x7f]|\.\."
            + _NAME_CHAR + ")" + _NAME_CHAR + "*$")
SHA256_VALUE = r"^\s*(?:sha256:)?[0-9a-fA-F]{64}\s*$"
TIMESTAMP = msgspec.json.schema(shapes.Timestamp)
COUNT = {"type": "integer", "minimum": 0}


# What a use of a leaf type may add to it without being another type.
_ANNOTATIONS = frozenset({"title", "description", "examples", "default"})


def _leaf_refs(schema: Any, leaves: dict[str, Json], own: str | None = None) -> Any:
    """``schema`` with each inlined named leaf type (see schemas.NAMED) turned into a $ref to its
    component; what the use adds to the leaf (a description) stays beside the $ref."""
    if isinstance(schema, list):
        return [_leaf_refs(s, leaves, own) for s in schema]
    if not isinstance(schema, dict):
        return schema
    constraints = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
    for name, leaf in leaves.items():
        if name != own and constraints == {k: v for k, v in leaf.items() if k not in _ANNOTATIONS}:
            return {**ref(name), **{k: v for k, v in schema.items() if k in _ANNOTATIONS and leaf.get(k) != v}}
    return {k: _leaf_refs(v, leaves, own) for k, v in schema.items()}


def generated_schemas(settings: Settings) -> Json:
    """components.schemas of the Structs in ``schemas``, with the limits the settings set."""
    template = "#/components/schemas/{name}"
    _, structs = msgspec.json.schema_components(shapes.REQUESTS + shapes.ANSWERS, ref_template=template)
    leaves = {name: msgspec.json.schema(t, ref_template=template) for name, t in shapes.NAMED.items()}
    out = {name: _leaf_refs(schema, leaves, name) for name, schema in {**leaves, **structs}.items()}
    for name, extra in shapes.EXTRA_SCHEMA.items():
        out[name].update(extra)
    for name in ("FileMetadata", "FileInfo"):
        out[name]["properties"]["size_bytes"]["maximum"] = settings.max_file_size
    out["Pagination"]["properties"]["limit"]["maximum"] = settings.max_page_size
    out["ModelTop"]["properties"]["models"]["maxItems"] = settings.max_page_size
    return {**out, **shapes.SAFE_JSON_SCHEMAS}


def schemas(settings: Settings) -> Json:
    ids = {
        "type": "array", "minItems": 1, "maxItems": MAX_IDS,
        "items": {"description": "a model id; anything that is not 24 hexadecimal characters (including a "
                                 "non-string) is answered per item as invalid_id, not as a 400"},
    }
    return {
        **generated_schemas(settings),
        "BatchIds": ids,
        "BatchRequest": {
            "description": f"One operation over at most {MAX_IDS} models. The body is checked as a whole first "
                           "(a malformed one changes nothing); then each id is handled on its own.",
            "oneOf": [
                closed({"operation": {"const": "delete"}, "ids": ref("BatchIds")}, title="delete"),
                closed({"operation": {"const": "update_status"}, "ids": ref("BatchIds"), "status": ref("Status")},
                       title="update_status"),
                closed({"operation": {"enum": ["add_tags", "remove_tags"]}, "ids": ref("BatchIds"),
                        "tags": ref("Tags")}, title="add_tags / remove_tags"),
            ],
        },
    }


# --------------------------------------------------------------------------- parameters and headers

def _header(description: str, schema: Json | None = None, required: bool = False) -> Json:
    h: Json = {"description": description, "schema": schema or {"type": "string"}}
    if required:
        h["required"] = True
    return h


def _query(name: str, description: str, schema: Json) -> Json:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _request_header(name: str, description: str) -> Json:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


def parameters(settings: Settings) -> Json:
    default_limit = min(10, settings.max_page_size)
    return {
        "ModelId": {"name": "id", "in": "path", "required": True,
                    "description": "the model's id (24 hex characters; upper case is accepted)",
                    "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{24}$"}},
        "ModelName": {"name": "name", "in": "path", "required": True, "description": shapes.NAME_RULE,
                      "schema": ref("ModelName")},
        "Version": _query("version", "this version of the name instead of the latest", ref("Version")),
        "FilePath": {"name": "path", "in": "path", "required": True,
                     "description": "the file's path in the version, as the manifest lists it, each segment "
                                    "percent-encoded and the segments joined by '/' (an encoded '/' inside a "
                                    "segment is refused with 400 invalid_path, as is a path the version does "
                                    "not have that breaks the path rules)",
                     "schema": {"type": "string", "minLength": 1}},
        "Page": _query("page", "page number", {"type": "integer", "minimum": 1, "maximum": 1_000_000, "default": 1}),
        "Limit": _query("limit", f"page size, at most MAX_PAGE_SIZE ({settings.max_page_size})",
                        {"type": "integer", "minimum": 1, "maximum": settings.max_page_size,
                         "default": default_limit}),
        "Sort": _query("sort", "created_at, name, download_count or metrics.<name>; a leading '-' sorts descending",
                       {"type": "string", "default": "-created_at",
                        "pattern": r"^-?(created_at|name|download_count|metrics\.[A-Za-z0-9_-]{1,100})$"}),
        "Algorithm": _query("algorithm", "only this algorithm (exact match; empty means no filter)",
                            {"type": "string", "maxLength": 200}),
        "StatusFilter": _query("status", "only this status (empty means no filter)",
                               {"anyOf": [ref("Status"), {"const": ""}]}),
        "TagsFilter": _query("tags", "comma-separated; models with any of these tags", {"type": "string"}),
        "Text": _query("q", "text search over name, description, algorithm and tags",
                       {"type": "string", "maxLength": 200}),
        "MinAccuracy": _query("min_accuracy", "only models whose metrics.accuracy is at least this (empty means "
                                              "no filter)", {"anyOf": [{"type": "number"}, {"const": ""}]}),
        "LatestOnly": _query("latest", "true: only each name's latest version (one row per name)",
                             {"type": "string", "enum": ["true", "false", ""], "default": "false"}),
        "CreatedBy": _query("created_by", "only models created by this user", {"type": "string", "maxLength": 200}),
        "Range": _request_header(
            "Range", f"bytes=a-b, bytes=a- or bytes=-n, comma-separated (at most {ranges.MAX_RANGES}); overlapping "
                     "and adjacent ranges are coalesced; a malformed header is ignored (200 with the whole file). "
                     "Ignored on HEAD."),
        "IfRange": _request_header("If-Range", "honour Range only if the file still has this strong ETag "
                                               "or exactly this Last-Modified date"),
        "IfMatch": _request_header("If-Match", "412 unless the file's ETag matches (strong comparison; * matches)"),
        "IfUnmodifiedSince": _request_header("If-Unmodified-Since",
                                             "412 if the file changed after this date (ignored with If-Match)"),
        "IfNoneMatch": _request_header("If-None-Match", "304 if the file's ETag matches (weak comparison; * matches)"),
        "IfModifiedSince": _request_header("If-Modified-Since",
                                           "304 if the file has not changed since (ignored with If-None-Match)"),
        "IfNoneMatchDocument": _request_header("If-None-Match", "304 without a body if the document's ETag matches "
                                                                "(weak comparison; * matches)"),
        "ChecksumHeader": {"name": "X-Checksum-Sha256", "in": "header", "required": False,
                           "description": "the file's expected SHA-256 (64 hex, optionally prefixed sha256:); "
                                          "422 checksum_mismatch and nothing stored if the content differs. "
                                          "An empty value counts as absent.",
                           "schema": {"type": "string", "pattern": "^$|" + SHA256_VALUE}},
        "ChecksumQuery": _query("sha256", "the same as X-Checksum-Sha256 (a non-empty header wins)",
                                {"type": "string", "pattern": SHA256_VALUE}),
        "Filename": _query("filename", "the file's name for a raw body (default <name>-<version>); only its last "
                                       "path component is kept, which must not be '.' or '..' nor over 255 bytes",
                           {"type": "string", "pattern": FILENAME}),
    }


def headers() -> Json:
    return {
        "ETag": _header('strong ETag: the file\'s SHA-256 in quotes', required=True),
        "DocumentETag": _header("strong ETag of the JSON document's bytes", required=True),
        "SnapshotETag": _header("strong ETag: the version's snapshot_digest hex (without sha256:) in quotes",
                                required=True),
        "XSnapshotDigest": _header("the version's snapshot_digest (sha256:<hex>); on a snapshot's tar",
                                   {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}),
        "TarFileChecksum": _header("sha256:<hex> of the file; absent on a snapshot's tar (see X-Snapshot-Digest)",
                                   {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}),
        "TarReprDigest": _header("RFC 9530 digest of the whole file; absent on a snapshot's tar"),
        "CacheControl": _header("no-cache: reuse only after revalidating with If-None-Match",
                                {"const": "no-cache"}, required=True),
        "WWWAuthenticate": _header('Bearer realm="model-service", charset="UTF-8"', required=True),
        "XRequestId": _header("the request's id: the client's X-Request-ID when it is 1-128 characters of "
                              "A-Z a-z 0-9 . _ : -, else a new one; log lines about the request carry it. "
                              "Absent only on answers given before the application runs (Expect: 100-continue "
                              "refusals, malformed HTTP)."),
        "LastModified": _header("when the file was uploaded (HTTP date)", required=True),
        "AcceptRanges": _header("always bytes", {"const": "bytes"}, required=True),
        "ContentDisposition": _header('attachment; filename="..." (plus filename*=UTF-8\'\'... for non-ASCII names)',
                                      required=True),
        "ContentLength": _header("body length in bytes", {"type": "integer", "minimum": 0}),
        "UnsatisfiedRange": _header("bytes */size", required=True),
        "XModelId": _header("the model's id", required=True),
        "XModelName": _header("the model's name", required=True),
        "XModelAlgorithm": _header("the model's algorithm (percent-encoded if not printable ASCII)", required=True),
        "XModelVersion": _header("the model's version", required=True),
        "XFileChecksum": _header("sha256:<hex>", {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                                 required=True),
        "ReprDigest": _header("RFC 9530 digest of the whole file: sha-256=:<base64>:", required=True),
        "RetryAfter": _header("seconds to wait before retrying", {"type": "integer"}, required=True),
        "Location": _header("the new model's URL", required=True),
        "UploadLocation": _header("the upload session's URL (/api/v1/uploads/<id>)", required=True),
        "UploadRange": _header("0-<offset-1>: the bytes the session holds (OCI's form, no unit); absent while "
                               "it holds none", {"type": "string", "pattern": "^0-[0-9]+$"}),
        "BlobLocation": _header("the blob's URL (/api/v1/blobs/sha256:<hex>)", required=True),
    }


# The headers every file response (200, 206, HEAD) carries.
_FILE_HEADERS = ("ETag", "LastModified", "AcceptRanges", "ContentDisposition", "XModelId", "XModelName",
                 "XModelAlgorithm", "XModelVersion", "XFileChecksum", "ReprDigest", "ContentLength")
_HEADER_NAMES = {"DocumentETag": "ETag", "CacheControl": "Cache-Control",
                 "WWWAuthenticate": "WWW-Authenticate", "XRequestId": REQUEST_ID_HEADER,
                 "LastModified": "Last-Modified", "AcceptRanges": "Accept-Ranges",
                 "ContentDisposition": "Content-Disposition", "ContentLength": "Content-Length",
                 "UnsatisfiedRange": "Content-Range", "XModelId": "X-Model-Id",
                 "XModelName": "X-Model-Name", "XModelAlgorithm": "X-Model-Algorithm",
                 "XModelVersion": "X-Model-Version", "XFileChecksum": "X-File-Checksum",
                 "ReprDigest": "Repr-Digest", "RetryAfter": "Retry-After", "SnapshotETag": "ETag",
                 "XSnapshotDigest": "X-Snapshot-Digest", "TarFileChecksum": "X-File-Checksum",
                 "TarReprDigest": "Repr-Digest", "UploadLocation": "Location", "UploadRange": "Range",
                 "BlobLocation": "Location"}


# /download: the file of a single-file version, or a snapshot's tar, which has no checksum of its own.
_DOWNLOAD_HEADERS = tuple({"XFileChecksum": "TarFileChecksum", "ReprDigest": "TarReprDigest"}.get(n, n)
                          for n in _FILE_HEADERS) + ("XSnapshotDigest",)


def _component_names(names: tuple[str, ...], headers: tuple[str, ...]) -> tuple[str, ...]:
    by_header = {_HEADER_NAMES.get(n, n): n for n in names}
    return tuple(by_header[h] for h in headers)


# What a 304 repeats (RFC 9110 15.4.5): the headers downloads.send repeats, by component name.
_NOT_MODIFIED_HEADERS = _component_names(_FILE_HEADERS, downloads.NOT_MODIFIED_HEADERS)
_DOWNLOAD_NOT_MODIFIED_HEADERS = _component_names(
    _DOWNLOAD_HEADERS, tuple(dict.fromkeys(downloads.NOT_MODIFIED_HEADERS + downloads.TAR_NOT_MODIFIED_HEADERS)))


def header_refs(*names: str) -> Json:
    return {_HEADER_NAMES.get(n, n): ref(n, "headers") for n in names}


# --------------------------------------------------------------------------- shared responses

def _download_busy_codes(settings: Settings) -> tuple[ErrorCode, ...]:
    return (errors.TOO_MANY_DOWNLOADS,) if settings.max_concurrent_downloads else ()


def _upload_busy_codes(settings: Settings) -> tuple[ErrorCode, ...]:
    return (errors.TOO_MANY_UPLOADS,) if settings.max_concurrent_uploads else ()


def _upload_answers(settings: Settings) -> Json:
    """What an upload can meet beyond its own errors: a stalled body, the upload caps."""
    answers = {"408": error_response(errors.REQUEST_TIMEOUT), "503": shared("UploadUnavailable")}
    per_client = (errors.TOO_MANY_CLIENT_UPLOADS,) if settings.max_uploads_per_client else ()
    limited = (errors.RATE_LIMITED,) if settings.rate_limit else ()
    if per_client or limited:
        answers["429"] = error_response(*limited, *per_client, headers=header_refs("RetryAfter"))
    return answers


def responses(settings: Settings) -> Json:
    retry = header_refs("RetryAfter")
    return {
        # Every operation but /health's can meet a draining instance; most also reach the store.
        "Unavailable": error_response(errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, headers=retry),
        "ShuttingDown": error_response(errors.SHUTTING_DOWN, headers=retry),
        "UploadUnavailable": error_response(
            errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, *_upload_busy_codes(settings), headers=retry),
        "DownloadUnavailable": error_response(
            errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, *_download_busy_codes(settings), headers=retry),
        "InvalidModelId": error_response(errors.INVALID_ID),
        "ModelNotFound": error_response(errors.NOT_FOUND),
        "InvalidParameter": error_response(errors.INVALID_PARAMETER),
        "JsonTooLarge": error_response(errors.PAYLOAD_TOO_LARGE),
        "VersionConflict": error_response(errors.VERSION_EXISTS, errors.VERSION_CONFLICT),
        "ChecksumMismatch": error_response(errors.CHECKSUM_MISMATCH),
    }


def missing_blobs_response(*others: ErrorCode) -> Json:
    """422 of a commit (missing_blobs, whose error object also lists the digests), or of ``others``."""
    plain = error_response(*others) if others else None
    schema = ref("MissingBlobsError")
    if plain is not None:
        schema = {"anyOf": [plain["content"]["application/json"]["schema"], schema]}
    return {
        "description": (plain["description"] + "; " if plain else f"{_REASONS[422]}: ")
        + f"`missing_blobs` ({errors.MISSING_BLOBS.description})",
        "x-error-codes": [e.code for e in others] + [errors.MISSING_BLOBS.code],
        "content": json_content(schema, {"error": {
            "code": "missing_blobs", "message": errors.MISSING_BLOBS.description,
            "missing": ["sha256:" + "0" * 64]}}),
    }


def offset_mismatch_response() -> Json:
    """416 of an upload session chunk that does not start at the offset (its error object carries it)."""
    e = errors.UPLOAD_OFFSET_MISMATCH
    return {
        "description": f"{_REASONS[416]}: `{e.code}` ({e.description})",
        "x-error-codes": [e.code],
        "headers": header_refs("UploadLocation", "UploadRange"),
        "content": json_content(ref("UploadOffsetError"), {"error": {"code": e.code, "message": e.description,
                                                                    "offset": 1048576}}),
    }


def shared(name: str) -> Json:
    return ref(name, "responses")


# Stateful testing (schemathesis) follows these from one answer to the next operation.
_BY_MODEL_ID = {"id": "$response.body#/model_id"}
LINKS: Json = {
    "GetModel": {"operationId": "getModel", "parameters": _BY_MODEL_ID},
    "UpdateModel": {"operationId": "updateModel", "parameters": _BY_MODEL_ID},
    "DeleteModel": {"operationId": "deleteModel", "parameters": _BY_MODEL_ID},
    "UploadModelFile": {"operationId": "uploadModelFile", "parameters": _BY_MODEL_ID},
    "ListVersions": {"operationId": "listVersions", "parameters": _BY_MODEL_ID},
    "CreateVersion": {"operationId": "createVersion", "parameters": _BY_MODEL_ID},
    "DownloadModel": {"operationId": "downloadModel", "parameters": _BY_MODEL_ID},
    "ModelFileInfo": {"operationId": "modelFileInfo", "parameters": _BY_MODEL_ID},
    # From a model document, whose id is under "id" (answers carry "model_id").
    "DownloadThisModel": {"operationId": "downloadModel", "parameters": {"id": "$response.body#/id"}},
    "ListVersionsOfThisModel": {"operationId": "listVersions", "parameters": {"id": "$response.body#/id"}},
    "FilesOfThisModel": {"operationId": "modelFiles", "parameters": {"id": "$response.body#/id"}},
    "GetModelByName": {"operationId": "getModelByName", "parameters": {"name": "$response.body#/name"}},
    "DownloadModelByName": {"operationId": "downloadModelByName", "parameters": {"name": "$response.body#/name"}},
}


def links(*names: str) -> Json:
    return {name: ref(name, "links") for name in names}


def answer(description: str, schema_name: str, status_headers: Json | None = None,
           follow: Json | None = None) -> Json:
    out: Json = {"description": description, "content": json_content(ref(schema_name))}
    if status_headers:
        out["headers"] = status_headers
    if follow:
        out["links"] = follow
    return out


# --------------------------------------------------------------------------- operations

def op(op_id: str, tag: str, summary: str, responses_: Json, *, description: str | None = None,
       params: list[Json] | None = None, body: Json | None = None) -> Json:
    out: Json = {"operationId": op_id, "tags": [tag], "summary": summary}
    if description:
        out["description"] = description
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = body
    out["responses"] = dict(sorted(responses_.items()))
    return out


def p(name: str) -> Json:
    return ref(name, "parameters")


def json_request(schema_name: str, description: str) -> Json:
    return {"required": True, "description": description, "content": json_content(ref(schema_name))}


def _download_ops(op_id: str, summary: str, params: list[Json], bad_request: tuple[ErrorCode, ...],
                  not_found: tuple[ErrorCode, ...], *, tar: bool = False, counted: bool = True,
                  content_type: str = "application/octet-stream") -> tuple[Json, Json]:
    """GET and HEAD of a model file (or, with ``tar``, of a snapshot's tar), as downloads.send serves them."""
    conditional = [p("IfMatch"), p("IfUnmodifiedSince"), p("IfNoneMatch"), p("IfModifiedSince")]
    description = (
        "Sends the model file like a static file server: byte ranges and conditional requests per RFC 9110, "
        "evaluated in the RFC's order (If-Match / If-Unmodified-Since, then If-None-Match / If-Modified-Since, "
        "then If-Range and Range). "
        + ("A response that includes byte 0 counts as a download. " if counted else
           "Never counted as a download (the version's manifest is). ")
        + "If the store fails mid-body the connection is aborted, so the client sees fewer bytes than "
        "Content-Length, never a short body that looks complete."
    )
    if tar:
        description += (
            " A version made by a commit of files (a snapshot) is sent as one deterministic, uncompressed "
            "POSIX tar (application/x-tar, `<name>-<version>.tar`): entries in path order, mode 0644, owner "
            "0/0, mtime the version's creation, long or non-ASCII paths in pax headers, no directory "
            "entries. Its length is known up front, its ETag is the snapshot digest, and ranges work on "
            "it as on any file, so `curl -C -` resumes it.")
    file_headers = _DOWNLOAD_HEADERS if tar else _FILE_HEADERS
    not_modified = _DOWNLOAD_NOT_MODIFIED_HEADERS if tar else _NOT_MODIFIED_HEADERS
    content = {content_type: {"schema": BINARY}}
    if tar:
        content["application/x-tar"] = {"schema": BINARY}
    # HEAD answers every status with GET's headers and no body.
    get_responses = {
        "200": {"description": "the whole file", "headers": header_refs(*file_headers), "content": content},
        "206": {
            "description": "the requested range (with Content-Range), or several ranges as "
                           "multipart/byteranges, each part with its own Content-Type and "
                           "Content-Range and no Content-Range on the response",
            "headers": {**header_refs(*file_headers),
                        "Content-Range": {"description": "bytes first-last/size; single range only",
                                          "schema": {"type": "string", "pattern": r"^bytes \d+-\d+/\d+$"}}},
            "content": {**content, "multipart/byteranges": {"schema": BINARY}},
        },
        "304": {"description": "If-None-Match / If-Modified-Since matched: no body",
                "headers": header_refs(*not_modified)},
        "400": error_response(*bad_request),
        "404": error_response(*not_found),
        "412": error_response(errors.PRECONDITION_FAILED, headers=header_refs("ETag")),
        "416": error_response(errors.RANGE_NOT_SATISFIABLE, headers=header_refs("UnsatisfiedRange", "AcceptRanges")),
        "503": shared("DownloadUnavailable"),
    }
    head_responses = {
        "200": {"description": "the headers a GET without Range would send", "headers": header_refs(*file_headers)},
        "304": get_responses["304"],
        "400": error_response(*bad_request, body=False),
        "404": error_response(*not_found, body=False),
        "412": error_response(errors.PRECONDITION_FAILED, headers=header_refs("ETag"), body=False),
        # HEAD stops before taking a download slot, so never too_many_downloads.
        "503": error_response(errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, headers=header_refs("RetryAfter"),
                              body=False),
    }
    return (
        op(op_id, "files", summary, get_responses, description=description,
           params=params + [p("Range"), p("IfRange")] + conditional),
        op(op_id + "Head", "files", summary + " (headers only)", head_responses,
           description="The headers GET would send, without the body. Range is ignored, and a HEAD "
                       "never counts as a download.",
           params=params + conditional),
    )


def _manifest_ops(op_id: str, summary: str, params: list[Json],
                  bad_request: tuple[ErrorCode, ...]) -> tuple[Json, Json]:
    """GET and HEAD of a version's manifest (handlers.files.manifest)."""
    cache_headers = header_refs("SnapshotETag", "CacheControl", "XModelId", "XModelName", "XModelVersion")
    not_modified = {"description": "If-None-Match matched the snapshot digest: no body", "headers": cache_headers}
    description = (
        "The version's files with their sizes and sha256s, and its snapshot digest, which is also the strong "
        "ETag: a client holding a version revalidates all of it with one If-None-Match (304). A GET answered "
        "200 counts one download of the version (a pull starts here; the files it then reads do not count).")
    get = op(op_id, "files", summary, {
        "200": answer("the manifest", "SnapshotManifest", cache_headers),
        "304": not_modified,
        "400": error_response(*bad_request),
        "404": error_response(errors.NOT_FOUND, errors.NO_FILE),
        "503": shared("Unavailable"),
    }, description=description, params=params + [p("IfNoneMatchDocument")])
    head = op(op_id + "Head", "files", summary + " (headers only)", {
        "200": {"description": "the headers GET would send", "headers": cache_headers},
        "304": not_modified,
        "400": error_response(*bad_request, body=False),
        "404": error_response(errors.NOT_FOUND, errors.NO_FILE, body=False),
        "503": error_response(errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, headers=header_refs("RetryAfter"),
                              body=False),
    }, description="The headers GET would send, without the body; never counted as a download.",
        params=params + [p("IfNoneMatchDocument")])
    return get, head


def _by_id(*operations_: Json) -> dict[str, Json]:
    return {o["operationId"]: o for o in operations_}


def paths(settings: Settings) -> Json:
    """Each route of routes.API with its operation; HEAD where aiohttp's automatic one is documented."""
    ops = operations(settings)
    out: Json = {}
    for route in routes.API:
        for method, op_id in route.methods():
            if op_id is not None:
                out.setdefault(route.template, {})[method.lower()] = ops.pop(op_id)
    if ops:
        raise ValueError(f"operations with no route in routes.API: {sorted(ops)}")
    return out


def operations(settings: Settings) -> dict[str, Json]:
    """Every API operation by operationId; routes.API says where each one is served."""
    max_file = f"MAX_FILE_SIZE ({format_size(settings.max_file_size)}, {settings.max_file_size} bytes)"
    model_id = [p("ModelId")]
    listing_params = [p("Algorithm"), p("StatusFilter"), p("TagsFilter"), p("Text"), p("MinAccuracy"), p("LatestOnly"),
                      p("CreatedBy"), p("Sort"), p("Page"), p("Limit")]
    listing = op("listModels", "models", "List and search models", {
        "200": answer("one page of models", "ModelList"),
        "400": shared("InvalidParameter"),
        "503": shared("Unavailable"),
    }, params=listing_params,
        description="Filters combine with AND; `tags` matches models with any of the listed tags.")
    statistics = op("registryStatistics", "analytics", "Registry statistics", {
        "200": answer("totals, distributions, storage use and recent activity, computed by the database",
                      "Statistics"),
        "503": shared("Unavailable"),
    })
    created = answer("registered", "RegistrationAnswer", header_refs("Location"), links(
        "GetModel", "UpdateModel", "UploadModelFile", "ListVersions", "CreateVersion", "DeleteModel"))
    json_limit = f"JSON bodies are at most MAX_JSON_SIZE ({settings.max_json_size} bytes)."
    commit_limit = (f" A body with `files` may be larger by {snapshots.BODY_ALLOWANCE_PER_FILE} bytes per "
                    f"MAX_FILES_PER_VERSION ({settings.max_files_per_version}).")
    commit_text = (
        "A JSON body with `files` commits a multi-file snapshot: each file's blob must be stored first "
        f"(`POST {BLOBS}/missing`, `PUT {BLOBS}/sha256:<hex>`); the version is created with all its files "
        "in one step, or not at all (422 `missing_blobs` lists the digests to upload). ")
    blob_digest = [{"name": "digest", "in": "path", "required": True,
                    "description": "sha256: and the content's 64 lowercase hexadecimal digits",
                    "schema": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}}]

    def cacheable_document(op_id: str, summary: str, params: list[Json], bad: tuple[ErrorCode, ...]) -> Json:
        """GET of a model document (http.json.conditional_json): ETag, Cache-Control: no-cache, 304."""
        cache_headers = header_refs("DocumentETag", "CacheControl")
        return op(op_id, "models", summary, {
            "200": answer("the full model document", "Model", cache_headers,
                          links("GetModelByName", "DownloadThisModel", "ListVersionsOfThisModel", "FilesOfThisModel")
                          if op_id == "getModel" else None),
            "304": {"description": "If-None-Match matched the document's ETag: no body", "headers": cache_headers},
            "400": error_response(*bad),
            "404": shared("ModelNotFound"),
            "503": shared("Unavailable"),
        }, params=params + [p("IfNoneMatchDocument")],
            description="Carries an ETag of the document; pollers send it back in If-None-Match and get 304 "
                        "with no body until the document changes.")
    upload_body = {
        "required": False,
        "description": "The file, as the raw body (an empty body stores an empty file) or as the 'file' part of a "
                       "multipart body (other parts are ignored). Streamed into the store while hashed; "
                       f"at most {max_file}. With `Expect: 100-continue` an oversized Content-Length is "
                       "refused with 413 before the body is sent.",
        "content": {
            "application/octet-stream": {"schema": BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": BINARY}, "required": ["file"]},
                "encoding": {"file": {"contentType": "application/octet-stream"}},
            },
        },
    }
    upload = op("uploadModelFile", "files", "Upload or replace the model's file", {
        "201": answer("stored and attached; the model's previous file is released unless another model shares it",
                      "UploadAnswer", follow=links("DownloadModel", "ModelFileInfo", "GetModel")),
        "400": error_response(errors.INVALID_ID, errors.INVALID_CHECKSUM, errors.INVALID_FILENAME, errors.MISSING_FILE,
                              errors.INVALID_MULTIPART, errors.TOO_MANY_PARTS),
        "404": shared("ModelNotFound"),
        "413": error_response(errors.FILE_TOO_LARGE),
        "422": shared("ChecksumMismatch"),
        **_upload_answers(settings),
    }, params=model_id + [
        p("ChecksumHeader"), p("ChecksumQuery"), p("Filename"),
        _request_header("Content-Disposition", "alternative to ?filename= for a raw body: "
                                               "attachment; filename=\"...\""),
    ], body=upload_body)

    upload_id = [{"name": "upload_id", "in": "path", "required": True,
                  "description": "the session's id, as POST answered it (24 lowercase hex digits; anything else "
                                 "is 404 upload_not_found, as an unknown, expired or another key's session is)",
                  "schema": {"type": "string", "pattern": "^[0-9a-f]{24}$"}}]
    session_headers = header_refs("UploadLocation", "UploadRange")
    blob_stored = answer("stored: the blob's digest and size", "BlobAnswer", header_refs("BlobLocation"))
    busy = error_response(errors.UPLOAD_BUSY, headers=header_refs("RetryAfter"))
    chunk_headers = [
        _request_header("Content-Range", "bytes <start>-<end>/<total or *>, or OCI's <start>-<end>; start must be "
                                         "the session's offset. Without it the body is appended at the offset"),
        _request_header("Content-Digest", "RFC 9530, e.g. sha-256=:<base64>:; the sha-256 member is verified over "
                                          "this chunk's bytes before it counts (other algorithms are ignored)"),
    ]
    chunk_body = {"required": False, "description": f"the chunk's bytes (the whole content at most {max_file})",
                  "content": {"application/octet-stream": {"schema": BINARY}}}
    chunk_rule = (
        "A chunk counts whole or not at all: a failed check, or a client that leaves mid-body, leaves the offset "
        "where it was and this request's bytes are discarded. The upload slots, BODY_TIMEOUT and "
        "Expect: 100-continue work as for an upload.")
    session_cap = (errors.TOO_MANY_UPLOAD_SESSIONS,) + ((errors.RATE_LIMITED,) if settings.rate_limit else ())
    upload_session_ops = (
        op("openUploadSession", "uploads", "Open a resumable upload session", {
            "201": blob_stored,
            "202": answer("opened: PATCH chunks to its Location", "UploadSessionAnswer", session_headers),
            "400": error_response(errors.INVALID_JSON, errors.VALIDATION_ERROR, errors.UNKNOWN_FIELD),
            "413": error_response(errors.PAYLOAD_TOO_LARGE, errors.FILE_TOO_LARGE),
            "429": error_response(*session_cap, headers=header_refs("RetryAfter")),
            "503": error_response(errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, errors.UPLOAD_SESSIONS_FULL,
                                  headers=header_refs("RetryAfter")),
        }, description=(
            "OCI-style resumable upload: open, PATCH chunks at the offset, PUT ?digest= to complete; the result "
            "is a blob, attached with a snapshot commit or `POST /api/v1/models/{id}/upload?digest=`. When "
            "`checksum` names a stored blob (of `size_bytes`, if given) the answer is 201 at once and the blob is "
            "kept for BLOB_GRACE. At most MAX_UPLOAD_SESSIONS open sessions per API key (429) and "
            "MAX_UPLOAD_SESSIONS_TOTAL in all (503); a session idle for UPLOAD_SESSION_TTL expires."),
            body={"required": False, "description": "optional; an empty body announces nothing",
                  "content": json_content(ref("UploadSessionRequest"))}),
        op("getUploadSession", "uploads", "An upload session's offset (to resume from)", {
            "200": answer("the session", "UploadSessionAnswer", session_headers),
            "404": error_response(errors.UPLOAD_NOT_FOUND),
            "503": shared("Unavailable"),
        }, params=upload_id, description="OCI answers 204; this adds the session as JSON for people reading it."),
        op("headUploadSession", "uploads", "An upload session's offset, headers only", {
            "200": {"description": "the session's Range and Location", "headers": session_headers},
            "404": error_response(errors.UPLOAD_NOT_FOUND, body=False),
            "503": error_response(errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN,
                                  headers=header_refs("RetryAfter"), body=False),
        }, params=upload_id),
        op("appendUploadChunk", "uploads", "Append a chunk at the session's offset", {
            "202": answer("the chunk counted: the new offset", "UploadSessionAnswer", session_headers),
            "400": error_response(errors.INVALID_CONTENT_RANGE, errors.INVALID_DIGEST),
            "404": error_response(errors.UPLOAD_NOT_FOUND),
            "409": busy,
            "413": error_response(errors.FILE_TOO_LARGE),
            "416": offset_mismatch_response(),
            "422": error_response(errors.DIGEST_MISMATCH),
            **_upload_answers(settings),
        }, params=upload_id + chunk_headers, body={**chunk_body, "required": True}, description=chunk_rule),
        op("completeUploadSession", "uploads", "Complete a session: its content becomes a blob", {
            "201": blob_stored,
            "400": error_response(errors.INVALID_DIGEST, errors.INVALID_CONTENT_RANGE),
            "404": error_response(errors.UPLOAD_NOT_FOUND),
            "409": busy,
            "413": error_response(errors.FILE_TOO_LARGE),
            "416": offset_mismatch_response(),
            "422": error_response(errors.SIZE_MISMATCH, errors.DIGEST_MISMATCH),
            **_upload_answers(settings),
        }, params=upload_id + [
            {"name": "digest", "in": "query", "required": True, "description": "the whole content's sha256",
             "schema": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}}] + chunk_headers,
            body=chunk_body, description=(
                "Optionally with a last chunk (the rules of PATCH). The content must hash to ?digest= (and to "
                "the checksum and size announced at POST), else 422 and the session stays, with the last chunk "
                "if it passed its own checks. Then it is stored as PUT /api/v1/blobs stores a blob "
                "(deduplicated, kept for BLOB_GRACE) and the session is gone. " + chunk_rule)),
        op("cancelUploadSession", "uploads", "Cancel a session and free its bytes", {
            "204": {"description": "cancelled"},
            "404": error_response(errors.UPLOAD_NOT_FOUND),
            "409": busy,
            "503": shared("Unavailable"),
        }, params=upload_id),
    )
    upload = {**upload, "parameters": upload["parameters"] + [
        _query("digest", "attach this stored blob (an upload session's result) instead of sending a body: "
                         "sha256:<hex>; with a body, 400", {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"})]}
    upload["responses"]["400"] = error_response(
        errors.INVALID_ID, errors.INVALID_CHECKSUM, errors.INVALID_FILENAME, errors.MISSING_FILE,
        errors.INVALID_MULTIPART, errors.TOO_MANY_PARTS, errors.INVALID_DIGEST, errors.INVALID_PARAMETER)
    upload["responses"]["422"] = missing_blobs_response(errors.CHECKSUM_MISMATCH)

    return _by_id(
        *upload_session_ops,
        op("health", "operations", "Liveness: does the service answer and reach its store", {
            "200": answer("healthy", "Health"),
            "503": answer("unhealthy: the store did not answer (see error), or the instance is draining", "Health"),
        }),
        op("healthDetailed", "operations", "Readiness: storage, files, disk and registry", {
            "200": answer("every check is healthy", "DetailedHealth"),
            "503": answer("at least one check failed (or the instance is draining); each check says why",
                          "DetailedHealth"),
        }),
        op("metrics", "operations", "Prometheus metrics", {
            "200": {"description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            "503": shared("ShuttingDown"),
        }, description="Counters and histograms for downloads, uploads, registrations and requests; registry "
                       "gauges are read from the database at scrape time (a storage failure leaves them as they "
                       "were and is counted, the scrape still answers 200). Sums over all workers."),
        op("openapi", "operations", "This OpenAPI 3.1 document", {
            "200": {"description": "the document", "content": json_content(
                {"type": "object", "required": ["openapi", "info", "paths"]})},
            "503": shared("ShuttingDown"),
        }),
        op("docs", "operations", "This API as a static HTML page (no external resources)", {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
            "503": shared("ShuttingDown"),
        }),
        listing,
        op("registerModel", "models", "Register a model (optionally with its file)", {
            "201": created,
            "400": error_response(*BODY_CODES, errors.MISSING_METADATA, errors.MISSING_FILE, errors.INVALID_FILENAME,
                                  errors.INVALID_MULTIPART, errors.TOO_MANY_PARTS,
                                  errors.INVALID_CHECKSUM, *COMMIT_CODES),
            "409": shared("VersionConflict"),
            "413": error_response(errors.PAYLOAD_TOO_LARGE, errors.FILE_TOO_LARGE),
            "422": missing_blobs_response(errors.CHECKSUM_MISMATCH),
            **_upload_answers(settings),
        }, description=(
            "A JSON body registers the metadata (any Content-Type that is not multipart is read as JSON). "
            "A multipart/form-data body registers and uploads at once: a 'metadata' part holding the JSON "
            "object and a 'file' part, in either order; the model is created only once both arrived intact. "
            "The first version of a name is v1.0; registering the name again makes the next version with "
            "parent_model_id pointing at the previous latest. X-Checksum-Sha256 and ?sha256= apply to the "
            "multipart file only. " + commit_text + json_limit + commit_limit),
            params=[p("ChecksumHeader"), p("ChecksumQuery")],
            body={"required": True, "content": {
                **json_content(ref("ModelRegistration")),
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["metadata", "file"],
                               "properties": {"metadata": ref("ModelRegistration"), "file": BINARY}},
                    "encoding": {"metadata": {"contentType": "application/json"},
                                 "file": {"contentType": "application/octet-stream"}},
                },
            }}),
        {**listing, "operationId": "searchModels", "summary": f"List and search models (the same as GET {MODELS})"},
        statistics,
        {**statistics, "operationId": "registryStatisticsAlias",
         "summary": f"Registry statistics (alias of {MODELS}/statistics)"},
        op("popularModels", "analytics", "Most downloaded models", {
            "200": answer("models by download count, highest first", "ModelTop"),
            "400": shared("InvalidParameter"),
            "503": shared("Unavailable"),
        }, params=[p("Limit")]),
        op("recentModels", "analytics", "Newest models", {
            "200": answer("models by creation time, newest first", "ModelTop"),
            "400": shared("InvalidParameter"),
            "503": shared("Unavailable"),
        }, params=[p("Limit")]),
        op("batchModels", "models", "One operation over many models", {
            "200": answer("what happened to each id; a bad or unknown id never fails the batch", "BatchAnswer"),
            "400": error_response(errors.INVALID_JSON, errors.UNKNOWN_FIELD, errors.VALIDATION_ERROR),
            "413": shared("JsonTooLarge"),
            "503": shared("Unavailable"),
        }, body=json_request("BatchRequest", "delete, update_status (with status), add_tags or remove_tags "
                                             "(with tags). " + json_limit)),
        cacheable_document(
            "getModelByName", "The latest version of a name (or ?version=)", [p("ModelName"), p("Version")],
            (errors.VALIDATION_ERROR, errors.INVALID_PARAMETER)),
        *_download_ops(
            "downloadModelByName", "Download the latest version's file or tar (or ?version=)",
            [p("ModelName"), p("Version")], (errors.VALIDATION_ERROR, errors.INVALID_PARAMETER),
            (errors.NOT_FOUND, errors.NO_FILE), tar=True),
        *_manifest_ops("modelFilesByName", "The files of the latest version (or ?version=)",
                       [p("ModelName"), p("Version")], (errors.VALIDATION_ERROR, errors.INVALID_PARAMETER)),
        *_download_ops(
            "downloadFileByName", "One file of the latest version (or ?version=)",
            [p("ModelName"), p("FilePath"), p("Version")],
            (errors.VALIDATION_ERROR, errors.INVALID_PARAMETER, errors.INVALID_PATH),
            (errors.NOT_FOUND, errors.NO_FILE), counted=False, content_type="*/*"),
        cacheable_document("getModel", "The full model document", model_id, (errors.INVALID_ID,)),
        op("updateModel", "models", "Update the mutable fields", {
            "200": answer("updated", "UpdateAnswer"),
            "400": error_response(errors.INVALID_ID, *BODY_CODES),
            "404": shared("ModelNotFound"),
            "413": shared("JsonTooLarge"),
            "503": shared("Unavailable"),
        }, params=model_id, body=json_request("ModelUpdate", "hyperparameters, metrics, dataset_info, tags, "
                                                             "status, description. " + json_limit)),
        op("deleteModel", "models", "Delete a model and (unless shared) its file", {
            "200": answer("deleted", "DeleteAnswer"),
            "400": shared("InvalidModelId"),
            "404": shared("ModelNotFound"),
            "503": shared("Unavailable"),
        }, params=model_id),
        op("listVersions", "models", "Every version of the model's name, newest first", {
            "200": answer("the versions", "VersionList"),
            "400": shared("InvalidModelId"),
            "404": shared("ModelNotFound"),
            "503": shared("Unavailable"),
        }, params=model_id),
        op("createVersion", "models", "A new version made from this one", {
            "201": created,
            "400": error_response(errors.INVALID_ID, *BODY_CODES, *COMMIT_CODES),
            "404": shared("ModelNotFound"),
            "409": shared("VersionConflict"),
            "413": shared("JsonTooLarge"),
            "422": missing_blobs_response(),
            "503": shared("Unavailable"),
        }, params=model_id, body=json_request(
            "NewVersion", "what changes; the rest (no file) is inherited from this model. The next "
                          "version follows the name's latest, v(MAJOR+1).0 with breaking_changes. "
                          + commit_text + json_limit + commit_limit)),
        {**upload, "operationId": "uploadModelFilePost"},
        upload,
        *_download_ops("downloadModel", "Download the model's file, or its snapshot as a tar", model_id,
                       (errors.INVALID_ID,), (errors.NOT_FOUND, errors.NO_FILE), tar=True),
        op("modelFileInfo", "files", "The file's metadata, without the body", {
            "200": answer("the file's metadata", "FileInfo"),
            "400": shared("InvalidModelId"),
            "404": error_response(errors.NOT_FOUND, errors.NO_FILE),
            "503": shared("Unavailable"),
        }, params=model_id),
        *_manifest_ops("modelFiles", "The version's files: paths, sizes, sha256s and the snapshot digest",
                       model_id, (errors.INVALID_ID,)),
        *_download_ops("downloadFile", "One file of the version", model_id + [p("FilePath")],
                       (errors.INVALID_ID, errors.INVALID_PATH), (errors.NOT_FOUND, errors.NO_FILE), counted=False,
                       content_type="*/*"),
        op("blobsMissing", "blobs", "Which of these blobs are not stored yet", {
            "200": answer("the digests not stored, in request order, each once", "BlobsMissingAnswer"),
            "400": error_response(*BODY_CODES[:1], errors.VALIDATION_ERROR, errors.UNKNOWN_FIELD),
            "413": shared("JsonTooLarge"),
            "503": shared("Unavailable"),
        }, description="The stored ones are kept for BLOB_GRACE from now even if no version refers to them, "
                       "so the commit that follows finds them. " + json_limit,
            body=json_request("BlobsMissingRequest", "the digests of the files to commit")),
        op("putBlob", "blobs", "Store one blob by its sha256", {
            "200": answer("already stored: nothing of the body was read (the connection closes if it had one)",
                          "BlobAnswer"),
            "201": answer("stored", "BlobAnswer"),
            "400": error_response(errors.INVALID_DIGEST),
            "413": error_response(errors.FILE_TOO_LARGE),
            "422": error_response(errors.DIGEST_MISMATCH),
            **_upload_answers(settings),
        }, description="The raw body is streamed into the store while hashed, with the limits of an upload "
                       f"(at most {max_file}, the upload slots, BODY_TIMEOUT); a body that does not hash to "
                       "the digest is discarded. A blob no version refers to is kept for BLOB_GRACE, then "
                       "`model-service gc` removes it.",
            params=blob_digest, body={"required": False, "description": "the blob's bytes",
                                      "content": {"application/octet-stream": {"schema": BINARY}}}),
        op("headBlob", "blobs", "Whether a blob is stored, and its size", {
            "200": {"description": "stored; Content-Length is its size",
                    "headers": {"Content-Length": {"schema": COUNT}}},
            "400": error_response(errors.INVALID_DIGEST, body=False),
            "404": error_response(errors.NOT_FOUND, body=False),
            "503": error_response(errors.STORAGE_UNAVAILABLE, errors.SHUTTING_DOWN, headers=header_refs("RetryAfter"),
                                  body=False),
        }, params=blob_digest),
    )


# --------------------------------------------------------------------------- the document

def _description(settings: Settings) -> str:
    rows = "\n".join(f"| `{e.code}` | {e.status} | {e.description} |" for e in errors.REGISTRY.values())
    if settings.enable_auth:
        access = ("API keys are required (ENABLE_AUTH=true): `X-API-Key: <key>` or `Authorization: Bearer <key>`, "
                  "except on " + ", ".join(f"`{p}`" for p in settings.auth_open_paths) + ". Scopes nest: "
                  "read (GET, HEAD) < write (register, update, upload, versions) < admin (delete, batch); each "
                  "operation's `x-required-scope` names its scope. `created_by` defaults to the key's name.")
    else:
        access = "API keys are not enforced on this instance (ENABLE_AUTH=false)."
    limits = []
    if settings.rate_limit:
        limits.append(f"RATE_LIMIT {settings.rate_limit.count} per {settings.rate_limit.seconds} s")
    if settings.download_rate_limit:
        limits.append(f"DOWNLOAD_RATE_LIMIT {settings.download_rate_limit.count} per "
                      f"{settings.download_rate_limit.seconds} s")
    rates = ("Rate limits per client (429 `rate_limited` with Retry-After): " + ", ".join(limits) + "."
             if limits else "No rate limits are configured.")
    return (
        "The TensorFleet model registry: model metadata (versions, lineage, metrics, tags, status) and the "
        "model files, streamed in and out.\n\n"
        "Model ids are 24-hex ObjectId strings; timestamps are ISO-8601 UTC with milliseconds and a Z. "
        "Every error is `{\"error\": {\"code\": ..., \"message\": ...}}` with the matching status: also a "
        "path with no route (404 `not_found`), a method the path does not take (405 `method_not_allowed`, "
        "with Allow), and any unexpected failure (500 `internal_error`, details logged server-side only). "
        "Operations that reach the store answer 503 `storage_unavailable` with Retry-After while it is "
        "unreachable, and every operation but the health checks answers 503 `shutting_down` while the "
        "instance drains. Every answer carries X-Request-ID (the client's own, if sane).\n\n"
        f"{access} {rates}\n\n"
        f"Limits: JSON bodies MAX_JSON_SIZE ({settings.max_json_size} bytes); files MAX_FILE_SIZE "
        f"({format_size(settings.max_file_size)}); pages MAX_PAGE_SIZE ({settings.max_page_size}); "
        f"{ranges.MAX_RANGES} ranges per request; {MAX_IDS} ids per batch; request line MAX_URL_LENGTH "
        f"({settings.max_url_length} bytes) and header fields MAX_HEADER_SIZE ({settings.max_header_size} bytes), "
        "beyond which the HTTP parser answers 400 or 431 before the application runs; "
        + (f"MAX_CONCURRENT_DOWNLOADS {settings.max_concurrent_downloads} bodies streaming per process "
           f"(then a wait of up to DOWNLOAD_QUEUE_SECONDS, {settings.download_queue_seconds:g} s, "
           "for a slot, then 503 `too_many_downloads`)."
           if settings.max_concurrent_downloads else "no cap on concurrent downloads.")
        + "\n\n| code | status | meaning |\n| --- | --- | --- |\n" + rows
    )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("tensorfleet-model-service")
    except Exception:  # not installed as a package (running from a checkout)
        return "0.1.0"


def _operations(doc: Json):
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def _add_cross_cutting(doc: Json, settings: Settings) -> None:
    """What the middlewares add to every operation: API keys, rate limits, request ids."""
    components = doc["components"]
    shared_responses = components["responses"]
    open_paths = set(settings.auth_open_paths)
    if settings.enable_auth:
        components["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "BearerKey": {"type": "http", "scheme": "bearer", "description": "the same API key as a bearer token"},
        }
        doc["security"] = [{"ApiKey": []}, {"BearerKey": []}]
        shared_responses["Unauthorized"] = error_response(errors.UNAUTHORIZED, headers=header_refs("WWWAuthenticate"))
        shared_responses["Forbidden"] = error_response(errors.FORBIDDEN)
    if settings.rate_limit or settings.download_rate_limit:
        shared_responses["RateLimited"] = error_response(errors.RATE_LIMITED, headers=header_refs("RetryAfter"))

    def cross(name: str, error: ErrorCode, head: bool, hdrs: tuple[str, ...] = ()) -> Json:
        # HEAD answers have no body, so they cannot share the JSON responses.
        return error_response(error, headers=header_refs(*hdrs), body=False) if head else shared(name)

    scopes = routes.scopes()
    for path, method, operation in _operations(doc):
        head, responses_ = method == "head", operation["responses"]
        guarded = path not in open_paths
        if settings.enable_auth and not guarded:
            operation["security"] = []
        elif settings.enable_auth:
            scope = scopes[(method.upper(), path)]
            operation["x-required-scope"] = scope
            responses_["401"] = cross("Unauthorized", errors.UNAUTHORIZED, head, ("WWWAuthenticate",))
            if scope != "read":
                responses_["403"] = cross("Forbidden", errors.FORBIDDEN, head)
        is_download = method == "get" and path.endswith("/download")
        limited = settings.rate_limit or (settings.download_rate_limit and is_download)
        # An upload declares its own 429 (the rate limit beside the per-client upload cap).
        if path not in UNLIMITED_PATHS and limited and "429" not in responses_:
            responses_["429"] = cross("RateLimited", errors.RATE_LIMITED, head, ("RetryAfter",))
        operation["responses"] = dict(sorted(responses_.items()))

    request_id = {REQUEST_ID_HEADER: ref("XRequestId", "headers")}
    every = [r for _, _, o in _operations(doc) for r in o["responses"].values() if "$ref" not in r]
    for response in every + list(shared_responses.values()):
        response["headers"] = {**response.get("headers", {}), **request_id}


def build(settings: Settings) -> Json:
    """The OpenAPI 3.1 document for a service running with ``settings``."""
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "TensorFleet Model Service",
            "version": _package_version(),
            "description": _description(settings),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "models", "description": "the registry: register, list, read, update, delete, versions, batch"},
            {"name": "files", "description": "model files: upload, download, file info, a version's files"},
            {"name": "blobs", "description": "content by sha256, stored before a snapshot's commit refers to it"},
            {"name": "uploads", "description": "resumable upload sessions: chunks at an offset, completed into a blob"},
            {"name": "analytics", "description": "statistics, popular and recent models"},
            {"name": "operations", "description": "health, metrics and this documentation"},
        ],
        "paths": paths(settings),
        "components": {
            "schemas": schemas(settings),
            "parameters": parameters(settings),
            "headers": headers(),
            "responses": responses(settings),
            "links": LINKS,
        },
    }
    _add_cross_cutting(doc, settings)
    return doc
