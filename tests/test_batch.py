"""POST /api/v1/models/batch on both backends."""

import os

import pytest

from app.appkeys import STORAGE

BATCH = "/api/v1/models/batch"
MISSING = "0123456789abcdef01234567"


async def register(client, name, **extra):
    resp = await client.post("/api/v1/models", json={"name": name, "algorithm": "a", **extra})
    return (await resp.json())["model_id"]


async def get(client, model_id):
    resp = await client.get(f"/api/v1/models/{model_id}")
    return resp.status, (await resp.json())


async def run(client, body, status=200):
    resp = await client.post(BATCH, json=body)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_delete_reports_per_id_and_releases_files(client):
    a, b = await register(client, "a"), await register(client, "b")
    await client.put(f"/api/v1/models/{a}/upload", data=os.urandom(2000))
    body = await run(client, {"operation": "delete", "ids": [a, MISSING, "nope", b]})
    assert body["operation"] == "delete"
    assert body["results"] == [
        {"id": a, "result": "ok"}, {"id": MISSING, "result": "not_found"},
        {"id": "nope", "result": "invalid_id"}, {"id": b, "result": "ok"},
    ]
    assert body["summary"] == {"ok": 2, "not_found": 1, "invalid_id": 1}
    assert (await get(client, a))[0] == 404 and (await get(client, b))[0] == 404
    stats = await (await client.get("/api/v1/models/statistics")).json()
    assert stats["storage_usage"]["total_size_bytes"] == 0
    storage = client.app[STORAGE]
    if storage.kind == "mongodb":
        assert await storage.chunks.count_documents({}) == 0


async def test_update_status_and_tags(client):
    a, b = await register(client, "a", tags=["x"]), await register(client, "b", tags=["x", "y"])
    body = await run(client, {"operation": "update_status", "ids": [a, b, MISSING], "status": "deprecated"})
    assert body["summary"] == {"ok": 2, "not_found": 1, "invalid_id": 0}
    assert (await get(client, a))[1]["status"] == "deprecated"

    await run(client, {"operation": "add_tags", "ids": [a, b], "tags": ["y", "z", "z"]})
    assert (await get(client, a))[1]["tags"] == ["x", "y", "z"]
    assert (await get(client, b))[1]["tags"] == ["x", "y", "z"]

    await run(client, {"operation": "remove_tags", "ids": [a, b], "tags": ["x", "nothere"]})
    assert (await get(client, a))[1]["tags"] == ["y", "z"]
    resp = await client.get("/api/v1/models?tags=x")
    assert (await resp.json())["pagination"]["total"] == 0


@pytest.mark.parametrize("body, field", [
    ({"operation": "explode", "ids": [MISSING]}, "operation"),
    ({"operation": "delete", "ids": []}, "ids"),
    ({"operation": "delete", "ids": "abc"}, "ids"),
    ({"operation": "delete", "ids": [MISSING] * 1001}, "ids"),
    ({"operation": "update_status", "ids": [MISSING]}, "status"),
    ({"operation": "update_status", "ids": [MISSING], "status": "gone"}, "status"),
    ({"operation": "add_tags", "ids": [MISSING], "tags": "x"}, "tags"),
    ({"operation": "add_tags", "ids": [MISSING], "tags": [{"$ne": 1}]}, "tags"),
    ({"operation": "delete", "ids": [MISSING], "status": "active"}, "status"),
    ({"operation": "delete", "ids": [MISSING], "extra": 1}, "extra"),
])
async def test_bad_batches_change_nothing(client, body, field):
    a = await register(client, "a")
    before = await get(client, a)
    resp = await client.post(BATCH, json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"].startswith(field)
    assert await get(client, a) == before


async def test_thousand_ids_is_the_limit(client):
    body = await run(client, {"operation": "update_status", "ids": [MISSING] * 1000, "status": "archived"})
    assert body["summary"]["not_found"] == 1000
