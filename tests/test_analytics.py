"""Statistics, popular and recent, on both backends, after real uploads, downloads and deletes."""

import os

import pytest


async def register(client, name, algorithm="xgboost", **extra):
    resp = await client.post("/api/v1/models", json={"name": name, "algorithm": algorithm, **extra})
    assert resp.status == 201, await resp.text()
    return (await resp.json())["model_id"]


async def upload(client, model_id, data):
    resp = await client.put(f"/api/v1/models/{model_id}/upload?filename=m.bin", data=data)
    assert resp.status == 201, await resp.text()


async def download(client, model_id, **headers):
    resp = await client.get(f"/api/v1/models/{model_id}/download", headers=headers)
    await resp.read()
    return resp.status


async def stats(client, path="/api/v1/models/statistics"):
    resp = await client.get(path)
    assert resp.status == 200
    return await resp.json()


async def test_empty_registry(client):
    body = await stats(client)
    assert body["total_models"] == 0
    assert body["algorithms"] == {}
    assert body["status_distribution"] == {"active": 0, "deprecated": 0, "archived": 0}
    assert body["total_downloads"] == 0
    assert body["storage_usage"] == {"total_size_bytes": 0, "total_size_gb": 0, "average_model_size_mb": 0}
    assert body["recent_activity"] == {"models_added_last_7_days": 0, "downloads_last_24_hours": 0}


async def test_counts_after_shared_files_downloads_and_deletes(client):
    shared = os.urandom(300_000)
    other = os.urandom(100_000)
    a = await register(client, "a", "xgboost")
    b = await register(client, "b", "xgboost", status="deprecated")
    c = await register(client, "c", "random_forest", status="archived")
    await register(client, "d", "random_forest")  # no file
    await upload(client, a, shared)
    await upload(client, b, shared)  # same content: stored once
    await upload(client, c, other)

    assert await download(client, a) == 200
    assert await download(client, a) == 200
    assert await download(client, b) == 200
    assert await download(client, c, Range="bytes=10-20") == 206  # not a download
    resp = await client.head(f"/api/v1/models/{c}/download")  # nor is HEAD
    assert resp.status == 200

    body = await stats(client)
    assert body["total_models"] == 4
    assert body["algorithms"] == {"random_forest": 2, "xgboost": 2}
    assert body["status_distribution"] == {"active": 2, "deprecated": 1, "archived": 1}
    assert body["total_downloads"] == 3
    usage = body["storage_usage"]
    assert usage["total_size_bytes"] == 400_000  # the shared file counted once
    assert usage["total_size_gb"] == 0.0
    assert usage["average_model_size_mb"] == pytest.approx(0.23, abs=0.01)  # (300k + 300k + 100k) / 3 models
    assert body["recent_activity"] == {"models_added_last_7_days": 4, "downloads_last_24_hours": 3}
    assert await stats(client, "/api/v1/statistics") | {"timestamp": None} == body | {"timestamp": None}

    # Deleting one of the two models that share content keeps the content counted once.
    resp = await client.delete(f"/api/v1/models/{a}")
    assert resp.status == 200
    body = await stats(client)
    assert body["total_models"] == 3
    assert body["algorithms"] == {"random_forest": 2, "xgboost": 1}
    assert body["total_downloads"] == 1  # a's two downloads left with it
    assert body["storage_usage"]["total_size_bytes"] == 400_000
    # The hourly tally is history: deleting a model does not rewrite it.
    assert body["recent_activity"]["downloads_last_24_hours"] == 3

    resp = await client.delete(f"/api/v1/models/{b}")
    body = await stats(client)
    assert body["storage_usage"]["total_size_bytes"] == 100_000


async def test_popular_and_recent(client):
    ids = [await register(client, f"m{i}") for i in range(4)]
    data = os.urandom(1000)
    for model_id in ids:
        await upload(client, model_id, data)
    for model_id, times in zip(ids, [1, 3, 0, 2]):
        for _ in range(times):
            assert await download(client, model_id) == 200

    resp = await client.get("/api/v1/models/popular?limit=3")
    assert resp.status == 200
    popular = (await resp.json())["models"]
    assert [m["id"] for m in popular] == [ids[1], ids[3], ids[0]]
    assert [m["download_count"] for m in popular] == [3, 2, 1]
    assert set(popular[0]) >= {"id", "name", "version", "algorithm", "status", "download_count", "created_at"}

    resp = await client.get("/api/v1/models/recent")
    recent = (await resp.json())["models"]
    assert [m["id"] for m in recent] == ids[::-1]

    for bad in ("0", "abc", "1000"):
        resp = await client.get(f"/api/v1/models/popular?limit={bad}")
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_parameter"
