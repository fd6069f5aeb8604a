"""Small helpers shared by the HTTP contract tests of the registry API.

Everything goes through real HTTP (the pytest-aiohttp ``client``), except
``insert_model_doc``, which writes a model straight into the app's storage for
the few states the API cannot produce by itself (a download count).
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from bson import ObjectId

from app import registry

MODELS = "/api/v1/models"
OBJECT_ID_RE = re.compile(r"^[0-9a-f]{24}$")
ISO_UTC_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
# The fields the specification lists for GET /api/v1/models/{id}.
FULL_FIELDS = (
    "id", "name", "algorithm", "hyperparameters", "metrics", "dataset_info", "version", "parent_model_id",
    "tags", "status", "created_at", "updated_at", "created_by", "download_count",
)


def model_url(model_id: str, suffix: str = "") -> str:
    return f"{MODELS}/{model_id}{suffix}"


def parse_ts(text: str) -> datetime:
    """An ISO-8601 UTC timestamp ending in Z, as the API writes them."""
    assert isinstance(text, str) and ISO_UTC_RE.match(text), f"not an ISO-8601 UTC 'Z' timestamp: {text!r}"
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc)


def unused_id() -> str:
    """A well-formed id no model has."""
    return str(ObjectId())


async def json_of(resp, status: int) -> Any:
    """The JSON body of a response, after checking its status and content type."""
    text = await resp.text()
    assert resp.status == status, f"expected {status}, got {resp.status}: {text[:500]}"
    assert resp.content_type == "application/json", f"content type {resp.content_type!r}: {text[:200]}"
    return await resp.json()


async def expect_error(resp, status: int, *mentions: str) -> dict[str, str]:
    """Check the one error shape, ``{"error": {"code", "message"}}``; return the inner object.

    Each of ``mentions`` must appear in the message (case-insensitive), for the
    errors whose message has to name a field or a rule.
    """
    body = await json_of(resp, status)
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the error shape: {body!r}"
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"code", "message"}, f"not the error shape: {body!r}"
    assert isinstance(err["code"], str) and err["code"], body
    assert isinstance(err["message"], str) and err["message"], body
    for m in mentions:
        assert m.lower() in err["message"].lower(), f"error message does not mention {m!r}: {err['message']!r}"
    return err


def model_body(name: str, algorithm: str = "random_forest", **fields: Any) -> dict[str, Any]:
    return {"name": name, "algorithm": algorithm, **fields}


async def register(client, name: str, algorithm: str = "random_forest", **fields: Any) -> dict[str, Any]:
    """POST a model, check the 201 registration answer, return it."""
    resp = await client.post(MODELS, json=model_body(name, algorithm, **fields))
    body = await json_of(resp, 201)
    assert body["success"] is True
    assert body["message"] == "Model registered successfully"
    assert OBJECT_ID_RE.match(body["model_id"]), body
    assert body["download_url"] == f"{MODELS}/{body['model_id']}/download"
    return body


async def get_model(client, model_id: str) -> dict[str, Any]:
    return await json_of(await client.get(model_url(model_id)), 200)


async def listing(client, path: str = MODELS, **params: Any) -> dict[str, Any]:
    """GET a listing (200 expected); params are sent as given, as literal strings."""
    resp = await client.get(path, params={k: str(v) for k, v in params.items()})
    body = await json_of(resp, 200)
    assert set(body) >= {"models", "pagination"}, body
    p = body["pagination"]
    assert set(p) >= {"page", "limit", "total", "pages"}, p
    assert p["pages"] == math.ceil(p["total"] / p["limit"]), p
    assert len(body["models"]) <= p["limit"]
    return body


async def listed_ids(client, path: str = MODELS, **params: Any) -> list[str]:
    """The ids of one listing page, in order."""
    return [m["id"] for m in (await listing(client, path, **params))["models"]]


async def all_pages(client, limit: int, path: str = MODELS, **params: Any) -> list[dict[str, Any]]:
    """Every page of a listing concatenated, checking each page's pagination block."""
    first = await listing(client, path, limit=limit, page=1, **params)
    total = first["pagination"]["total"]
    pages = first["pagination"]["pages"]
    out = list(first["models"])
    for page in range(2, pages + 1):
        body = await listing(client, path, limit=limit, page=page, **params)
        assert body["pagination"] == {**first["pagination"], "page": page}
        expected = limit if page < pages else total - limit * (pages - 1)
        assert len(body["models"]) == expected, (page, body["pagination"])
        out.extend(body["models"])
    assert len(out) == total
    return out


async def total_models(client) -> int:
    """How many models the registry holds, as GET /api/v1/models reports it."""
    return (await listing(client, limit=1))["pagination"]["total"]


async def snapshot(client) -> list[dict[str, Any]]:
    """Every model's full document, ordered by id: to show a rejected request changed nothing."""
    summaries = await all_pages(client, 100)
    ids = sorted(m["id"] for m in summaries)
    return [await get_model(client, i) for i in ids]


async def insert_model_doc(storage, name: str, version: str = "v1.0", download_count: int = 0) -> str:
    """Put a model into the storage directly, shaped as the registry stores it; return its id."""
    doc = registry.model_document({"name": name, "algorithm": "random_forest"}, version)
    doc["download_count"] = download_count
    await storage.insert_model(doc)
    return doc["id"]
