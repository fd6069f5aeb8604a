"""/health/detailed: each check healthy or a reason; 503 when any fails."""

import dataclasses
import os

import pytest

from app.appkeys import STORAGE
from app.server import create_app


async def detailed(client):
    resp = await client.get("/health/detailed")
    return resp.status, await resp.json()


async def test_all_healthy(client, backend):
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    await client.put(f"/api/v1/models/{model_id}/upload", data=os.urandom(5000))
    await client.post("/api/v1/models", json={"name": "n", "algorithm": "a", "status": "archived"})
    status, body = await detailed(client)
    assert status == 200, body
    assert body["status"] == "healthy" and body["storage"] == backend
    assert body["checks"] == {"storage": "healthy", "files": "healthy", "disk_space": "healthy",
                              "model_registry": "healthy"}
    assert body["total_models"] == 2 and body["active_models"] == 1
    assert body["storage_usage"] == {"total_size_bytes": 5000}
    if backend == "embedded":
        assert body["disk_free_bytes"] > 0


async def test_missing_file_makes_registry_unhealthy(client, backend):
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    await client.put(f"/api/v1/models/{model_id}/upload", data=os.urandom(5000))
    storage = client.app[STORAGE]
    doc = await storage.get_model(model_id)
    # Remove the content behind the service's back.
    if backend == "mongodb":
        await storage.files.delete_many({})
    else:
        os.unlink(storage.blob_path(doc["file_metadata"]["checksum"].removeprefix("sha256:")))
        await storage._run(lambda: storage._db.execute("DELETE FROM files"))
    status, body = await detailed(client)
    assert status == 503
    assert body["status"] == "unhealthy"
    assert model_id in body["checks"]["model_registry"]
    assert body["checks"]["storage"] == "healthy"


@pytest.mark.parametrize("backend", ["embedded"])
async def test_low_disk_is_unhealthy(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, min_free_disk=10**18)))
    status, body = await detailed(client)
    assert status == 503
    assert "HEALTH_MIN_FREE_DISK" in body["checks"]["disk_space"]


@pytest.mark.parametrize("backend", ["mongodb"])
async def test_stopped_database_is_unhealthy_then_recovers(client, mongo_server):
    mongo_server.stop()
    try:
        status, body = await detailed(client)
        assert status == 503
        assert body["status"] == "unhealthy"
        assert body["checks"]["storage"] != "healthy"
        assert body["checks"]["files"] != "healthy"
        assert body["total_models"] is None
    finally:
        mongo_server.start()
    for _ in range(50):
        status, body = await detailed(client)
        if status == 200:
            break
    assert status == 200, body
