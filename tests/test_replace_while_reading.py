"""Replacing a model's file while it is being downloaded.

Readers see the old file or the new one, never a mix, and never a download cut
short because the old content was deleted under it.
"""

import asyncio
import hashlib
import os

from app.appkeys import STORAGE

SIZE = 40 * 1024 * 1024 + 7  # well past what socket and client buffers hold


async def register_and_upload(client, data: bytes) -> str:
    resp = await client.post("/api/v1/models", json={"name": "swap", "algorithm": "x"})
    model_id = (await resp.json())["model_id"]
    resp = await client.put(f"/api/v1/models/{model_id}/upload?filename=a.bin", data=data)
    assert resp.status == 201
    return model_id


async def test_download_in_progress_finishes_with_the_old_file(client):
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    model_id = await register_and_upload(client, old)
    storage = client.app[STORAGE]
    old_file_id = (await storage.get_model(model_id))["file_metadata"]["file_id"]

    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert resp.status == 200
    first = await resp.content.readexactly(1024 * 1024)

    # Replace the file while the download above is paused mid-body.
    up = await client.put(f"/api/v1/models/{model_id}/upload?filename=b.bin", data=new)
    assert up.status == 201
    # The old content is still there: a reader holds it.
    assert await storage.file_info(old_file_id) is not None

    rest = await resp.read()
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(old).digest()

    # Once the last reader is done, the old content is released.
    for _ in range(50):
        if await storage.file_info(old_file_id) is None:
            break
        await asyncio.sleep(0.05)
    assert await storage.file_info(old_file_id) is None

    # New downloads get the new file.
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert await resp.read() == new
