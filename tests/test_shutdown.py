"""SIGTERM with downloads in flight: stop taking work, finish what runs, exit 0."""

import asyncio
import hashlib
import os
import signal
import urllib.request

import aiohttp
import orjson
import pytest

from testkit.live_service import LiveService

SIZE = 32 * 1024 * 1024


def serving_a_model(tmp_path, grace_seconds: str) -> tuple[LiveService, bytes, str]:
    """A live service with SHUTDOWN_GRACE_SECONDS set, one SIZE-byte model in it, and its download URL."""
    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": "",
                           "SHUTDOWN_GRACE_SECONDS": grace_seconds}, tmp_path / "log")
    service.start()
    data = os.urandom(SIZE)
    req = urllib.request.Request(service.url + "/api/v1/models", method="POST",
                                 data=orjson.dumps({"name": "m", "algorithm": "a"}))
    model_id = orjson.loads(urllib.request.urlopen(req).read())["model_id"]
    req = urllib.request.Request(f"{service.url}/api/v1/models/{model_id}/upload", method="PUT", data=data)
    urllib.request.urlopen(req).read()
    return service, data, f"{service.url}/api/v1/models/{model_id}/download"


async def slow_download(session, url, started: asyncio.Event, counter: list) -> str:
    h = hashlib.sha256()
    async with session.get(url) as resp:
        assert resp.status == 200
        counter.append(1)
        if len(counter) == 8:
            started.set()
        first = True
        async for block in resp.content.iter_chunked(256 * 1024):
            h.update(block)
            if first:
                first = False
                await started.wait()
            await asyncio.sleep(0.01)  # a slow reader keeps the download in flight
    return h.hexdigest()


def test_sigterm_drains_in_flight_downloads_then_exits_0(tmp_path):
    service, data, url = serving_a_model(tmp_path, "60")

    async def scenario():
        started = asyncio.Event()
        counter: list = []
        async with aiohttp.ClientSession() as session:
            downloads = [asyncio.create_task(slow_download(session, url, started, counter)) for _ in range(8)]
            await asyncio.wait_for(started.wait(), 30)
            os.kill(service.pid, signal.SIGTERM)
            await asyncio.sleep(0.5)
            # While draining: /health says so, and new work is turned away.
            async with aiohttp.ClientSession() as fresh:
                async with fresh.get(service.url + "/health") as resp:
                    health = (resp.status, await resp.json())
                async with fresh.get(url) as resp:
                    refused = (resp.status, (await resp.json())["error"]["code"])
            return await asyncio.gather(*downloads), health, refused

    digests, health, refused = asyncio.run(scenario())
    assert digests == [hashlib.sha256(data).hexdigest()] * 8
    assert health[0] == 503 and health[1]["draining"] is True
    assert refused == (503, "shutting_down")
    assert service.wait(30) == 0
    assert "draining 8 request(s)" in service.log()


def test_grace_period_cuts_what_is_left(tmp_path):
    service, _, url = serving_a_model(tmp_path, "1")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                await resp.content.readexactly(1024)
                os.kill(service.pid, signal.SIGTERM)
                await asyncio.sleep(3)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()

    asyncio.run(scenario())
    # It exits by itself once the grace period is over (a second SIGTERM is not needed).
    assert service.wait(30) == 0
    assert "cut short" in service.log()
