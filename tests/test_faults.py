"""Faults done for real: clients that vanish, a database that stops mid-upload.

Afterwards nothing is left behind: no chunks, no temp files, no tasks still
running, no database cursor left open.
"""

import asyncio
import os
import socket
import time

import pytest
from pymongo import monitoring

from app.appkeys import STORAGE
from app.server import create_app
from app.storage.mongo import MongoStorage
from tests.transfer_helpers import leftovers, upload_under_way


class CursorWatch(monitoring.CommandListener):
    """Which chunk cursors the driver opened, and which it killed or exhausted."""

    def __init__(self) -> None:
        self.opened: dict[int, int] = {}  # request id of the find -> cursor id
        self.pending: set[int] = set()
        self.getmores: dict[int, int] = {}  # request id -> cursor id
        self.finished: set[int] = set()

    def started(self, event):
        if event.command_name == "find" and str(event.command.get("find", "")).endswith(".chunks"):
            self.pending.add(event.request_id)
        elif event.command_name == "killCursors":
            self.finished.update(event.command["cursors"])
        elif event.command_name == "getMore":
            self.getmores[event.request_id] = event.command["getMore"]

    def succeeded(self, event):
        if event.request_id in self.pending:
            self.pending.discard(event.request_id)
            self.opened[event.request_id] = event.reply["cursor"]["id"]
        elif event.request_id in self.getmores:
            cursor = self.getmores.pop(event.request_id)
            if event.reply["cursor"]["id"] == 0:  # exhausted: the server closed it
                self.finished.add(cursor)

    def failed(self, event):
        self.pending.discard(event.request_id)

    def still_open(self) -> set[int]:
        return {c for c in self.opened.values() if c != 0} - self.finished


@pytest.fixture
async def watched(aiohttp_client, settings, backend):
    """A client whose MongoDB storage reports its cursors (the embedded one has none)."""
    watch = CursorWatch()
    storage = None
    if backend == "mongodb":
        storage = MongoStorage(settings.mongodb_url, settings.mongodb_db, settings.gridfs_bucket,
                               settings.mongodb_timeout_ms, event_listeners=[watch])
    client = await aiohttp_client(create_app(settings, storage=storage))
    return client, watch


async def settle_tasks(baseline: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while len(asyncio.all_tasks()) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return len(asyncio.all_tasks())


async def test_client_leaving_mid_download_leaks_no_cursor_or_task(watched):
    client, watch = watched
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    await client.put(f"/api/v1/models/{model_id}/upload", data=os.urandom(40 * 1024 * 1024))
    baseline = len(asyncio.all_tasks())

    port = client.server.port
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /api/v1/models/{model_id}/download HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readexactly(2 * 1024 * 1024)
        writer.transport.abort()  # gone, mid-body

    assert await settle_tasks(baseline) <= baseline
    if client.app[STORAGE].kind == "mongodb":
        deadline = time.monotonic() + 10
        while watch.still_open() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(watch.opened) >= 3, "the downloads opened chunk cursors"
        assert watch.still_open() == set()
    # And the service serves the next download whole.
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert len(await resp.read()) == 40 * 1024 * 1024


async def test_client_leaving_mid_upload_leaves_nothing(watched):
    client, _ = watched
    storage = client.app[STORAGE]
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    before = await leftovers(storage)
    baseline = len(asyncio.all_tasks())

    port = client.server.port
    for declared in (64 * 1024 * 1024, None):  # with a Content-Length, and chunked
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"PUT /api/v1/models/{model_id}/upload HTTP/1.1\r\nHost: x\r\n"
        head += f"Content-Length: {declared}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
        writer.write((head + "\r\n").encode())
        for _ in range(10):
            block = os.urandom(1024 * 1024)
            writer.write(block if declared else b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
        # Leave only once the service has stored some of it: that is what must go.
        deadline = time.monotonic() + 10
        while not await upload_under_way(storage, before) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await upload_under_way(storage, before), "nothing of the upload reached the store"
        writer.transport.abort()

        deadline = time.monotonic() + 10
        while await leftovers(storage) != before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await leftovers(storage) == before, "declared" if declared else "chunked"
    assert await settle_tasks(baseline) <= baseline
    doc = await storage.get_model(model_id)
    assert "file_metadata" not in doc


@pytest.mark.parametrize("backend", ["mongodb"])
async def test_database_stopped_mid_upload_leaves_nothing_once_back(client, mongo_server):
    storage = client.app[STORAGE]
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    before = await leftovers(storage)

    async def body():
        for i in range(40):
            yield os.urandom(1024 * 1024)
            if i == 12:  # three write batches are in the database by now
                await asyncio.to_thread(mongo_server.stop)

    try:
        resp = await client.put(f"/api/v1/models/{model_id}/upload", data=body())
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "storage_unavailable"
    finally:
        mongo_server.start()
    # The chunks written before the stop go once the database is back.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if await leftovers(storage) == before:
                break
        except Exception:
            pass
        await asyncio.sleep(0.5)
    assert await leftovers(storage) == before
    assert "file_metadata" not in await storage.get_model(model_id)

    # Every endpoint works again without restarting the service.
    data = os.urandom(300_000)
    assert (await client.put(f"/api/v1/models/{model_id}/upload", data=data)).status == 201
    assert await (await client.get(f"/api/v1/models/{model_id}/download")).read() == data
    assert (await client.get("/api/v1/models?q=m")).status == 200
    assert (await client.get("/api/v1/models/statistics")).status == 200
    assert (await client.get("/health/detailed")).status == 200
    assert (await client.delete(f"/api/v1/models/{model_id}")).status == 200


def test_sigkill_mid_upload_then_restart_is_consistent_and_gc_cleans(tmp_path):
    import subprocess
    import sys
    import urllib.request

    import orjson

    from testkit.live_service import LiveService
    from testkit.mongo_server import REPO

    env = {"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": ""}
    service = LiveService(env, tmp_path / "log")
    service.start()
    req = urllib.request.Request(service.url + "/api/v1/models", method="POST",
                                 data=orjson.dumps({"name": "m", "algorithm": "a"}))
    model_id = orjson.loads(urllib.request.urlopen(req).read())["model_id"]
    with socket.create_connection(("127.0.0.1", service.port)) as s:
        s.sendall(f"PUT /api/v1/models/{model_id}/upload HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {100 * 1024 * 1024}\r\n\r\n".encode())
        for _ in range(20):
            s.sendall(os.urandom(1024 * 1024))
        time.sleep(0.5)
        os.kill(service.pid, 9)
        service.stop()
    tmp_files = list((tmp_path / "d" / "tmp").iterdir())
    assert tmp_files, "the killed upload left its temp file"

    service = LiveService(env, tmp_path / "log2")
    service.start()
    try:
        doc = orjson.loads(urllib.request.urlopen(f"{service.url}/api/v1/models/{model_id}").read())
        assert "file_metadata" not in doc  # the registry never saw the half upload
        health = orjson.loads(urllib.request.urlopen(f"{service.url}/health/detailed").read())
        assert health["status"] == "healthy"
    finally:
        service.stop()
    gc_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-m", "app", "gc", "--min-age", "0s"], cwd=REPO, env=gc_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "removed temp file" in proc.stdout and "removed 1 item(s)" in proc.stdout
    assert list((tmp_path / "d" / "tmp").iterdir()) == []
