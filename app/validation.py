"""Checks on what clients send: model bodies and listing parameters.

Nothing is silently fixed up: a value that breaks a rule is a 400 whose message
names the field and the rule. User-supplied objects must not have keys that
MongoDB would read as operators (``$...``) or paths (``a.b``), and query
parameters only ever become literal values.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from . import errors, versions
from .errors import ApiError
from .storage.base import ModelQuery

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
NAME_RULE = "must be 1-100 characters of A-Z, a-z, 0-9, '_', '.' and '-', and not only dots"
STATUSES = ("active", "deprecated", "archived")
MUTABLE_FIELDS = ("hyperparameters", "metrics", "dataset_info", "tags", "status", "description")
IMMUTABLE_FIELDS = ("id", "_id", "name", "version", "created_at", "updated_at", "download_count",
                    "file_metadata", "parent_model_id", "model_size")
CREATE_FIELDS = ("name", "algorithm", "hyperparameters", "metrics", "dataset_info", "tags", "status",
                 "description", "created_by", "format", "version", "breaking_changes")
# A new version may change everything its registration could, except the name.
VERSION_FIELDS = tuple(f for f in CREATE_FIELDS if f != "name")

_MAX_TAGS = 100
_MAX_SHORT = 200
_MAX_DESCRIPTION = 10_000
_METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def valid_name(name: str) -> bool:
    # "." and ".." are path segments to every URL normaliser on the way.
    return NAME_RE.fullmatch(name) is not None and name.strip(".") != ""


def _bad(field: str, message: str) -> ApiError:
    return ApiError(errors.VALIDATION_ERROR, f"{field}: {message}")


# Objects and lists inside user-supplied fields nest at most this deep: deeper
# documents break JSON encoders and BSON (MongoDB refuses 100 levels).
MAX_NESTING = 32


# BSON integers are signed 64-bit; a larger one (JSON allows it) cannot be
# stored by MongoDB, so it is refused on both backends alike.
_INT64 = range(-(2**63), 2**63)


def _check_keys(value: Any, path: str, depth: int = 1) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        raise _bad(path, "integers must be between -2**63 and 2**63-1 (64-bit); send larger numbers as strings")
    if isinstance(value, (dict, list)) and depth > MAX_NESTING:
        raise _bad(path.split(".")[0].split("[")[0], f"must not nest objects or lists more than {MAX_NESTING} deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if k.startswith("$") or "." in k:
                raise _bad(path, f"key {k!r} must not start with '$' or contain '.'")
            if not k:
                raise _bad(path, "keys must not be empty")
            _check_keys(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_keys(v, f"{path}[{i}]", depth + 1)


def _string(body: Mapping[str, Any], field: str, max_len: int, *, required: bool = False) -> str | None:
    if field not in body:
        if required:
            raise _bad(field, "is required")
        return None
    value = body[field]
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    if not value.strip():
        raise _bad(field, "must not be empty")
    if len(value) > max_len:
        raise _bad(field, f"must be at most {max_len} characters")
    return value


def _object(body: Mapping[str, Any], field: str) -> dict[str, Any] | None:
    if field not in body:
        return None
    value = body[field]
    if not isinstance(value, dict):
        raise _bad(field, "must be a JSON object")
    _check_keys(value, field)
    return value


def _metrics(body: Mapping[str, Any]) -> dict[str, float] | None:
    value = _object(body, "metrics")
    if value is None:
        return None
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"metrics.{k}", "must be a number")
    return value


def _tags(body: Mapping[str, Any]) -> list[str] | None:
    if "tags" not in body:
        return None
    value = body["tags"]
    if not isinstance(value, list):
        raise _bad("tags", "must be a list of strings")
    if len(value) > _MAX_TAGS:
        raise _bad("tags", f"must have at most {_MAX_TAGS} entries")
    for t in value:
        if not isinstance(t, str) or not t.strip() or len(t) > 100:
            raise _bad("tags", "every tag must be a non-empty string of at most 100 characters")
    return value


def _status(body: Mapping[str, Any]) -> str | None:
    if "status" not in body:
        return None
    value = body["status"]
    if value not in STATUSES:
        raise _bad("status", f"must be one of {', '.join(STATUSES)}")
    return value


def _reject_unknown(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for field in body:
        if field in IMMUTABLE_FIELDS and field not in allowed:
            raise ApiError(errors.IMMUTABLE_FIELD, f"{field}: cannot be set or changed")
        if field not in allowed:
            raise ApiError(errors.UNKNOWN_FIELD, f"{field}: unknown field (allowed: {', '.join(allowed)})")


def _fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The optional metadata fields shared by registration, versions and updates."""
    out = {
        "algorithm": _string(body, "algorithm", _MAX_SHORT),
        "hyperparameters": _object(body, "hyperparameters"),
        "metrics": _metrics(body),
        "dataset_info": _object(body, "dataset_info"),
        "tags": _tags(body),
        "status": _status(body),
        "description": _string(body, "description", _MAX_DESCRIPTION),
        "created_by": _string(body, "created_by", _MAX_SHORT),
        "format": _string(body, "format", 50),
    }
    if "version" in body and not versions.is_valid(body["version"]):
        raise _bad("version", "must look like vMAJOR.MINOR, for example v1.0 or v2.3")
    out["version"] = body.get("version")
    if "breaking_changes" in body and not isinstance(body["breaking_changes"], bool):
        raise _bad("breaking_changes", "must be true or false")
    out["breaking_changes"] = body.get("breaking_changes")
    return {k: v for k, v in out.items() if v is not None}


def registration(body: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(body, CREATE_FIELDS)
    name = body.get("name")
    if name is None:
        raise _bad("name", "is required")
    if not isinstance(name, str) or not valid_name(name):
        raise _bad("name", NAME_RULE)
    fields = _fields(body)
    if "algorithm" not in fields:
        raise _bad("algorithm", "is required")
    fields["name"] = name
    return fields


def new_version(body: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(body, VERSION_FIELDS)
    return _fields(body)


def update(body: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(body, MUTABLE_FIELDS)
    return _fields(body)


def model_id(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{24}", value):
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
        sort_field=field,
        sort_desc=desc,
        skip=(page - 1) * limit,
        limit=limit,
    )
    return query, page, limit
