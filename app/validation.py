"""Checks on what clients send: model bodies and listing parameters.

Nothing is silently fixed up: a value that breaks a rule is a 400 whose message
names the field and the rule. Bodies are converted into the Structs of
``schemas`` (which also hold the rules JSON Schema cannot state: no ``$...``
or dotted keys MongoDB would read as operators or paths, bounded nesting,
64-bit integers); the library's errors are translated here into "field: rule".
Query parameters only ever become literal values.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, TypeVar

import msgspec

from . import errors, versions
from .errors import ApiError
from .schemas import (
    MAX_TAG,
    MAX_TAGS,
    NAME_RULE,
    STATUSES,
    VERSION_RULE,
    ModelRegistration,
    ModelUpdate,
    NewVersion,
    valid_name,
)
from .storage.base import ModelDocument, ModelQuery

__all__ = ["STATUSES", "NAME_RULE", "valid_name", "registration", "new_version", "update", "model_id",
           "model_name", "version_param", "limit_param", "listing"]

Body = TypeVar("Body", ModelRegistration, NewVersion, ModelUpdate)

# Fields the server owns: naming one is immutable_field rather than unknown_field.
IMMUTABLE_FIELDS = ("id", "_id", "name", "version", "created_at", "updated_at", "download_count",
                    "file_metadata", "parent_model_id", "model_size", "snapshot_digest", "total_size_bytes")
_METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# msgspec's "<what> - at `$.<field>...`", and its two messages about whole objects.
_AT_RE = re.compile(r"^(?P<what>.*?)(?: - at `\$\.(?P<field>\w+)(?P<sub>[^`]*)`)?$", re.S)
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>\w+)`$")
_LENGTH_RE = re.compile(r"length <= (\d+)")


def _bad(field: str, message: str) -> ApiError:
    return ApiError(errors.VALIDATION_ERROR, f"{field}: {message}")


def _rule(field: str, sub: str, what: str, body: Mapping[str, Any]) -> ApiError:
    """The "field: rule" message for a library error at ``$.field<sub>``."""
    if field == "name":
        return _bad(field, "is required" if body[field] is None else NAME_RULE)
    if field == "status":
        return _bad(field, f"must be one of {', '.join(STATUSES)}")
    if field == "version":
        return _bad(field, VERSION_RULE)
    if field == "breaking_changes":
        return _bad(field, "must be true or false")
    if field == "tags":
        if sub:
            return _bad(field, f"every tag must be a non-empty string of at most {MAX_TAG} characters")
        if _LENGTH_RE.search(what):
            return _bad(field, f"must have at most {MAX_TAGS} entries")
        return _bad(field, "must be a list of strings")
    if field == "metrics" and sub:
        # msgspec does not name the key ("[...]"): the first value that is no number.
        key = next(k for k, v in body["metrics"].items() if isinstance(v, bool) or not isinstance(v, (int, float)))
        return _bad(f"metrics.{key}", "must be a number")
    if field == "files":
        return _files_rule(sub, what)
    if field in ("hyperparameters", "metrics", "dataset_info"):
        return _bad(field, "must be a JSON object")
    if what.startswith("Expected `str`, got"):
        return _bad(field, "must be a string")
    if m := _LENGTH_RE.search(what):
        return _bad(field, f"must be at most {m.group(1)} characters")
    return _bad(field, "must not be empty")


_FILE_RULES = {
    "path": "must be a string",
    "checksum": "must be sha256: followed by 64 lowercase hexadecimal characters",
    "size_bytes": "must be a whole number of bytes, 0 or more",
    "content_type": "must be a media type of 1-255 printable ASCII characters",
}


def _files_rule(sub: str, what: str) -> ApiError:
    """A library error inside ``files`` (sub is "", "[3]" or "[3].path")."""
    if m := _MISSING_RE.match(what):
        return _bad(f"files{sub}.{m.group('field')}", "is required")
    if what.startswith("Object contains unknown field"):
        return _bad(f"files{sub}", f"{what.split('`')[1]}: unknown field (allowed: {', '.join(_FILE_RULES)})")
    item = re.fullmatch(r"(\[\d+\])\.(\w+)", sub)
    if item and item.group(2) in _FILE_RULES:
        return _bad(f"files{sub}", _FILE_RULES[item.group(2)])
    if sub:
        return _bad(f"files{sub}", "must be an object {path, checksum, size_bytes, content_type?}")
    if "length >= 1" in what:
        return _bad("files", "must list at least one file")
    return _bad("files", "must be a list of {path, checksum, size_bytes, content_type?} objects")


def _allowed(schema: type[msgspec.Struct]) -> tuple[str, ...]:
    # The operation's own fields first (name, algorithm), then the shared ones.
    own = tuple(schema.__annotations__)
    return own + tuple(f for f in schema.__struct_fields__ if f not in own)


_ALLOWED = {schema: _allowed(schema) for schema in (ModelRegistration, NewVersion, ModelUpdate)}


def _convert(body: Mapping[str, Any], schema: type[Body]) -> Body:
    allowed = _ALLOWED[schema]
    for field in body:
        if field not in allowed:
            if field in IMMUTABLE_FIELDS:
                raise ApiError(errors.IMMUTABLE_FIELD, f"{field}: cannot be set or changed")
            raise ApiError(errors.UNKNOWN_FIELD, f"{field}: unknown field (allowed: {', '.join(allowed)})")
    try:
        return msgspec.convert(body, schema)
    except msgspec.ValidationError as e:
        message = str(e)
        if m := _MISSING_RE.match(message):
            raise _bad(m.group("field"), "is required") from None
        m = _AT_RE.match(message)
        if m is None or m.group("field") is None:
            # A rule of __post_init__, already "field: rule".
            raise ApiError(errors.VALIDATION_ERROR, message) from None
        raise _rule(m.group("field"), m.group("sub"), m.group("what"), body) from None


def fields(value: msgspec.Struct) -> ModelDocument:
    """The fields a body gave, as the document fields storage takes."""
    return ModelDocument(**{k: v for k, v in msgspec.structs.asdict(value).items() if v is not msgspec.UNSET})


def registration(body: Mapping[str, Any]) -> ModelDocument:
    return fields(_convert(body, ModelRegistration))


def new_version(body: Mapping[str, Any]) -> ModelDocument:
    return fields(_convert(body, NewVersion))


def update(body: Mapping[str, Any]) -> ModelDocument:
    return fields(_convert(body, ModelUpdate))


_MODEL_ID = re.compile(r"[0-9a-fA-F]{24}")


def model_id(value: str) -> str:
    if not _MODEL_ID.fullmatch(value):
        raise ApiError(errors.INVALID_ID, f"model id must be 24 hexadecimal characters, got {value[:40]!r}")
    return value.lower()


def model_name(value: str) -> str:
    if not valid_name(value):
        raise ApiError(errors.VALIDATION_ERROR, f"name {NAME_RULE}")
    return value


def version_param(value: str | None) -> str | None:
    if value is not None and not versions.is_valid(value):
        raise ApiError(errors.INVALID_PARAMETER, "version must look like vMAJOR.MINOR, for example v2.1")
    return value


_SORT_PLAIN = ("created_at", "name", "download_count")


def _int_param(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(errors.INVALID_PARAMETER, f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ApiError(errors.INVALID_PARAMETER, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool_param(params: Mapping[str, str], name: str) -> bool:
    raw = params.get(name, "")
    if raw not in ("", "true", "false"):
        raise ApiError(errors.INVALID_PARAMETER, f"{name} must be true or false, got {raw[:40]!r}")
    return raw == "true"


def _str_param(params: Mapping[str, str], name: str) -> str | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > 200:
        raise ApiError(errors.INVALID_PARAMETER, f"{name} must be at most 200 characters")
    return raw


def _search_text(params: Mapping[str, str]) -> str | None:
    text = _str_param(params, "q")
    # MongoDB's regex engine refuses a pattern with a NUL, which the embedded
    # backend would search for: refused here, both answer alike.
    if text is not None and "\x00" in text:
        raise ApiError(errors.INVALID_PARAMETER, "q must not contain a NUL character")
    return text


def limit_param(params: Mapping[str, str], max_page_size: int) -> int:
    return _int_param(params, "limit", min(10, max_page_size), 1, max_page_size)


def listing(params: Mapping[str, str], max_page_size: int) -> tuple[ModelQuery, int, int]:
    """The ModelQuery for GET /api/v1/models, with the page and limit it asked for."""
    page = _int_param(params, "page", 1, 1, 1_000_000)
    limit = limit_param(params, max_page_size)

    sort = params.get("sort", "-created_at")
    desc = sort.startswith("-")
    field = sort[1:] if desc else sort
    if not (field in _SORT_PLAIN or (field.startswith("metrics.") and _METRIC_NAME_RE.fullmatch(field[8:]))):
        raise ApiError(errors.INVALID_PARAMETER,
                       "sort must be created_at, name, download_count or metrics.<name>, optionally prefixed with '-'")

    status = _str_param(params, "status")
    if status is not None and status not in STATUSES:
        raise ApiError(errors.INVALID_PARAMETER, f"status must be one of {', '.join(STATUSES)}")

    min_accuracy = None
    if params.get("min_accuracy") not in (None, ""):
        try:
            min_accuracy = float(params["min_accuracy"])
        except ValueError:
            min_accuracy = math.nan
        if not math.isfinite(min_accuracy):
            raise ApiError(errors.INVALID_PARAMETER, "min_accuracy must be a number")

    tags = tuple(t.strip() for t in params.get("tags", "").split(",") if t.strip())
    query = ModelQuery(
        algorithm=_str_param(params, "algorithm"),
        status=status,
        tags=tags,
        text=_search_text(params),
        min_accuracy=min_accuracy,
        created_by=_str_param(params, "created_by"),
        latest_only=_bool_param(params, "latest"),
        sort_field=field,
        sort_desc=desc,
        skip=(page - 1) * limit,
        limit=limit,
    )
    return query, page, limit
