"""POST /api/v1/models/batch: one operation over up to 1000 models.

Every id gets its own result (``ok``, ``not_found``, ``invalid_id``); one bad
id never fails the batch. The body is checked as a whole first, so a batch
with a malformed operation changes nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import get_args

from aiohttp import web

from .. import clock, errors, registry, validation
from ..appkeys import LEASES, STORAGE
from ..errors import ApiError
from ..http.json import json_response
from ..json_bodies import read_json_object
from ..schemas import MAX_BATCH_IDS as MAX_IDS
from ..schemas import BatchAnswer, BatchOperation, BatchResult, BatchSummary

OPERATIONS: tuple[str, ...] = get_args(BatchOperation)
_ID_RE = re.compile(r"^[0-9a-fA-F]{24}$")


def _parse(body: dict) -> tuple[str, list, dict]:
    allowed = {"operation", "ids", "status", "tags"}
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(errors.UNKNOWN_FIELD,
                       f"{sorted(unknown)[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    operation = body.get("operation")
    if operation not in OPERATIONS:
        raise ApiError(errors.VALIDATION_ERROR, f"operation: must be one of {', '.join(OPERATIONS)}")
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids:
        raise ApiError(errors.VALIDATION_ERROR, "ids: must be a non-empty list")
    if len(ids) > MAX_IDS:
        raise ApiError(errors.VALIDATION_ERROR, f"ids: at most {MAX_IDS} per batch")
    fields: dict = {}
    if operation == "update_status":
        if "status" not in body:
            raise ApiError(errors.VALIDATION_ERROR, "status: is required for update_status")
        fields = validation.update({"status": body["status"]})
    elif operation in ("add_tags", "remove_tags"):
        if "tags" not in body:
            raise ApiError(errors.VALIDATION_ERROR, f"tags: is required for {operation}")
        fields = validation.update({"tags": body["tags"]})
    extra = {"status", "tags"} & set(body) - set(fields)
    if extra:
        raise ApiError(errors.VALIDATION_ERROR, f"{sorted(extra)[0]}: not used by {operation}")
    return operation, ids, fields


async def _apply(request: web.Request, operation: str, model_id: str, fields: dict) -> str:
    storage = request.app[STORAGE]
    if operation == "delete":
        return "ok" if await registry.delete(storage, model_id, request.app[LEASES]) else "not_found"
    if operation == "update_status":
        changes = fields
    else:
        doc = await storage.get_model(model_id)
        if doc is None:
            return "not_found"
        tags = doc.get("tags", [])
        if operation == "add_tags":
            tags = tags + [t for t in dict.fromkeys(fields["tags"]) if t not in tags]
        else:
            tags = [t for t in tags if t not in set(fields["tags"])]
        changes = {"tags": tags}
    updated = await storage.update_model(model_id, {**changes, "updated_at": clock.now()})
    return "ok" if updated is not None else "not_found"


async def batch(request: web.Request) -> web.Response:
    operation, ids, fields = _parse(await read_json_object(request))
    results = []
    for raw in ids:
        if not isinstance(raw, str) or not _ID_RE.fullmatch(raw):
            results.append(BatchResult(id=raw if isinstance(raw, str) else str(raw), result="invalid_id"))
            continue
        results.append(BatchResult(id=raw, result=await _apply(request, operation, raw.lower(), fields)))
    summary = Counter(r.result for r in results)
    return json_response(BatchAnswer(
        operation=operation,
        results=results,
        summary=BatchSummary(**{k: summary.get(k, 0) for k in BatchSummary.__struct_fields__}),
    ))

