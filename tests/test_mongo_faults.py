"""The MongoDB backend when the database goes away and comes back, for real.

The FerretDB test server is stopped and restarted on the same port (conftest's
``mongo_server``); with an external MONGODB_URL they cannot run: they fail
under CI=true and are skipped elsewhere.
"""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from testkit.mongo_server import free_port


async def wait_for_status(client, status, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get("/health")
        body = await resp.json()
        if resp.status == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/health stayed {resp.status}: {body}")
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("backend", ["mongodb"])
async def test_health_goes_503_and_recovers_by_itself(client, mongo_server):
    resp = await client.post("/api/v1/models", json={"name": "before", "algorithm": "x"})
    assert resp.status == 201

    mongo_server.stop()
    body = await wait_for_status(client, 503)
    assert body["status"] == "unhealthy"
    assert body["mongodb_connected"] is False and body["gridfs_available"] is False
    # Other endpoints answer a clear 503 too, never a hang or a 500.
    resp = await client.get("/api/v1/models")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "storage_unavailable"
    resp = await client.post("/api/v1/models", json={"name": "during", "algorithm": "x"})
    assert resp.status == 503

    mongo_server.start()
    body = await wait_for_status(client, 200)
    assert body["mongodb_connected"] is True and body["total_models"] == 1
    resp = await client.post("/api/v1/models", json={"name": "after", "algorithm": "x"})
    assert resp.status == 201
    resp = await client.get("/api/v1/models")
    assert {m["name"] for m in (await resp.json())["models"]} == {"before", "after"}


def test_start_up_with_unreachable_mongodb_fails_fast(tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "MONGODB_URL": f"mongodb://127.0.0.1:{port}/", "MONGODB_TIMEOUT_MS": "1500",
           "PORT": str(free_port())}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert "cannot reach MongoDB" in proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 20, f"took {elapsed:.1f}s to give up"
